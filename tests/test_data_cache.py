"""Data on `datasets`: tokenized once and reused from the cache, the loader's order, packing, gzipped input."""

from __future__ import annotations

import gzip
import json
import re
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from sparsetune.data import Split, load_task
from sparsetune.data.instruct import IGNORE_INDEX
from sparsetune.data.loader import StepSampler, train_loader
from sparsetune.errors import UserError
from sparsetune.models import HeadSpec, keeps_packed_sequences_apart, load_model
from sparsetune.recipe import TaskConfig

from conftest import run_cli, write_recipe


class CountingTokenizer:
    """Delegates to a real tokenizer and counts the calls that tokenize text."""

    def __init__(self, tokenizer) -> None:
        self.inner, self.calls = tokenizer, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.inner(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.inner, name)


@pytest.fixture
def tokenizer(tiny_llama):
    return AutoTokenizer.from_pretrained(tiny_llama)


def records(n: int) -> list[dict]:
    return [{"instruction": f"Say {i} twice.", "input": "" if i % 3 else "loudly", "output": f"{i} {i}"}
            for i in range(n)]


def test_a_second_build_reuses_the_tokens(tmp_path, glue_root, tokenizer, monkeypatch):
    monkeypatch.setenv("SPARSETUNE_DATA_CACHE", str(tmp_path / "cache"))
    cfg = TaskConfig(name="sst2", data_dir=glue_root / "SST-2")
    first = CountingTokenizer(tokenizer)
    data = load_task(cfg, first, 32)
    assert first.calls > 0
    again = CountingTokenizer(tokenizer)
    reused = load_task(cfg, again, 32)
    assert again.calls == 0  # every split came from the cache
    assert reused.train.columns(range(len(reused.train))) == data.train.columns(range(len(data.train)))
    assert [e.label for e in reused.evals[0].examples] == [e.label for e in data.evals[0].examples]
    assert reused.train.dataset.cache_files  # memory-mapped from the Arrow file, not held in memory
    # what the tokens depend on: a different max_length, or a changed file, is a new entry
    for changed in (lambda: load_task(cfg, again, 16),
                    lambda: (glue_root / "SST-2" / "train.tsv").write_text((glue_root / "SST-2" / "train.tsv")
                                                                          .read_text() + "one more\t1\n")):
        before = again.calls
        changed()
        if before == again.calls:
            load_task(cfg, again, 32)
        assert again.calls > before
    assert len(list((tmp_path / "cache").iterdir())) == 3


def test_the_order_is_todays_and_resumes_mid_run(tmp_path, tiny_bert):
    """The sampler's micro-batches are today's: one permutation of the rows per epoch from torch.randperm seeded
    with seed * 1000003 + epoch, cut into batches; starting at micro-batch k gives the same stream from k on, and
    worker processes change nothing."""
    n, size, seed = 10, 4, 7
    split = Split.from_columns("train", {"input_ids": [[1, 2 + i] for i in range(n)], "labels": list(range(n))})
    expected = []
    for epoch in range(3):
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1000003 + epoch)).tolist()
        expected += [perm[i : i + size] for i in range(0, n, size)]
    stream = iter(StepSampler(split, size, 1, seed, 0))
    assert [next(stream).indices for _ in expected] == expected
    tail = iter(StepSampler(split, size, 1, seed, 4))
    assert [next(tail).indices for _ in expected[4:]] == expected[4:]
    for workers in (0, 2):
        loader = iter(train_loader(split, 0, StepSampler(split, size, 1, seed, 0), workers, False))
        batches = [next(loader) for _ in expected]
        assert [b["labels"].tolist() for b, _, _ in batches] == expected  # label i is row i
        assert all(plan.share == pytest.approx(1.0) for _, plan, _ in batches)
        assert [tokens for _, _, tokens in batches] == [2 * len(b) for b in expected]


def test_shares_of_a_step_follow_target_tokens(tmp_path):
    """With accumulation, each micro-batch carries its target tokens' fraction of the whole step's."""
    labels = [[IGNORE_INDEX] * (i % 3) + [5] * (i + 2) for i in range(6)]
    split = Split.from_columns("train", {"input_ids": [[5] * len(y) for y in labels], "labels": labels})
    stream = iter(StepSampler(split, 2, 3, 0, 0))
    step = [next(stream) for _ in range(3)]
    weights = [split.loss_items(p.indices) for p in step]
    assert [p.share for p in step] == pytest.approx([w / sum(weights) for w in weights])


def per_example_loss(logits: torch.Tensor, labels: torch.Tensor, segments: list[slice]) -> list[float]:
    """Summed next-token loss of each segment of one row (the model's own shift by one)."""
    losses = torch.nn.functional.cross_entropy(logits[0, :-1], labels[0, 1:], reduction="none",
                                               ignore_index=IGNORE_INDEX)
    return [float(losses[s.start : s.stop - 1].sum()) for s in segments]


