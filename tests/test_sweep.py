"""`sparsetune sweep`: a tiny grid runs, is skipped when complete (from its records alone too), resumes after a
kill, and selects the learning rate without ever reading the dev split."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from conftest import run_cli, write_recipe
from sparsetune.sweep import choose_lrs, load_sweep, ready_points, selection_points, status

FAULTS = Path(__file__).parent / "faults"
RECORDS = Path(__file__).parents[1] / "scripts" / "sweep_records.py"


def sweep_file(tmp_path: Path, tiny_bert: Path, glue: Path, **sweep) -> Path:
    recipe = write_recipe(tmp_path / "base.yaml", output_dir=str(tmp_path / "unused"), seed=0,
                          model={"name": str(tiny_bert), "max_length": 32},
                          task={"name": "sst2", "data_dir": str(glue), "eval_fraction": 0.25},
                          method={"name": "full"},
                          train={"max_steps": 4, "batch_size": 4, "lr": 1e-3, "eval_batch_size": 8, "save_every": 2})
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump({"output_root": str(tmp_path / "sweep"), "recipes": [str(recipe)]} | sweep))
    return path


def test_a_grid_runs_then_is_skipped_and_reported(tmp_path, tiny_bert, glue_root, capsys):
    path = sweep_file(tmp_path, tiny_bert, glue_root, grid={"train.lr": [1e-3, 1e-2]}, seeds=[0, 1])
    assert run_cli("sweep", path, "--dry-run") == 0
    listed = [line.split() for line in capsys.readouterr().out.splitlines()]
    # seed-major: every point's first seed before any second, so a sweep cut short is a whole comparison
    names = ["base/lr=0.001/seed-0", "base/lr=0.01/seed-0", "base/lr=0.001/seed-1", "base/lr=0.01/seed-1"]
    assert listed == [[n, "final", "new"] for n in names]
    assert not (tmp_path / "sweep").exists()  # a dry run writes nothing

    assert run_cli("sweep", path, "--jobs", "2") == 0
    root = tmp_path / "sweep"
    for name in names:
        recipe = yaml.safe_load((root / name / "recipe.yaml").read_text())
        assert (recipe["train"]["lr"], recipe["seed"]) == ({"0.001": 1e-3, "0.01": 1e-2}[name.split("=")[1].split("/")[0]],
                                                            int(name[-1]))
        assert (root / name / "eval/results.json").is_file()
    report = (root / "report/report.md").read_text()
    assert "4 runs: 4 complete" in report and "mean ± standard deviation over seeds" in report
    capsys.readouterr()
    assert run_cli("sweep", path) == 0  # again: nothing to train
    assert capsys.readouterr().out.count("complete (skipped)") == 4

    # the records alone (no checkpoints, no weights) are enough for a fresh machine to skip the complete points
    records = tmp_path / "records"
    subprocess.run([sys.executable, RECORDS, root, records], check=True, capture_output=True)
    assert not list(records.rglob("*.safetensors")) and not (records / "report").exists()
    shutil.rmtree(root)
    subprocess.run([sys.executable, RECORDS, records, root], check=True, capture_output=True)
    assert run_cli("sweep", path) == 0
    assert capsys.readouterr().out.count("complete (skipped)") == 4
    assert "4 runs: 4 complete" in (root / "report/report.md").read_text()


def test_an_interrupted_sweep_resumes_its_points(tmp_path, tiny_bert, glue_root, monkeypatch, capsys):
    path = sweep_file(tmp_path, tiny_bert, glue_root, seeds=[0, 1])
    monkeypatch.setenv("PYTHONPATH", str(FAULTS))
    monkeypatch.setenv("SPARSETUNE_TEST_KILL", "optimizer:3")  # every point killed inside step 3
    assert run_cli("sweep", path, "--jobs", "2") == 1
    assert "2 point(s) not complete" in capsys.readouterr().err
    root = tmp_path / "sweep"
    assert all((root / f"base/default/seed-{s}/checkpoints/step-2").is_dir() for s in (0, 1))
    monkeypatch.delenv("SPARSETUNE_TEST_KILL")
    assert run_cli("sweep", path) == 0
    printed = capsys.readouterr().out
    for seed in (0, 1):
        log = (root / "logs" / f"base__default__seed-{seed}.log").read_text()
        assert "resumed from checkpoints/step-2" in log
        stages = json.loads((root / f"base/default/seed-{seed}/manifest.json").read_text())["stages"]
        assert stages["train"]["completed"]
        # the time printed is the run's, over both invocations, not only the one that finished it
        took = sum(stages[s]["wall_time_s"] for s in ("warmup", "select", "train") if s in stages)
        line = next(x for x in printed.splitlines() if x.startswith(f"| base/default/seed-{seed} | complete |"))
        assert line.endswith(f"| {took:.0f} s |")


def test_lr_selection_scores_a_training_slice_and_never_reads_dev(tmp_path, tiny_bert, glue_root, capsys):
    """The dev file is removed: selection must still complete (it reads training data only), and the final run,
    which does evaluate on dev, is the one to fail."""
    glue = tmp_path / "glue"
    shutil.copytree(glue_root / "SST-2", glue / "SST-2")
    (glue / "SST-2" / "dev.tsv").unlink()
    path = sweep_file(tmp_path, tiny_bert, glue, seeds=[3], lr_selection={"lrs": [1e-4, 5e-2], "seed": 0})
    assert run_cli("sweep", path) == 1
    root = tmp_path / "sweep"
    chosen = json.loads((root / "lr-selection.json").read_text())["base/default"]
    assert chosen["split"] == "train_holdout" and chosen["metric"] == "accuracy"
    assert set(chosen["scores"]) == {"0.0001", "0.05"} and chosen["lr"] in (1e-4, 5e-2)
    best = max(chosen["scores"], key=lambda lr: (chosen["scores"][lr], -chosen["losses"][lr]))
    assert chosen["lr"] == float(best)
    for lr in ("0.0001", "0.05"):
        results = json.loads((root / f"base/default/lr-selection/lr={lr}/eval/results.json").read_text())
        assert results["splits"] == ["train_holdout"]
    final = yaml.safe_load((root / "base/default/seed-3/recipe.yaml").read_text())
    assert (final["train"]["lr"], final["seed"], final["task"]["eval_split"]) == (chosen["lr"], 3, "dev")
    assert "dev.tsv" in (root / "logs/base__default__seed-3.log").read_text()

    # a tie on accuracy (both at the majority class, say) goes to the lower held-out loss, whichever lr is first
    config = load_sweep(path)
    for first_wins in (True, False):
        for lr, loss in (("0.0001", 0.5 if first_wins else 0.7), ("0.05", 0.6)):
            results_file = root / f"base/default/lr-selection/lr={lr}/eval/results.json"
            results = json.loads(results_file.read_text())
            results["metrics"] |= {"accuracy": 0.5, "loss": loss}
            results_file.write_text(json.dumps(results))
        assert choose_lrs(config, selection_points(config))["base/default"]["lr"] == (1e-4 if first_wins else 5e-2)


def test_a_best_at_the_edge_extends_the_grid_and_a_moved_choice_trains_again(tmp_path, tiny_bert, glue_root, capsys):
    """With `extend`, a best at an edge of the lrs tried adds one grid step beyond it; the seeds trained at the
    old choice are stale and train again at the new one."""
    lrs = [1e-4, 1e-3, 1e-2]
    path = sweep_file(tmp_path, tiny_bert, glue_root, lr_selection={"lrs": lrs})
    assert run_cli("sweep", path) == 0
    root = tmp_path / "sweep"
    first = json.loads((root / "lr-selection.json").read_text())["base/default"]["lr"]
    edge = 1e-2 if first != 1e-2 else 1e-4  # an edge the first choice was not: the choice must move
    for results_file in root.glob("base/default/lr-selection/lr=*/eval/results.json"):
        results = json.loads(results_file.read_text())
        results["metrics"]["accuracy"] = 2.0 if results_file.parts[-3] == f"lr={edge:g}" else 0.0
        results_file.write_text(json.dumps(results))
    path = sweep_file(tmp_path, tiny_bert, glue_root, lr_selection={"lrs": lrs, "extend": 1})
    capsys.readouterr()
    assert run_cli("sweep", path, "--dry-run") == 0
    beyond = 0.1 if edge == 1e-2 else 1e-5
    assert f"base/default/lr-selection/lr={beyond:g}  selection  new" in capsys.readouterr().out
    assert run_cli("sweep", path) == 0
    chosen = json.loads((root / "lr-selection.json").read_text())["base/default"]
    assert set(chosen["scores"]) == {f"{lr:g}" for lr in [*lrs, beyond]}
    assert (chosen["lr"], chosen["at_edge"]) == (edge, False)  # the step beyond scored below the faked 2.0
    assert "base/default/seed-0 | stale: trained with other settings" in capsys.readouterr().out
    assert yaml.safe_load((root / "base/default/seed-0/recipe.yaml").read_text())["train"]["lr"] == edge
    assert json.loads((root / "base/default/seed-0/manifest.json").read_text())["stages"]["train"]["completed"]


def test_lr_factors_scale_each_points_own_lr(tmp_path, tiny_bert, glue_root, capsys):
    path = sweep_file(tmp_path, tiny_bert, glue_root, lr_selection={"factors": [0.3, 3]},
                      recipes=[{"recipe": str(tmp_path / "base.yaml"), "name": "a"},
                               {"recipe": str(tmp_path / "base.yaml"), "name": "b", "overrides": ["train.lr=5e-5"]}])
    assert run_cli("sweep", path, "--dry-run") == 0
    selection = [line.split()[0] for line in capsys.readouterr().out.splitlines() if "selection" in line.split()[1:2]]
    assert selection == ["a/default/lr-selection/lr=0.0003", "a/default/lr-selection/lr=0.003",
                         "b/default/lr-selection/lr=1.5e-05", "b/default/lr-selection/lr=0.00015"]


def _recorded_selection(run_dir: Path, lr: float, accuracy: float) -> None:
    """A complete selection run as its records leave it: the recipe's lr, a finished train stage, a score."""
    (run_dir / "eval").mkdir(parents=True)
    (run_dir / "recipe.yaml").write_text(yaml.safe_dump({"task": {"name": "sst2"}, "train": {"lr": lr}}))
    (run_dir / "manifest.json").write_text(json.dumps({"stages": {"train": {"completed": True}}}))
    (run_dir / "eval/results.json").write_text(json.dumps({"metrics": {"accuracy": accuracy, "loss": 0.5}}))


