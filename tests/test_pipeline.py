"""The pipeline through the CLI on tiny models: metrics, eval, stages, instruction data, recipes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

from conftest import run_cli, write_recipe


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize("task", ["mrpc", "stsb", "cola", "mnli"])
def test_official_metrics_match_sklearn_and_scipy(bert_recipe, tmp_path, task):
    assert run_cli("train", bert_recipe(task=task, max_steps=2)) == 0
    results = json.loads((tmp_path / "run/eval/results.json").read_text())
    rows = read_jsonl(tmp_path / "run/eval/predictions.jsonl")
    first = [r for r in rows if r["split"] == results["splits"][0]]
    p, y = np.array([r["prediction"] for r in first]), np.array([r["label"] for r in first])
    expected = {
        "mrpc": lambda: {"f1": f1_score(y, p), "accuracy": accuracy_score(y, p)},
        "stsb": lambda: {"pearson": pearsonr(p, y)[0], "spearmanr": spearmanr(p, y)[0]},
        "cola": lambda: {"matthews_correlation": matthews_corrcoef(y, p)},
        "mnli": lambda: {"accuracy": accuracy_score(y, p)},
    }[task]()
    for key, value in expected.items():
        assert results["metrics"][key] == pytest.approx(value, abs=1e-12)
    if task == "mnli":
        assert results["splits"] == ["matched", "mismatched"]
        mm = [r for r in rows if r["split"] == "mismatched"]
        assert results["metrics"]["accuracy_mismatched"] == pytest.approx(
            accuracy_score([r["label"] for r in mm], [r["prediction"] for r in mm]))


def test_run_directory_and_eval_command(bert_recipe, tmp_path, capsys):
    run = tmp_path / "run"
    assert run_cli("train", bert_recipe(max_steps=3, save_every=1, keep_checkpoints=2)) == 0
    for name in ("recipe.yaml", "manifest.json", "metrics.jsonl", "final/trainable.safetensors",
                 "eval/results.json", "eval/predictions.jsonl"):
        assert (run / name).is_file(), name
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-1", "step-2"]
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["seed"] == 0 and "torch" in manifest["versions"] and manifest["stages"]["train"]["completed"]
    first = json.loads((run / "eval/results.json").read_text())
    assert run_cli("eval", run) == 0
    assert json.loads((run / "eval/results.json").read_text())["metrics"] == first["metrics"]
    assert run_cli("eval", run, "--checkpoint", "step-2") == 0
    assert json.loads((run / "eval/results.json").read_text())["checkpoint"] == "step-2"
    capsys.readouterr()
    assert run_cli("eval", tmp_path / "nowhere") == 2
    assert "not a sparsetune run directory" in capsys.readouterr().err


def test_stage_commands_have_nothing_to_do_for_dense_methods(bert_recipe, capsys):
    recipe = bert_recipe()
    assert run_cli("warmup", recipe) == 0 and run_cli("select", recipe) == 0
    assert "has no warmup stage; nothing to do" in capsys.readouterr().err


def test_validate_prints_recipe_and_trainable_count(bert_recipe, capsys):
    assert run_cli("validate", bert_recipe({"name": "lora", "r": 2})) == 0
    printed = capsys.readouterr().out
    assert "name: lora" in printed and "# trainable parameters:" in printed
    # r * (32 + 32) per adapted matrix, 4 matrices per block, 2 blocks; head: 32 * 2 + 2
    assert "# trainable parameters: 1,090 of" in printed


def test_output_dir_that_is_not_a_run_is_refused(bert_recipe, tmp_path, capsys):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "notes.txt").write_text("mine")
    assert run_cli("train", bert_recipe()) == 2
    assert "is not empty and is not a sparsetune run directory" in capsys.readouterr().err


@pytest.mark.parametrize("method", [{"name": "lora", "r": 4}, {"name": "full"}])
def test_instruction_tuning_writes_loss_and_generations(tmp_path, tiny_llama, method):
    words = ["apple", "river", "stone", "cloud", "green", "light", "music", "paper"]
    records = [{"instruction": f"Repeat the word {w} {i} times.", "input": "", "output": f"{w} " * i}
               for w in words for i in range(1, 6)]
    (tmp_path / "data.json").write_text(json.dumps(records))
    recipe = write_recipe(tmp_path / "r.yaml", output_dir=str(tmp_path / "run"),
                          model={"name": str(tiny_llama), "max_length": 96},
                          task={"name": "instruct", "data_file": str(tmp_path / "data.json"), "eval_fraction": 0.25,
                                "generations": 2, "max_new_tokens": 4},
                          method=method, train={"max_steps": 2, "batch_size": 4, "lr": 1e-3})
    assert run_cli("train", recipe) == 0
    results = json.loads((tmp_path / "run/eval/results.json").read_text())
    assert results["metrics"]["perplexity"] == pytest.approx(np.exp(results["metrics"]["loss"]))
    generations = [r for r in read_jsonl(tmp_path / "run/eval/predictions.jsonl") if "generation" in r]
    assert len(generations) == 2 and all(isinstance(g["generation"], str) for g in generations)


def test_recipes_command_lists_shows_and_copies(tmp_path, capsys):
    assert run_cli("recipes", "ls") == 0
    listed = capsys.readouterr().out.split()
    assert {"quickstart", "glue/sst2-full", "glue/sst2-lora", "instruct/alpaca-lora"} <= set(listed)
    assert run_cli("recipes", "show", "glue/sst2-full") == 0
    assert "name: sst2" in capsys.readouterr().out
    assert run_cli("recipes", "cp", "quickstart", tmp_path) == 0
    assert (tmp_path / "quickstart.yaml").is_file()
    assert run_cli("recipes", "show", "glue/sst2-ful") == 2
    assert "did you mean 'glue/sst2-full'" in capsys.readouterr().err


def test_resume_without_checkpoint_starts_clean(bert_recipe, tmp_path):
    """A run killed before its first checkpoint: --resume starts over without the dead attempt's metric rows."""
    recipe = bert_recipe({"name": "lora", "r": 2})
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    assert run_cli("train", recipe, f"output_dir={straight}") == 0
    assert run_cli("train", recipe, f"output_dir={killed}", "--stop-at-step", "2") == 0
    shutil.rmtree(killed / "checkpoints")
    assert run_cli("train", recipe, f"output_dir={killed}", "--resume") == 0
    losses = [[r["loss"] for r in read_jsonl(run / "metrics.jsonl") if "loss" in r] for run in (straight, killed)]
    assert len(losses[1]) == 4 and losses[0] == losses[1]


