"""Crash safety: `sparsetune train` SIGKILLed at six moments, then `--resume`d, ends bit-identical to an
uninterrupted run; `export-delta` and `apply-delta` killed midway leave nothing at their target."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sparsetune.rundir import CHECKSUMS, RunDir

from conftest import run_cli, write_recipe
from test_methods import losses

FAULTS = Path(__file__).parent / "faults"  # its sitecustomize kills the process at a named moment
# moment:N -> what the process was doing; 6 steps, a checkpoint every 2, a dev evaluation every 2
KILLS = {"optimizer:3": "inside step 3, before AdamW moves (the newest checkpoint is step 2)",
         "optimizer:6": "inside the last step",
         "checkpoint:2": "writing the checkpoint of step 4 (its first file written, the folder not renamed)",
         "eval:1": "in the dev evaluation after step 2",
         "final:1": "writing final/ (its file written, the folder not renamed)",
         "eval:3": "in the evaluation after training, final/ complete"}


def killed(*args: str, moment: str) -> subprocess.CompletedProcess:
    path = os.pathsep.join(filter(None, [str(FAULTS), os.environ.get("PYTHONPATH")]))
    env = os.environ | {"PYTHONPATH": path, "SPARSETUNE_TEST_KILL": moment}
    return subprocess.run([sys.executable, "-m", "sparsetune", *map(str, args)], env=env, capture_output=True,
                          text=True, timeout=300)


@pytest.fixture(scope="module")
def recipe(tmp_path_factory, tiny_bert, glue_root) -> Path:
    root = tmp_path_factory.mktemp("crash")
    return write_recipe(root / "recipe.yaml", output_dir=str(root / "straight"), seed=0,
                        model={"name": str(tiny_bert), "max_length": 32},
                        task={"name": "sst2", "data_dir": str(glue_root)},
                        method={"name": "sift", "budget": 0.05, "warmup_batches": 2},
                        train={"max_steps": 6, "batch_size": 4, "lr": 1e-3, "log_every": 1, "save_every": 2,
                               "eval_every": 2, "eval_batch_size": 8})


@pytest.fixture(scope="module")
def straight(recipe) -> Path:
    assert run_cli("train", recipe) == 0
    return recipe.parent / "straight"


@pytest.mark.parametrize("moment", sorted(KILLS))
def test_killed_training_resumes_bit_identical(tmp_path, recipe, straight, moment):
    run = tmp_path / "run"
    done = killed("train", recipe, f"output_dir={run}", moment=moment)
    assert done.returncode == -9, done.stderr[-2000:]  # it died where we meant it to, not earlier or later
    assert run_cli("train", recipe, f"output_dir={run}", "--resume") == 0
    a, b = load_file(run / "final/trainable.safetensors"), load_file(straight / "final/trainable.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), KILLS[moment]
    assert losses(run) == losses(straight)
    assert (run / "eval/results.json").read_text().replace(str(run), "") == \
        (straight / "eval/results.json").read_text().replace(str(straight), "")


def test_a_resumed_run_counts_the_time_before_its_checkpoint(tmp_path, recipe):
    """The time a report shows for a killed and resumed run is the whole time to reach the end: the attempt
    before the checkpoint counts. The checkpoint says that attempt took 1000 s, far longer than any here."""
    run = tmp_path / "run"
    assert killed("train", recipe, f"output_dir={run}", moment="optimizer:3").returncode == -9
    checkpoint = run / "checkpoints/step-2"
    info = json.loads((checkpoint / "trainer.json").read_text())
    assert 0 < info["train_seconds"] < 1000
    (checkpoint / "trainer.json").write_text(json.dumps({**info, "train_seconds": 1000.0}))
    (checkpoint / CHECKSUMS).unlink()
    RunDir.seal(checkpoint)
    assert run_cli("train", recipe, f"output_dir={run}", "--resume") == 0
    assert 1000 < json.loads((run / "manifest.json").read_text())["stages"]["train"]["wall_time_s"] < 1300
    elapsed = [r["elapsed_s"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
               if "elapsed_s" in r]
    assert len(elapsed) == 6 and elapsed[:2] == sorted(elapsed[:2]) and all(e > 1000 for e in elapsed[2:])


@pytest.mark.parametrize("command,moment", [("export-delta", "delta:1"), ("apply-delta", "merged:1")])
def test_killed_export_leaves_nothing_at_the_target(tmp_path, straight, command, moment):
    delta = tmp_path / "delta.safetensors"
    if command == "apply-delta":
        assert run_cli("export-delta", straight, "-o", delta) == 0
    target = tmp_path / "target"
    args = ("export-delta", straight, "-o", target) if command == "export-delta" else ("apply-delta", delta, "-o", target)
    done = killed(*args, moment=moment)
    assert done.returncode == -9, done.stderr[-2000:]
    assert not target.exists()
    assert list(tmp_path.glob(".target.tmp*"))  # it was killed after writing, under the temporary name