def test_a_chosen_lr_starts_its_seeds_while_another_point_still_selects(tmp_path, tiny_bert, glue_root):
    """No barrier between selection and the seeds: once a grid point's lr is chosen its seeds are ready, even
    while another point's best lies at an edge and a step beyond it has yet to run."""
    path = sweep_file(tmp_path, tiny_bert, glue_root, seeds=[0, 1],
                      lr_selection={"lrs": [1e-4, 1e-3, 1e-2], "extend": 1},
                      recipes=[{"recipe": str(tmp_path / "base.yaml"), "name": "a"},
                               {"recipe": str(tmp_path / "base.yaml"), "name": "b"}])
    config = load_sweep(path)
    for name, best in (("a", 1e-3), ("b", 1e-2)):  # a's best inside its lrs, b's at the top edge
        for lr in (1e-4, 1e-3, 1e-2):
            _recorded_selection(tmp_path / f"sweep/{name}/default/lr-selection/lr={lr:g}", lr, 0.9 if lr == best else 0.6)
    ready, chosen = ready_points(config, set())
    ready = [p for p in ready if status(p, config.output_root) != "complete"]  # the runner skips those
    assert [p.name for p in ready] == ["b/default/lr-selection/lr=0.1", "a/default/seed-0", "a/default/seed-1"]
    assert (chosen["a/default"]["lr"], chosen["b/default"]["lr"]) == (1e-3, None)
    assert chosen["b/default"]["scores"] == {"0.0001": 0.6, "0.001": 0.6, "0.01": 0.9, "0.1": None}  # kept midway
    assert all("train.lr=0.001" in p.overrides for p in ready[1:])
    assert "a/default/seed-0" not in [p.name for p in ready_points(config, {"a/default/seed-0"})[0]]


