"""`sparsetune predict`: one base switched between tasks in place is, at every switch, each task's merged model."""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from sparsetune.device import Placement
from sparsetune.models import HeadSpec, load_model
from sparsetune.predict import TaskBank, open_sources, task_predictions

from conftest import run_cli, write_recipe

# (name, method, task): a sparse delta, a zeroing delta, a LoRA adapter folder on a 1-label head
TASKS = [
    ("sift-sst2", {"name": "sift", "budget": 0.05, "warmup_batches": 1}, "sst2"),
    ("zero-mrpc", {"name": "zeroing", "budget": 0.05, "warmup_batches": 1, "criticality": "grad_norm"}, "mrpc"),
    ("lora-stsb", {"name": "lora", "r": 2}, "stsb"),
]
ROWS = [{"task": "sift-sst2", "text": "a fine film"}, {"task": "zero-mrpc", "text": "he said", "text_b": "he told"},
        {"task": "lora-stsb", "text": "a man", "text_b": "a woman"}, {"task": "sift-sst2", "text": "not worth it"},
        {"task": "zero-mrpc", "text": "it rained", "text_b": "it was dry"}, {"task": "sst2", "text": "a mess"}]


@pytest.fixture(scope="module")
def deltas(tmp_path_factory, tiny_bert, glue_root) -> dict[str, Path]:
    """Each task trained briefly on the tiny BERT, exported in its method's own format, and merged."""
    root = tmp_path_factory.mktemp("predict")
    exported = {}
    for name, method, task in TASKS:
        recipe = write_recipe(root / f"{name}.yaml", output_dir=str(root / name), seed=0,
                              model={"name": str(tiny_bert), "max_length": 32},
                              task={"name": task, "data_dir": str(glue_root)}, method=method,
                              train={"max_steps": 3, "batch_size": 4, "lr": 1e-2, "eval_batch_size": 8})
        assert run_cli("train", recipe) == 0
        exported[name] = root / (name if method["name"] == "lora" else f"{name}.safetensors")
        assert run_cli("export-delta", root / name, "-o", exported[name]) == 0
        assert run_cli("apply-delta", exported[name], "-o", root / f"{name}-merged") == 0
    return exported


def merged(delta: Path) -> torch.nn.Module:
    return AutoModelForSequenceClassification.from_pretrained(delta.parent / f"{delta.name.removesuffix('.safetensors')}-merged").eval()


def test_rows_alternating_between_tasks_get_each_merged_models_outputs(deltas, tmp_path):
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    out = tmp_path / "out.jsonl"
    assert run_cli("predict", *[f"--delta={p}" for p in deltas.values()], "--input", data, "-o", out) == 0
    got = [json.loads(line) for line in out.read_text().splitlines()]
    assert [g["line"] for g in got] == list(range(1, len(ROWS) + 1))
    assert [g["task"] for g in got] == [r["task"] if r["task"] != "sst2" else "sift-sst2" for r in ROWS]
    sources = open_sources([str(p) for p in deltas.values()])
    tokenizer = AutoTokenizer.from_pretrained(merged(deltas["sift-sst2"]).name_or_path)
    placement = Placement(torch.device("cpu"), torch.float32)
    for name, delta in deltas.items():
        mine = [(g, r) for g, r in zip(got, ROWS) if g["task"] == name]
        inputs = [{k: v for k, v in r.items() if k != "task"} for _, r in mine]
        expected = task_predictions(merged(delta), tokenizer, placement, sources[name], inputs, 32, 8, 32)
        assert [{k: g[k] for k in e} for (g, _), e in zip(mine, expected)] == expected  # exact floats
    assert isinstance(got[2]["prediction"], float) and set(got[0]["probabilities"]) == {"0", "1"}


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_every_switch_leaves_exactly_the_merged_weights(deltas, tiny_bert, dtype):
    """A→B→C→A→C→B→base: after each switch every parameter equals that task's merged model placed alike."""
    placement = Placement(torch.device("cpu"), {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype])
    sources = open_sources([str(p) for p in deltas.values()])
    loaded = load_model(str(tiny_bert), HeadSpec("sequence-classification", 2))
    bank = TaskBank(loaded, sources, placement)
    base = {n: p.detach().clone() for n, p in bank.model.named_parameters()}
    for name in ["sift-sst2", "zero-mrpc", "lora-stsb", "sift-sst2", "lora-stsb", "zero-mrpc", None]:
        bank.use(name)
        expected = base if name is None else dict(placement.place(merged(deltas[name]).requires_grad_(False))
                                                  .named_parameters())
        now = dict(bank.model.named_parameters())
        changed = [n for n in now if now[n].shape != expected[n].shape or not torch.equal(now[n], expected[n])]
        assert not changed and now.keys() == expected.keys(), (name, changed)
    assert len(bank.switch_seconds) == 6


