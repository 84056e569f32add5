"""Smoke runs of the shipped recipes through the real CLI on the real packaged models and data."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import SHARED_DATA, needs_shared, run_cli

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
QUICK = ["task.train_limit=64", "task.eval_limit=64", "train.max_steps=2", "train.batch_size=8"]

pytestmark = pytest.mark.smoke


def results(run: Path) -> dict:
    return json.loads((run / "eval/results.json").read_text())


def test_quickstart_recipe(tmp_path):
    run = tmp_path / "qs"
    assert run_cli("train", RECIPES / "quickstart.yaml", f"output_dir={run}", *QUICK) == 0
    assert set(results(run)["metrics"]) == {"accuracy", "f1", "loss"}
    assert run_cli("export-delta", run, "-o", tmp_path / "qs.safetensors") == 0
    assert run_cli("predict", "--delta", tmp_path / "qs.safetensors", "a fine film", "a mess", "-o", tmp_path / "p.jsonl") == 0
    rows = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert [(r["line"], r["task"], r["prediction"] in ("0", "1")) for r in rows] == [(1, "qs", True), (2, "qs", True)]


def test_quickstart_recipe_in_bf16_with_activation_checkpointing(tmp_path):
    run = tmp_path / "qs"
    overrides = ["train.device=cpu", "train.dtype=bf16", "train.gradient_checkpointing=true"]
    assert run_cli("train", RECIPES / "quickstart.yaml", f"output_dir={run}", *QUICK, *overrides) == 0
    manifest = json.loads((run / "manifest.json").read_text())
    assert (manifest["dtype"], manifest["gradient_checkpointing"]) == ("bf16", True)
    assert run_cli("export-delta", run, "-o", tmp_path / "delta") == 0
    assert run_cli("apply-delta", tmp_path / "delta", "-o", tmp_path / "merged") == 0


def test_quickstart_recipe_on_two_processes(tmp_path):
    """`sparsetune train --nproc 2` on the packaged model and data: 2 CPU ranks with gloo, then a single-process
    export of what rank 0 wrote."""
    run = tmp_path / "qs"
    command = [sys.executable, "-m", "sparsetune", "train", str(RECIPES / "quickstart.yaml"), f"output_dir={run}",
               *QUICK, "train.batch_size=4", "--nproc", "2"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    manifest = json.loads((run / "manifest.json").read_text())
    assert (manifest["world_size"], manifest["global_batch_size"]) == (2, 8)
    assert 0 < manifest["allreduce_bytes_per_step"] < 0.02 * 4 * 22_713_986  # SIFT's values and the head, not the model
    assert set(results(run)["metrics"]) == {"accuracy", "f1", "loss"}
    assert run_cli("export-delta", run, "-o", tmp_path / "delta") == 0


@needs_shared
@pytest.mark.parametrize("method", ["full", "lora", "sift", "ist", "zeroing"])
def test_sst2_recipes_on_real_glue(tmp_path, method):
    run = tmp_path / method
    data = SHARED_DATA / "glue" / "SST-2"
    assert run_cli("train", RECIPES / f"glue/sst2-{method}.yaml", f"output_dir={run}", f"task.data_dir={data}", *QUICK) == 0
    assert results(run)["examples"] == {"dev": 64}
    assert run_cli("export-delta", run, "-o", tmp_path / "delta") == 0
    assert run_cli("apply-delta", tmp_path / "delta", "-o", tmp_path / "merged") == 0
    assert (tmp_path / "merged" / "config.json").is_file()


@needs_shared
def test_alpaca_lora_on_smollm2(tmp_path):
    run = tmp_path / "alpaca"
    overrides = [f"output_dir={run}", f"task.data_file={SHARED_DATA / 'instruct/alpaca_en_demo.json'}",
                 "task.train_limit=8", "task.eval_limit=4", "task.generations=1", "task.max_new_tokens=8",
                 "model.max_length=128", "train.max_steps=1", "train.batch_size=1", "train.grad_accum=2"]
    assert run_cli("train", RECIPES / "instruct/alpaca-lora.yaml", *overrides) == 0
    metrics = results(run)["metrics"]
    assert metrics["loss"] > 0 and metrics["perplexity"] > 1
    rows = [json.loads(line) for line in (run / "eval/predictions.jsonl").read_text().splitlines()]
    assert [bool(r["generation"]) for r in rows] == [True]
    assert run_cli("export-delta", run, "-o", tmp_path / "adapter") == 0  # a PEFT folder, merged once by predict
    assert run_cli("predict", "--delta", tmp_path / "adapter", "Name a colour.", "--max-new-tokens", "4",
                   "-o", tmp_path / "p.jsonl") == 0
    assert "generation" in json.loads((tmp_path / "p.jsonl").read_text())
