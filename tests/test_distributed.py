"""Data parallelism on CPU with gloo and 2 processes: 2 ranks at batch B train exactly as one process at 2B.

Every case launches real ranks (torchrun, or `sparsetune train --nproc`), so each costs a few seconds of start-up.
The models have no dropout: dropout draws depend on the shard's shape, the one thing that differs from one
process. Tolerance: the ranks' gradients are summed in another order than one process sums them, so trained
values agree to float32 rounding (atol 1e-6), not bit for bit; resuming on the same ranks is bit-identical.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import _save_tiny_bert, run_cli, write_recipe
from test_methods import losses

SETTINGS = {"full": {"name": "full"}, "lora": {"name": "lora", "r": 4, "dropout": 0.0},
            "sift": {"name": "sift", "budget": 0.05, "warmup_batches": 2, "bias": False},
            "ist": {"name": "ist", "base": {"name": "lora", "r": 4, "dropout": 0.0}, "score_every": 2,
                    "warmup_steps": 2, "warmup_rounds": 1, "score_batch_size": 6},
            "zeroing": {"name": "zeroing", "budget": 0.05, "layers": 2, "warmup_batches": 2}}
# SIFT without biases: the attention key's bias has zero gradient in exact arithmetic (softmax ignores a shift),
# so its scores are rounding noise whose top-k depends on the summation order, the one thing that differs here.
FAULTS = Path(__file__).parent / "faults"  # its sitecustomize makes one rank raise


@pytest.fixture(scope="module")
def bert(tmp_path_factory) -> Path:
    """A 4-block tiny BERT without dropout."""
    return _save_tiny_bert(tmp_path_factory.mktemp("bert-nodrop"), seed=0, layers=4, dropout=0.0)


def launch(*args, nproc: int = 2, via: str = "torchrun", env: dict | None = None) -> subprocess.CompletedProcess:
    """`torchrun --nproc_per_node N -m sparsetune train ...` or `sparsetune train ... --nproc N`."""
    command = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m",
                "sparsetune", "train", *map(str, args)] if via == "torchrun" else
               [sys.executable, "-m", "sparsetune", "train", *map(str, args), "--nproc", str(nproc)])
    return subprocess.run(command, capture_output=True, text=True, env=os.environ | (env or {}), timeout=300)


def recipe_for(tmp_path: Path, model: Path, data: Path, method: dict, task: str = "sst2", **train) -> Path:
    task_section = {"name": task, "data_file": str(data)} if task == "instruct" else {"name": task, "data_dir": str(data)}
    return write_recipe(tmp_path / "recipe.yaml", output_dir=str(tmp_path / "run"), seed=0,
                        model={"name": str(model), "max_length": 32}, task=task_section, method=method,
                        train={"max_steps": 4, "batch_size": 4, "lr": 1e-3, "log_every": 1, "eval_batch_size": 5,
                               "eval_every": 2} | train)


def assert_same_training(two: Path, one: Path) -> None:
    a, b = load_file(two / "final/trainable.safetensors"), load_file(one / "final/trainable.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.allclose(a[name], b[name], rtol=1e-5, atol=1e-6), name
    assert losses(two) == pytest.approx(losses(one), rel=1e-5)
    # sharded evaluation predicts the whole split as one process does (up to padding's rounding); the metrics
    # follow, amplified where predictions barely spread (a regression head that starts at the label mean)
    predicted = [[r["prediction"] for r in map(json.loads, (run / "eval/predictions.jsonl").read_text().splitlines())]
                 for run in (two, one)]
    assert predicted[0] == pytest.approx(predicted[1], abs=1e-5)
    metrics = [json.loads((run / "eval/results.json").read_text())["metrics"] for run in (two, one)]
    assert metrics[0] == pytest.approx(metrics[1], rel=1e-5, abs=1e-3)


@pytest.mark.parametrize("method", sorted(SETTINGS))
def test_two_ranks_train_as_one_process_at_twice_the_batch(tmp_path, bert, glue_root, method):
    recipe = recipe_for(tmp_path, bert, glue_root, SETTINGS[method], task="stsb")
    two, one = tmp_path / "two", tmp_path / "one"
    done = launch(recipe, f"output_dir={two}", via="torchrun" if method in ("full", "sift") else "nproc")
    assert done.returncode == 0, done.stderr[-3000:]
    assert run_cli("train", recipe, f"output_dir={one}", "train.batch_size=8") == 0
    assert_same_training(two, one)
    manifest = json.loads((two / "manifest.json").read_text())
    assert (manifest["world_size"], manifest["global_batch_size"], manifest["backend"]) == (2, 8, "gloo")
    trained = load_file(two / "final/trainable.safetensors")
    values = sum(t.numel() for t in trained.values())
    if method == "ist":  # the drawn block's adapters and the head, not the undrawn blocks'
        lora_per_block = sum(t.numel() for n, t in trained.items() if ".layer.0." in n)
        assert manifest["allreduce_bytes_per_step"] == 4 * (values - 3 * lora_per_block)
    else:  # exactly the trainable values, in fp32, once per optimizer step
        assert manifest["allreduce_bytes_per_step"] == 4 * values
    if method == "sift":
        report = json.loads((two / "mask/mask.json").read_text())
        assert len(report["rank_digests"]) == 2 and len(set(report["rank_digests"])) == 1
        masks = [load_file(run / "mask/mask.safetensors") for run in (two, one)]
        assert masks[0].keys() == masks[1].keys() and all(torch.equal(masks[0][k], masks[1][k]) for k in masks[0])


def test_instruction_data_weights_ranks_by_target_tokens(tmp_path, tiny_llama, tmp_path_factory):
    """Shards hold different numbers of target tokens; the global mean over tokens is still one process's."""
    records = [{"instruction": f"say {'a ' * (i % 5)}{i}", "input": "", "output": "yes " * (1 + i % 7) + str(i)}
               for i in range(40)]
    data = tmp_path / "alpaca.json"
    data.write_text(json.dumps(records))
    recipe = recipe_for(tmp_path, tiny_llama, data, SETTINGS["lora"], task="instruct")
    two, one = tmp_path / "two", tmp_path / "one"
    done = launch(recipe, f"output_dir={two}", "task.generations=0", via="nproc")
    assert done.returncode == 0, done.stderr[-3000:]
    assert run_cli("train", recipe, f"output_dir={one}", "task.generations=0", "train.batch_size=8") == 0
    assert_same_training(two, one)


