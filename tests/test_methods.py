"""One invariant matrix over every registered method, on a tiny BERT through the real CLI."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification

from sparsetune.methods import REGISTRY
from sparsetune.models import HeadSpec, load_model
from sparsetune.rundir import RunDir
from sparsetune.train import restore

from conftest import run_cli

METHOD_SETTINGS = {"full": {"name": "full"}, "lora": {"name": "lora", "r": 4, "dropout": 0.1},
                   "sift": {"name": "sift", "budget": 0.05, "warmup_batches": 2},
                   "ist": {"name": "ist", "base": {"name": "lora", "r": 4}, "score_every": 2, "warmup_steps": 2,
                           "warmup_rounds": 1, "score_batch_size": 4},
                   "zeroing": {"name": "zeroing", "budget": 0.05, "layers": 1, "warmup_batches": 2}}
# what each method may change in the merged model, beyond the task head
ATTENTION = r".*attention\.(self\.(query|key|value)|output\.dense)"
MAY_CHANGE = {"full": r".*", "lora": ATTENTION + r"\.weight$", "sift": ATTENTION + r"\.(weight|bias)$",
              "ist": ATTENTION + r"\.weight$", "zeroing": ATTENTION + r"\.weight$"}


def test_every_registered_method_is_covered():
    assert set(REGISTRY) <= set(METHOD_SETTINGS)


def losses(run: Path) -> list[float]:
    return [row["loss"] for row in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in row]


@pytest.fixture(params=sorted(REGISTRY))
def method(request) -> str:
    return request.param


def test_resume_matches_uninterrupted(bert_recipe, tmp_path, method):
    recipe = bert_recipe(METHOD_SETTINGS[method])
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert run_cli("train", recipe, f"output_dir={straight}") == 0
    assert run_cli("train", recipe, f"output_dir={split}", "--stop-at-step", "2") == 0
    assert RunDir(split).checkpoint_steps() == [2] and not (split / "final").exists()
    assert run_cli("train", recipe, f"output_dir={split}", "--resume") == 0
    assert len(losses(straight)) == 4
    assert losses(split) == losses(straight)
    a, b = load_file(straight / "final/trainable.safetensors"), load_file(split / "final/trainable.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_export_apply_reproduces_trained_weights(bert_recipe, tmp_path, tiny_bert, method):
    run = tmp_path / "run"
    assert run_cli("train", bert_recipe(METHOD_SETTINGS[method])) == 0
    session = restore(RunDir(run), with_data=False)
    merged = dict(session.method.merged(session.model).named_parameters())
    base = dict(load_model(str(tiny_bert), HeadSpec("sequence-classification", 2)).model.named_parameters())
    changed = [n for n in merged if not n.startswith("classifier") and not torch.equal(merged[n], base[n])]
    assert changed and all(re.match(MAY_CHANGE[method], n) for n in changed)
    for fmt in ("auto", "delta", "merged"):
        target = tmp_path / f"export-{fmt}"
        assert run_cli("export-delta", run, "-o", target, "--format", fmt) == 0
        folder = target
        if fmt != "merged":
            folder = tmp_path / f"applied-{fmt}"
            assert run_cli("apply-delta", target, "-o", folder) == 0
        applied = dict(AutoModelForSequenceClassification.from_pretrained(folder).named_parameters())
        assert applied.keys() == merged.keys()
        assert all(torch.equal(applied[n], merged[n]) for n in merged), fmt


def test_wrong_base_is_refused(bert_recipe, tmp_path, other_tiny_bert, capsys, method):
    run = tmp_path / "run"
    assert run_cli("train", bert_recipe(METHOD_SETTINGS[method])) == 0
    for fmt in ("auto", "delta"):
        assert run_cli("export-delta", run, "-o", tmp_path / f"d-{fmt}", "--format", fmt) == 0
        capsys.readouterr()
        code = run_cli("apply-delta", tmp_path / f"d-{fmt}", "--base", other_tiny_bert, "-o", tmp_path / "out")
        assert code == 2 and "different base model" in capsys.readouterr().err
        assert not (tmp_path / "out").exists()


def test_rerun_needs_resume_or_force(bert_recipe, tmp_path, capsys, method):
    recipe = bert_recipe(METHOD_SETTINGS[method], max_steps=1)
    assert run_cli("train", recipe) == 0
    capsys.readouterr()
    assert run_cli("train", recipe) == 2
    assert "already holds a training run" in capsys.readouterr().err
    assert run_cli("train", recipe, "train.lr=1e-2", "--resume") == 2
    assert "the recipe changed (train.lr)" in capsys.readouterr().err
    assert run_cli("train", recipe, "--force") == 0
    assert len(losses(tmp_path / "run")) == 1


def test_head_lr_gives_the_fresh_head_alone_its_own_rate(bert_recipe, tmp_path, method):
    """Every trainable parameter is in exactly one optimizer group; the classifier's, and only those, at head_lr."""
    assert run_cli("train", bert_recipe(METHOD_SETTINGS[method], max_steps=1, head_lr=0.5)) == 0
    session = restore(RunDir(tmp_path / "run"), with_data=False)
    names = {id(p): n for n, p in session.model.named_parameters()}
    groups = session.method.optimizer_groups(session.model, session.loaded)
    lr_of = [(names[id(p)], group.get("lr")) for group in groups for p in group["params"]]
    assert sorted(n for n, _ in lr_of) == sorted(session.method.trainable_parameters(session.model))
    at_head_lr = {n.rsplit(".", 1)[1] for n, lr in lr_of if lr == 0.5}
    assert at_head_lr == {"weight", "bias"} and all("classifier" in n for n, lr in lr_of if lr == 0.5)
    assert not any("classifier" in n for n, lr in lr_of if lr != 0.5)