def test_packing_keeps_examples_apart_and_response_only_labels(tmp_path, tiny_llama, monkeypatch):
    monkeypatch.setenv("SPARSETUNE_DATA_CACHE", str(tmp_path / "cache"))
    (tmp_path / "data.json").write_text(json.dumps(records(40)))
    loaded = load_model(str(tiny_llama), HeadSpec("causal-lm"))
    model = loaded.model.eval()
    assert keeps_packed_sequences_apart(model)
    plain = load_task(TaskConfig(name="instruct", data_file=tmp_path / "data.json"), loaded.tokenizer, 160)
    packed = load_task(TaskConfig(name="instruct", data_file=tmp_path / "data.json", packing=True),
                       loaded.tokenizer, 160)
    assert len(packed.train) < len(plain.train) and packed.train.unit == "packed rows"
    assert packed.evals[0].columns(range(len(packed.evals[0]))) == plain.evals[0].columns(range(len(plain.evals[0])))
    rows = packed.train.columns(range(len(packed.train)))
    singles = plain.train.columns(range(len(plain.train)))
    assert sum(len(r) for r in rows["input_ids"]) == sum(len(r) for r in singles["input_ids"])
    assert max(len(r) for r in rows["input_ids"]) <= 160
    assert packed.train.weights.sum() == plain.train.weights.sum()  # the loss averages over the same targets
    example = 0
    for row in range(3):
        starts = [i for i, p in enumerate(rows["position_ids"][row]) if p == 0] + [len(rows["input_ids"][row])]
        segments = [slice(a, b) for a, b in zip(starts, starts[1:])]
        assert len(segments) > 1
        batch = packed.train.batch([row], loaded.tokenizer.pad_token_id)
        assert "attention_mask" not in batch and batch["use_cache"] is False
        with torch.no_grad():
            together = per_example_loss(model(**{k: v for k, v in batch.items() if k != "labels"}).logits,
                                        batch["labels"], segments)
        for segment, loss in zip(segments, together):
            alone = plain.train.batch([example], loaded.tokenizer.pad_token_id)
            assert rows["labels"][row][segment] == alone["labels"][0].tolist()  # prompt masked, response kept
            with torch.no_grad():
                logits = model(input_ids=alone["input_ids"], attention_mask=alone["attention_mask"]).logits
            assert loss == pytest.approx(per_example_loss(logits, alone["labels"], [slice(0, logits.shape[1])])[0],
                                         rel=1e-4)
            example += 1


def test_a_model_that_ignores_position_ids_is_refused_for_packing(tiny_llama):
    class NoPositions(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, position_ids=None, use_cache=None):
            return self.inner(input_ids=input_ids, use_cache=False)  # attends across the seam

    model = load_model(str(tiny_llama), HeadSpec("causal-lm")).model
    assert not keeps_packed_sequences_apart(NoPositions(model))


def test_packed_training_runs_from_the_cli(tmp_path, tiny_llama, capsys):
    (tmp_path / "data.json").write_text(json.dumps(records(40)))
    recipe = write_recipe(tmp_path / "r.yaml", output_dir=str(tmp_path / "run"), model={"name": str(tiny_llama),
                          "max_length": 160}, method={"name": "sift", "budget": 0.01, "warmup_batches": 2},
                          task={"name": "instruct", "data_file": str(tmp_path / "data.json"), "packing": True,
                                "generations": 1},
                          train={"max_steps": 3, "batch_size": 2, "lr": 1e-3})
    assert run_cli("train", recipe) == 0
    assert "packed rows" in capsys.readouterr().err
    results = json.loads((tmp_path / "run/eval/results.json").read_text())
    assert results["metrics"]["loss"] > 0
    assert run_cli("train", recipe, "task.name=sst2", "--force") == 2
    assert "task.packing: only for instruction data" in capsys.readouterr().err


def test_gzipped_json_and_jsonl_read_like_plain(tmp_path, tokenizer, monkeypatch):
    monkeypatch.setenv("SPARSETUNE_DATA_CACHE", str(tmp_path / "cache"))
    data = records(30)
    files = {"a.json": json.dumps(data), "a.jsonl": "".join(json.dumps(r) + "\n" for r in data)}
    for name, text in list(files.items()):
        (tmp_path / name).write_text(text)
        with gzip.open(tmp_path / f"{name}.gz", "wt", encoding="utf-8") as handle:
            handle.write(text)
    splits = []
    for name in ("a.json", "a.jsonl", "a.json.gz", "a.jsonl.gz"):
        task = load_task(TaskConfig(name="instruct", data_file=tmp_path / name), tokenizer, 64)
        splits.append([s.columns(range(len(s))) for s in (task.train, *task.evals)])
    assert all(s == splits[0] for s in splits[1:])
    (tmp_path / "cut.jsonl.gz").write_bytes(gzip.compress(files["a.jsonl"].encode())[:40])
    (tmp_path / "bad.jsonl.gz").write_bytes(gzip.compress(b'{"instruction": "x", "output": "y"}\n{oops\n'))
    (tmp_path / "a.txt").write_text("x")
    for name, message in (("cut.jsonl.gz", "could not be read"), ("bad.jsonl.gz", "not valid JSON .* at line 2"),
                          ("a.txt", "should end in .json, .jsonl, .json.gz, .jsonl.gz")):
        with pytest.raises(UserError, match=message):
            load_task(TaskConfig(name="instruct", data_file=tmp_path / name), tokenizer, 64)
    assert not [p for p in (tmp_path / "cache").iterdir() if ".tmp-" in p.name]  # no half-built entry left