def test_resume_on_two_ranks_matches_uninterrupted(tmp_path, bert, glue_root):
    recipe = recipe_for(tmp_path, bert, glue_root, SETTINGS["ist"], save_every=100)
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert launch(recipe, f"output_dir={straight}", via="nproc").returncode == 0
    assert launch(recipe, f"output_dir={split}", "--stop-at-step", "3", via="nproc").returncode == 0
    assert not (split / "final").exists()
    assert run_cli("train", recipe, f"output_dir={split}", "--resume") == 2  # one process: refused, not re-sharded
    assert launch(recipe, f"output_dir={split}", "--resume", via="torchrun").returncode == 0
    assert losses(split) == losses(straight)
    a, b = load_file(straight / "final/trainable.safetensors"), load_file(split / "final/trainable.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_on_another_world_size_is_refused(tmp_path, bert, glue_root, capsys):
    recipe = recipe_for(tmp_path, bert, glue_root, SETTINGS["full"])
    assert launch(recipe, "--stop-at-step", "2", via="nproc").returncode == 0
    assert run_cli("train", recipe, "--resume") == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "2 process(es)" in err and "--nproc 2" in err and "\n" not in err


@pytest.mark.parametrize("via,rank", [("torchrun", 1), ("nproc", 0)])
def test_a_failing_rank_stops_every_rank_with_one_error_line(tmp_path, bert, glue_root, via, rank):
    recipe = recipe_for(tmp_path, bert, glue_root, SETTINGS["sift"])
    done = launch(recipe, via=via, env={"PYTHONPATH": str(FAULTS), "SPARSETUNE_TEST_FAIL": f"{rank}:2"})
    assert done.returncode != 0
    ours = [line for line in (done.stdout + done.stderr).splitlines() if line.startswith("error:")]
    assert ours == [f"error: rank {rank}: RuntimeError: injected failure on rank {rank} after step 2"]
    run = tmp_path / "run"
    assert not (run / "final").exists() and not list(run.glob(".final*"))
    if via == "nproc":  # our own launcher adds nothing to the rank's line
        assert "Traceback" not in done.stderr


def test_nproc_is_checked_before_launching(bert_recipe, capsys):
    assert run_cli("train", bert_recipe(), "--nproc", "0") == 2
    assert capsys.readouterr().err.strip() == "error: Invalid value for '--nproc': Input should be greater than or equal to 1"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (nccl)")
def test_nccl_path_on_one_gpu(tmp_path, bert, glue_root):
    recipe = recipe_for(tmp_path, bert, glue_root, SETTINGS["sift"], device="cuda", dtype="bf16")
    done = launch(recipe, nproc=1, via="nproc")
    assert done.returncode == 0, done.stderr[-3000:]
    manifest = json.loads((tmp_path / "run/manifest.json").read_text())
    assert manifest["world_size"] == 1 and "nccl" in manifest["backend"] and manifest["device"] == "cuda:0"