def test_a_bad_sweep_file_is_one_line(tmp_path, tiny_bert, glue_root, capsys):
    path = sweep_file(tmp_path, tiny_bert, glue_root, grid={"train.lrr": [1e-3]})
    assert run_cli("sweep", path) == 2
    err = capsys.readouterr().err.strip()
    assert "train.lrr" in err and len(err.splitlines()) == 1
    path.write_text(yaml.safe_dump({"output_root": "x", "recipes": []}))
    assert run_cli("sweep", path) == 2
    assert "recipes" in capsys.readouterr().err
    path = sweep_file(tmp_path, tiny_bert, glue_root, lr_selection={"lrs": [1e-3, 1e-2], "factors": [1, 2]})
    assert run_cli("sweep", path) == 2
    assert "exactly one of lrs and factors" in capsys.readouterr().err


def test_the_shipped_sweeps_list_their_points(capsys, monkeypatch):
    """Every shipped sweep file loads with every point's recipe (run from the repository root, as documented)."""
    root = Path(__file__).resolve().parents[1]
    monkeypatch.chdir(root)
    files = sorted((root / "recipes/sweeps").glob("*.yaml"))
    assert {f.stem for f in files} >= {"glue-sst2", "glue-mrpc", "glue-rte", "glue-cola", "glue-stsb", "budget-mrpc",
                                       "alpaca-smollm2"}
    for path in files:
        assert run_cli("sweep", path.relative_to(root), "--dry-run") == 0
        points = capsys.readouterr().out.splitlines()
        assert points and {line.split()[1] for line in points} <= {"final", "selection", "after"}, path
    assert len(yaml.safe_load((root / "recipes/sweeps/budget-mrpc.yaml").read_text())["recipes"]) == 6