def test_stages_of_one_run_tokenize_once(bert_recipe, capsys, tmp_path, monkeypatch):
    """warm-up, selection, training and evaluation each need the data: only the first tokenizes it."""
    monkeypatch.setenv("SPARSETUNE_DATA_CACHE", str(tmp_path / "cache"))
    recipe = bert_recipe({"name": "sift", "budget": 0.05, "warmup_batches": 2})
    assert run_cli("train", recipe) == 0
    assert run_cli("eval", tmp_path / "run") == 0
    out = capsys.readouterr()
    logged = out.out + out.err
    assert logged.count("tokenizing sst2 into the cache") == 1


def stream_recipe(tmp_path: Path, tiny_llama: Path, data: Path, **task) -> Path:
    return write_recipe(tmp_path / "stream.yaml", output_dir=str(tmp_path / "run"),
                        model={"name": str(tiny_llama), "max_length": 160},
                        method={"name": "sift", "budget": 0.01, "warmup_batches": 2},
                        task={"name": "instruct", "data_file": str(data), "streaming": True, "generations": 0,
                              "eval_limit": 4, "shuffle_buffer": 8} | task,
                        train={"max_steps": 6, "batch_size": 2, "lr": 1e-3, "log_every": 1, "save_every": 3})


def test_streaming_reads_the_corpus_as_it_trains_and_resumes_exactly(tmp_path, tiny_llama, capsys):
    """The corpus's tail is not JSON: a stream that trains 6 steps of 2 through a buffer of 8 never reads that
    far, so it cannot have held or tokenized the file whole. A run stopped at step 3 and resumed logs the very
    losses of one that never stopped."""
    data = tmp_path / "corpus.jsonl.gz"
    with gzip.open(data, "wt", encoding="utf-8") as handle:
        handle.write("".join(json.dumps(r) + "\n" for r in records(400)) + "{not json at all\n")
    recipe = stream_recipe(tmp_path, tiny_llama, data)
    assert run_cli("train", recipe) == 0
    assert "streamed examples" in capsys.readouterr().err
    straight = [r for r in map(json.loads, (tmp_path / "run/metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert len(straight) == 6
    assert run_cli("train", recipe, f"output_dir={tmp_path / 'split'}", "--stop-at-step", "3") == 0
    assert run_cli("train", recipe, f"output_dir={tmp_path / 'split'}", "--resume") == 0
    resumed = [r for r in map(json.loads, (tmp_path / "split/metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert [r["loss"] for r in resumed] == [r["loss"] for r in straight]
    results = json.loads((tmp_path / "run/eval/results.json").read_text())
    assert results["examples"] == {"heldout": 4}
    # the held-out records are never trained on, and the same ones every time
    from sparsetune.data.stream import StreamSplit, heldout_records
    from sparsetune.recipe import load_recipe

    cfg = load_recipe(recipe).task
    held = heldout_records(cfg)
    assert held == heldout_records(cfg) and len(held) == 4
    (tmp_path / "clean.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records(400)))
    stream = StreamSplit(cfg.model_copy(update={"data_file": tmp_path / "clean.jsonl"}), AutoTokenizer.from_pretrained(
        tiny_llama), 160)
    trained = {r.instruction for r in stream._records(0, 0)}
    assert len(trained) > 300 and not trained & {r.instruction for r in held}


def test_streaming_is_refused_where_it_cannot_work(tmp_path, tiny_llama, capsys):
    (tmp_path / "a.json").write_text(json.dumps(records(20)))
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records(20)))
    recipe = stream_recipe(tmp_path, tiny_llama, tmp_path / "a.jsonl")
    for overrides, message in (([f"task.data_file={tmp_path / 'a.json'}"], "task.streaming: .* is a JSON list"),
                               (["train.max_steps=null", "train.epochs=1"], "train.max_steps: required with task.streaming"),
                               (["method=ist", "method.base=lora"], "task.streaming: method 'ist' draws"),
                               (["task.name=sst2"], "task.streaming: only for instruction data")):
        assert run_cli("train", recipe, *overrides, "--force") == 2
        err = capsys.readouterr().err.strip()
        errors = [line for line in err.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and re.search(message, errors[0]), (overrides, err)