@pytest.mark.parametrize("method", [{"name": "full"}, {"name": "sift", "budget": 0.05, "warmup_batches": 1},
                                    {"name": "lora", "r": 2}])
def test_a_regression_head_starts_at_the_mean_training_label(bert_recipe, tmp_path, glue_root, method):
    """STS-B labels average about 2.7 (here 2.2 on the tiny files); every method's head starts there, from the
    training split alone, so that training learns the relation and not the offset."""
    import torch

    from sparsetune.data.glue import read_glue
    from sparsetune.recipe import load_recipe
    from sparsetune.rundir import RunDir
    from sparsetune.train import build

    recipe = load_recipe(bert_recipe(method, task="stsb"), [])
    run = RunDir(recipe.output_dir)
    run.open(recipe)
    if method["name"] == "sift":
        assert run_cli("warmup", tmp_path / "stsb.yaml") == 0 and run_cli("select", tmp_path / "stsb.yaml") == 0
    train, devs = read_glue("stsb", glue_root, None, None)
    mean = sum(e.label for e in train) / len(train)
    assert abs(mean - sum(e.label for e in devs["dev"]) / len(devs["dev"])) > 1e-3  # so the dev split would show
    session = build(recipe, run)
    biases = [p for n, p in session.model.named_parameters() if "classifier" in n and n.endswith("bias")]
    assert biases and all(torch.allclose(p, torch.tensor([mean])) for p in biases)
