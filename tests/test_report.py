"""`sparsetune report` on synthetic run directories (complete, stopped, crashed, not a run) and on a real one."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from sparsetune.rundir import RunDir

from conftest import run_cli

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def fake_run(root: Path, name: str, method: dict, task: str = "mrpc", metrics: dict | None = None,
             train: dict | None = None, rows: list[dict] | None = None, seed: int = 0, lr: float = 1e-3,
             max_steps: int = 40) -> Path:
    run = root / name
    (run / "eval").mkdir(parents=True)
    recipe = {"output_dir": str(run), "seed": seed, "model": {"name": "minilm-l6", "max_length": 128},
              "task": {"name": task}, "method": method, "train": {"max_steps": max_steps, "lr": lr}}
    (run / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    manifest = {"recipe_fingerprint": "x", "stages": {"train": train} if train else {}}
    (run / "manifest.json").write_text(json.dumps(manifest))
    rows = rows if rows is not None else [{"step": s, "loss": 1 / s} for s in (10, 20, 30, 40)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if metrics:
        (run / "eval/results.json").write_text(json.dumps({"metrics": metrics}))
    return run


def done(trainable: int) -> dict:
    return {"completed": True, "step": 40, "trainable": trainable, "wall_time_s": 75.0, "peak_rss_bytes": 2**30}


def report_text(pattern: str, out: Path) -> str:
    """`sparsetune report PATTERN -o OUT --no-measure-deltas`, which must succeed; its report.md."""
    assert run_cli("report", pattern, "-o", out, "--no-measure-deltas") == 0
    return (out / "report.md").read_text()


def test_report_tables_and_plots(tmp_path, capsys):
    runs = tmp_path / "runs"
    for budget, f1 in ((0.001, 0.70), (0.008, 0.80), (0.05, 0.84)):
        fake_run(runs, f"mrpc-sift-{budget}", {"name": "sift", "budget": budget}, metrics={"f1": f1, "accuracy": 0.7},
                 train=done(int(budget * 1e6)))
    sift = runs / "mrpc-sift-0.008"
    (sift / "mask").mkdir()
    (sift / "mask/mask.json").write_text(json.dumps({"per_tensor": {
        f"bert.encoder.layer.{i}.attention.self.{t}.weight": {"k": 10 * i + 1, "numel": 1000}
        for i in range(3) for t in ("query", "key")}}))
    fake_run(runs, "mrpc-stopped", {"name": "full"}, train={"completed": False, "step": 20})
    fake_run(runs, "mrpc-crashed", {"name": "lora", "r": 8}, rows=[{"step": 10, "loss": 0.9}])
    killed = fake_run(runs, "mrpc-killed", {"name": "lora", "r": 8}, rows=[{"step": s, "loss": 0.9} for s in (10, 20)])
    (killed / "checkpoints/step-10").mkdir(parents=True)  # killed before it could record a stage: resumable all the same
    importance = [{"step": s, "ist": {"drawn": [s % 4], "importance": [0.5 + 0.01 * b * s / 10 for b in range(4)]}}
                  for s in (1, 11, 21, 31)]
    on_gpu = done(1000) | {"device": "cuda:0", "dtype": "bf16", "peak_device_memory_bytes": 3 * 2**29}
    fake_run(runs, "sst2-ist", {"name": "ist", "base": {"name": "lora", "r": 8}}, task="sst2",
             metrics={"accuracy": 0.81}, train=on_gpu, rows=importance + [{"step": 40, "loss": 0.4}])
    (runs / "notes").mkdir()
    out = tmp_path / "report"

    text = report_text(f"{runs}/*", out)
    assert "7 runs: 4 complete, 2 incomplete, 1 failed" in text  # `notes` is not a run directory: not listed as one
    assert "| mrpc-stopped | incomplete: stopped at step 20; continue with --resume |" in text
    assert "| mrpc-crashed | failed: logged to step 10, no checkpoint or final state" in text
    assert "| mrpc-killed | incomplete: logged to step 20, checkpoint at step 10 (still running, or killed); " \
           "continue with --resume |" in text
    assert "| mrpc-sift-0.008 | complete | minilm-l6 | sift | 0.80% | 8,000 | 0.8000 | 0.7000 | 40 | 1 min 15 s | — | 1,024 |" in text
    assert "| 40 | 1 min 15 s | cuda:0 bf16 | 1,536 |" in text  # a GPU run: its device's own peak memory
    assert "| ist+lora | — | 0.8100 | — |" in text  # the per-task summary: no average over missing tasks
    images = {"curves-mrpc.png", "curves-sst2.png", "budget-mrpc.png", "entries-mrpc-sift-0.008.png", "ist-sst2-ist.png"}
    assert {p.name for p in out.glob("*.png")} == images
    for name in images:
        assert f"![{name}]({name})" in text
        assert (out / name).read_bytes()[:8] == PNG_MAGIC and (out / name).stat().st_size > 5000


def test_seeds_of_one_point_are_summarised_and_overlaps_called_noise(tmp_path):
    """Three points x three seeds: mean ± sample std per metric; a point whose interval overlaps the best's is
    within noise, one whose interval does not is below by the gap of the means."""
    runs = tmp_path / "runs"
    scores = {"full": [0.80, 0.84, 0.82], "sift": [0.79, 0.81, 0.77], "lora": [0.70, 0.71, 0.72]}
    for method, values in scores.items():
        for seed, f1 in enumerate(values):
            fake_run(runs, f"{method}-{seed}", {"name": method}, metrics={"f1": f1, "accuracy": f1 - 0.1},
                     train=done(1000), seed=seed)
    fake_run(runs, "zeroing-0", {"name": "zeroing", "layers": 0.5, "budget": 0.05}, metrics={"f1": 0.5, "accuracy": 0.4}, train=done(1000))  # one seed
    out = tmp_path / "report"
    text = report_text(f"{runs}/*", out)
    assert "### mrpc: mean ± standard deviation over seeds" in text
    assert "| full | — | 0.001 | 40 | 0, 1, 2 | 1 min 15 s | 0.8200 ± 0.0200 | 0.7200 ± 0.0200 | best |" in text
    assert "| sift | — | 0.001 | 40 | 0, 1, 2 | 1 min 15 s | 0.7900 ± 0.0200 | 0.6900 ± 0.0200 | within noise |" in text
    assert "| lora | — | 0.001 | 40 | 0, 1, 2 | 1 min 15 s | 0.7100 ± 0.0100 | 0.6100 ± 0.0100 | below by 0.1100 |" in text
    assert "| zeroing | 5.0% zeroed" not in text.split("over seeds")[1]  # a single-seed point has no row in the seeds table


def test_points_apart_only_in_length_show_their_steps_and_time(tmp_path):
    """IST at LoRA's steps and at LoRA's wall time: same method, budget and lr, so only the steps and the mean
    time per run tell the two rows apart."""
    runs = tmp_path / "runs"
    ist = {"name": "ist", "base": {"name": "lora", "r": 8}}
    for steps, seconds, losses in ((30, [2000.0, 2100.0], [1.64, 1.66]), (36, [2400.0, 2420.0], [1.62, 1.63])):
        for seed, (took, loss) in enumerate(zip(seconds, losses)):
            fake_run(runs, f"ist-{steps}-{seed}", ist, task="instruct", metrics={"loss": loss}, seed=seed,
                     max_steps=steps, train=done(1000) | {"step": steps, "wall_time_s": took})
    text = report_text(f"{runs}/*", tmp_path / "report").split("over seeds")[1]
    assert "| ist+lora | r=8 | 0.001 | 36 | 0, 1 | 40 min 10 s | 1.6250 ± 0.0071 | best |" in text
    assert "| ist+lora | r=8 | 0.001 | 30 | 0, 1 | 34 min 10 s | 1.6500 ± 0.0141 | above by 0.0250 |" in text


def test_summary_over_tasks_averages_each_seed_then_spreads_over_seeds(tmp_path):
    """The per-task summary: mean ± std per task, and the average over tasks as each seed's average, then mean ±
    std over seeds (seed 0: (0.80 + 0.60) / 2 = 0.70, seed 1: 0.74, seed 2: 0.72), not the spread of the tasks."""
    runs = tmp_path / "runs"
    scores = {("mrpc", "f1"): [0.80, 0.84, 0.82], ("sst2", "accuracy"): [0.60, 0.64, 0.62]}
    for (task, metric), values in scores.items():
        for seed, value in enumerate(values):
            fake_run(runs, f"{task}-sift-{seed}", {"name": "sift", "budget": 0.008}, task=task,
                     metrics={metric: value}, train=done(1000), seed=seed)
    fake_run(runs, "mrpc-lora-0", {"name": "lora", "r": 3}, metrics={"f1": 0.5}, train=done(1000))
    for name, task, metric, value in (("mrpc-random-a", "mrpc", "f1", 0.70), ("mrpc-random-b", "mrpc", "f1", 0.74),
                                      ("sst2-random", "sst2", "accuracy", 0.60)):  # two budgets, one seed: both count
        fake_run(runs, name, {"name": "sift", "score": "random", "budget": 0.008}, task=task, metrics={metric: value},
                 train=done(1000))
    out = tmp_path / "report"
    text = report_text(f"{runs}/*", out)
    assert "| sift | 0.8200 ± 0.0200 | 0.6200 ± 0.0200 | 0.7200 ± 0.0200 |" in text
    assert "| lora | 0.5000 | — | — |" in text
    assert "| random-sparse | 0.7200 ± 0.0283 | 0.6000 | 0.6600 |" in text


def test_budget_curve_averages_seeds_and_lets_each_count_have_its_own_lr(tmp_path):
    """A swept budget curve: each count at its selected lr, three seeds each, is one curve of two points; a
    second lr at one count (a grid over lrs, not a selection) splits the curve by lr instead of mixing them."""
    from sparsetune.report import budget_curves, load_run

    def sift(name: str, budget: int, lr: float, seed: int) -> Path:
        return fake_run(tmp_path, name, {"name": "sift", "budget": budget}, metrics={"f1": 0.8}, train=done(budget),
                        seed=seed, lr=lr)

    selected = [sift(f"b{budget}-s{seed}", budget, lr, seed)
                for budget, lr in ((1000, 3e-3), (100000, 1e-3)) for seed in range(3)]
    curves = budget_curves([load_run(p) for p in selected])
    assert [{count: len(seeds) for count, seeds in c.items()} for c in curves] == [{1000: 3, 100000: 3}]

    gridded = selected + [sift(f"b1000-lr-s{seed}", 1000, 1e-3, seed) for seed in range(3)]
    curves = budget_curves([load_run(p) for p in gridded])
    assert [{count: len(seeds) for count, seeds in c.items()} for c in curves] == [{1000: 3, 100000: 3}]
    assert {r.recipe["train"]["lr"] for c in curves for seeds in c.values() for r in seeds} == {1e-3}


def test_runs_with_equal_folder_names_get_distinct_rows_and_images(tmp_path):
    """A sweep's runs are all called seed-N: each is labelled by its path below the common folder, so neither
    the table rows nor the heatmaps of two points collide."""
    root = tmp_path / "sweep"
    for point in ("mrpc-sift", "mrpc-random"):
        run = fake_run(root / point / "default", "seed-0", {"name": "sift", "budget": 0.008}, metrics={"f1": 0.8},
                       train=done(8000))
        (run / "mask").mkdir()
        (run / "mask/mask.json").write_text(json.dumps({"per_tensor": {
            f"bert.encoder.layer.{i}.attention.self.query.weight": {"k": i + 1, "numel": 100} for i in range(2)}}))
    out = tmp_path / "report"
    text = report_text(f"{root}/*/*/*", out)
    assert "| mrpc-sift/default/seed-0 | complete |" in text and "| mrpc-random/default/seed-0 | complete |" in text
    images = {"entries-mrpc-sift-default-seed-0.png", "entries-mrpc-random-default-seed-0.png"}
    assert images <= {p.name for p in out.glob("*.png")}
    assert all(text.count(f"![{name}]") == 1 for name in images)


def test_report_of_real_run_measures_and_records_delta(bert_recipe, tmp_path, capsys):
    assert run_cli("train", bert_recipe({"name": "lora", "r": 2}, max_steps=2)) == 0
    run = tmp_path / "run"
    assert run_cli("report", run, "-o", tmp_path / "report") == 0
    delta = RunDir(run).manifest()["delta"]
    assert delta["format"] == "peft" and delta["bytes"] > 0
    assert f"| {delta['bytes']:,} |" in (tmp_path / "report/report.md").read_text()


def test_report_of_missing_directory_is_one_line(tmp_path, capsys):
    assert run_cli("report", tmp_path / "nope", "-o", tmp_path / "out") == 2
    assert "RUN_DIR: " in capsys.readouterr().err and not (tmp_path / "out").exists()