def test_instruction_deltas_generate_the_merged_models_text(tmp_path, tiny_llama):
    records = [{"instruction": f"say {w} {i}", "input": "", "output": w} for w in ["yes", "no", "maybe"] for i in range(8)]
    (tmp_path / "data.json").write_text(json.dumps(records))
    recipe = write_recipe(tmp_path / "r.yaml", output_dir=str(tmp_path / "run"), seed=0,
                          model={"name": str(tiny_llama), "max_length": 64},
                          task={"name": "instruct", "data_file": str(tmp_path / "data.json"), "generations": 0,
                                "eval_fraction": 0.25},
                          method={"name": "sift", "budget": 0.05, "warmup_batches": 1},
                          train={"max_steps": 3, "batch_size": 4, "lr": 1e-2})
    assert run_cli("train", recipe) == 0
    assert run_cli("export-delta", tmp_path / "run", "-o", tmp_path / "d.safetensors") == 0
    assert run_cli("apply-delta", tmp_path / "d.safetensors", "-o", tmp_path / "merged") == 0
    out = tmp_path / "out.jsonl"
    assert run_cli("predict", "--delta", tmp_path / "d.safetensors", "say yes", "say no", "--max-new-tokens", "4",
                   "-o", out) == 0
    got = [json.loads(line) for line in out.read_text().splitlines()]
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "merged")
    source = open_sources([str(tmp_path / "d.safetensors")])["d"]
    expected = task_predictions(model, tokenizer, Placement(torch.device("cpu"), torch.float32), source,
                                [{"instruction": t, "input": ""} for t in ("say yes", "say no")], 8, 4, 64)
    assert [g["generation"] for g in got] == [e["generation"] for e in expected]


def test_glue_files_and_stdin_predict_as_they_are(deltas, glue_root, monkeypatch, capsys):
    assert run_cli("predict", "--delta", deltas["zero-mrpc"], "--input", glue_root / "MRPC" / "dev.tsv") == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(rows) == 12 and rows[0]["line"] == 2 and "#1 String" in rows[0] and "probabilities" in rows[0]
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"a fine film\n\nawful\n")))
    assert run_cli("predict", "--delta", deltas["sift-sst2"], "--input", "-") == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(r["line"], r["text"]) for r in rows] == [(1, "a fine film"), (3, "awful")]
    # rows that name no task go to every task (here one delta under two names), in row order
    assert run_cli("predict", "--delta", f"a={deltas['sift-sst2']}", "--delta", f"b={deltas['sift-sst2']}", "one",
                   "two") == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(r["line"], r["task"]) for r in rows] == [(1, "a"), (1, "b"), (2, "a"), (2, "b")]
    assert rows[0]["probabilities"] == rows[1]["probabilities"]


def test_a_delta_for_another_base_is_refused(deltas, other_tiny_bert, tmp_path, capsys):
    out = tmp_path / "out.jsonl"
    (tmp_path / "in.jsonl").write_text(json.dumps({"text": "a", "text_b": "b"}) + "\n")
    for name, delta in deltas.items():
        args = ["a"] if name == "sift-sst2" else ["--input", tmp_path / "in.jsonl"]
        assert run_cli("predict", "--delta", delta, "--base", other_tiny_bert, *args, "-o", out) == 2
        assert "different base model" in capsys.readouterr().err
    assert not out.exists()


BAD_ROWS = {
    "not JSON": (b'{"text": "a"}\n{"text": "b"}\n{oops\n', "line 3: not valid JSON"),
    "not an object": (b'{"text": "a"}\n[1, 2]\n', "line 2: expected a JSON object"),
    "unknown task": (b'{"text": "a", "task": "qnli"}\n', "line 1: task 'qnli' is none of the deltas"),
    "no text": (b'{"texte": "a"}\n', "line 1: no 'text'"),
    "not a string": (b'\n\n{"text": 3}\n', "line 3: 'text' must be a string"),
    "pair missing": (b'{"task": "zero-mrpc", "text": "a"}\n', "line 1: task 'zero-mrpc' takes a sentence pair"),
    "pair given": (b'{"task": "sift-sst2", "text": "a", "text_b": "b"}\n', "line 1: task 'sift-sst2' takes one text"),
    "not UTF-8": (b'{"text": "\xff"}\n', "not UTF-8 text"),
}


@pytest.mark.parametrize("case", sorted(BAD_ROWS))
def test_bad_rows_get_one_line_naming_the_line(case, deltas, tmp_path, capsys):
    data, message = BAD_ROWS[case]
    (tmp_path / "in.jsonl").write_bytes(data)
    out = tmp_path / "out.jsonl"
    code = run_cli("predict", "--delta", deltas["sift-sst2"], "--delta", deltas["zero-mrpc"],
                   "--input", tmp_path / "in.jsonl", "-o", out)
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err and len(err.splitlines()) == 1, err
    assert not out.exists()


def test_bad_calls_get_one_line(deltas, tmp_path, capsys):
    (tmp_path / "ragged.tsv").write_text("text\ttask\na\tsift-sst2\nb\n")
    cases = [
        (["--delta", deltas["sift-sst2"]], "no input"),
        (["--delta", deltas["sift-sst2"], "--delta", deltas["sift-sst2"], "x"], "two deltas are named 'sift-sst2'"),
        (["--delta", tmp_path / "none.safetensors", "x"], "not found"),
        (["--delta", deltas["sift-sst2"], "--input", tmp_path / "ragged.tsv"], "line 3: 1 columns, the header has 2"),
        (["--delta", deltas["sift-sst2"], "--input", tmp_path / "no.jsonl"], "--input: file"),
        (["--delta", deltas["sift-sst2"], "x", "--dtype", "int8"], "unknown --dtype 'int8'"),
        (["--delta", deltas["sift-sst2"], "x", "-o", tmp_path], "is a folder"),
    ]
    for args, message in cases:
        assert run_cli("predict", *args) == 2, args
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, (args, err)
