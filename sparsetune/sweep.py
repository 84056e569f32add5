"""`sparsetune sweep SWEEP.yaml`: a grid of ordinary runs (recipes x overrides x seeds), resumable and parallel,
ending with `sparsetune report` over it.

Every point is a run directory under `output_root`, trained by `sparsetune train ... --resume` in its own process:
a complete point is skipped, an interrupted one continues from its newest checkpoint, so a sweep stopped at any
moment is finished by running it again. With `lr_selection`, each grid point first trains once per learning rate
scored on a held-out slice of the training data (`task.eval_split=train_holdout`: the dev files are never read),
and its seeds then run at the learning rate that scored best.

    output_root: runs/sweeps/mrpc
    overrides: [task.data_dir=../shared/data/glue/MRPC]      # every point
    recipes:
      - recipes/glue/mrpc-sift.yaml                          # folder name: the stem
      - {recipe: recipes/glue/mrpc-sift.yaml, name: random, overrides: [method.score=random]}
      - {recipe: recipes/glue/mrpc-lora.yaml, grid: {method.r: [1, 4]}}
    grid: {train.max_steps: [230]}                           # combined with each entry's own grid
    seeds: [0, 1, 2]
    lr_selection: {lrs: [1.0e-4, 1.0e-3], overrides: [train.max_steps=100]}   # optional; or factors: [0.3, 1, 3]

Points live at `<output_root>/<name>/<grid values>/seed-<s>` (selection runs under `.../lr-selection/lr=<lr>`),
logs at `<output_root>/logs/`, the chosen learning rates in `lr-selection.json`, the report in `report/`.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from queue import Queue
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from sparsetune.console import out
from sparsetune.errors import UserError
from sparsetune.recipe import load_recipe
from sparsetune.report import LOWER_IS_BETTER, RunInfo, build_report, load_run
from sparsetune.rundir import RunDir, write_json

SELECTION_FILE = "lr-selection.json"


class LrSelection(BaseModel):
    model_config = ConfigDict(extra="forbid")
    lrs: list[float] | None = Field(None, min_length=2, description="learning rates to choose from")
    factors: list[float] | None = Field(None, min_length=2, description="or multiples of each point's own lr: "
                                        "methods whose good lrs lie decades apart share one sweep")
    seed: int = Field(0, ge=0, description="the seed of the selection runs")
    extend: int = Field(0, ge=0, description="when the best lr is the largest (smallest) tried, try up to this "
                        "many more beyond it, each one grid step further: a best at the edge is not a tuned lr")
    overrides: list[str] = Field(default_factory=list, description="key=value for the selection runs only "
                                 "(e.g. fewer steps)")


class RecipeEntry(BaseModel):
    """One base recipe of the sweep, with what applies to it alone."""

    model_config = ConfigDict(extra="forbid")
    recipe: Path = Field(description="the recipe file (relative to the current folder)")
    name: str | None = Field(None, pattern=r"^[A-Za-z0-9_.+-]+$", description="its folder name; default: the file's stem")
    overrides: list[str] = Field(default_factory=list, description="key=value for this recipe's points")
    grid: dict[str, list[Any]] = Field(default_factory=dict, description="key: values combined with the sweep's grid")

    @property
    def label(self) -> str:
        return self.name or self.recipe.stem


class SweepConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    output_root: Path = Field(description="folder of the sweep's run directories, logs and report")
    recipes: list[RecipeEntry] = Field(min_length=1, description="base recipes: a path, or a mapping with recipe, "
                                       "name, overrides and grid")
    overrides: list[str] = Field(default_factory=list, description="key=value applied to every point")
    grid: dict[str, list[Any]] = Field(default_factory=dict, description="key: values; every combination is a point")
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)
    lr_selection: LrSelection | None = None

    @field_validator("recipes", mode="before")
    @classmethod
    def _paths_alone(cls, value):
        return [{"recipe": v} if isinstance(v, str) else v for v in value] if isinstance(value, list) else value

    @field_validator("lr_selection")
    @classmethod
    def _lrs_or_factors(cls, value):
        if value is not None and (value.lrs is None) == (value.factors is None):
            raise ValueError("give exactly one of lrs and factors")
        return value


@dataclass
class Point:
    """One run of the sweep: a recipe with its overrides, in its own run directory."""

    name: str  # the run directory relative to output_root
    recipe: Path
    overrides: list[str]
    selects_for: str | None = None  # a selection run: the grid point it chooses the lr of, and its lr
    lr: float | None = None

    def run_dir(self, root: Path) -> Path:
        return root / self.name


def load_sweep(path: Path) -> SweepConfig:
    if not path.is_file():
        raise UserError(f"sweep file '{path}' not found")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
        config = SweepConfig.model_validate(raw)
    except yaml.YAMLError as exc:
        raise UserError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    except UnicodeDecodeError as exc:
        raise UserError(f"{path}: not UTF-8 text (byte {exc.start})") from None
    except ValidationError as exc:
        err = exc.errors()[0]
        raise UserError(f"{path}: {'.'.join(map(str, err['loc'])) or 'the file'}: {err['msg']}") from None
    labels = [e.label for e in config.recipes]
    if len(set(labels)) < len(labels):
        raise UserError(f"{path}: recipes: two entries share the folder name "
                        f"'{next(n for n in labels if labels.count(n) > 1)}'; give one a name")
    # every point's recipe, with all its overrides (selection runs' too), must load before anything runs
    for recipe, _, overrides in grid_points(config):
        load_recipe(recipe, overrides)
    for point in selection_points(config):
        load_recipe(point.recipe, point.overrides)
    return config


def _slug(assignment: dict[str, Any]) -> str:
    return ",".join(f"{k.rsplit('.', 1)[-1]}={v}" for k, v in assignment.items()) or "default"


def _override(key: str, value: Any) -> str:
    return f"{key}={json.dumps(value) if not isinstance(value, str) else value}"


def grid_points(config: SweepConfig) -> list[tuple[Path, str, list[str]]]:
    """(recipe, point name, overrides) for every recipe and grid combination, seeds not yet applied."""
    points = []
    for entry in config.recipes:
        grid = config.grid | entry.grid
        combos = [dict(zip(grid, values)) for values in itertools.product(*grid.values())]
        points += [(entry.recipe, f"{entry.label}/{_slug(combo)}",
                    config.overrides + entry.overrides + [_override(k, v) for k, v in combo.items()])
                   for combo in combos]
    return points


def selection_points(config: SweepConfig) -> list[Point]:
    """Every grid point's selection runs: its listed lrs, then, with `extend`, one more beyond the edge each time
    the best of the complete runs so far lies at it (a step the size of the grid's outermost one)."""
    sel = config.lr_selection
    if sel is None:
        return []
    points = []
    for recipe, name, overrides in grid_points(config):
        own = load_recipe(recipe, overrides).train.lr if sel.factors else 0.0
        lrs = sel.lrs or [float(f"{f * own:.10g}") for f in sel.factors]  # 0.3 * 1e-3 is 0.0003, not ...03
        for _ in range(sel.extend):
            best = _best_lr([load_run(_selection_dir(config.output_root, name, lr)) for lr in lrs])
            low, high = sorted(lrs)[:2], sorted(lrs)[-2:]
            if best is None or low[0] < best < high[1]:
                break
            lrs = lrs + [float(f"{high[1] ** 2 / high[0] if best == high[1] else low[0] ** 2 / low[1]:.10g}")]
        points += [Point(_selection_name(name, lr), recipe, overrides + sel.overrides + [
            "task.eval_split=train_holdout", f"train.lr={lr!r}", f"seed={sel.seed}"], selects_for=name, lr=lr)
            for lr in lrs]
    return points


def _selection_name(name: str, lr: float) -> str:
    return f"{name}/lr-selection/lr={lr:g}"


def _selection_dir(root: Path, name: str, lr: float) -> Path:
    return root / _selection_name(name, lr)


def _best_lr(runs: list[RunInfo]) -> float | None:
    """The lr of the run that scored best on the held-out slice, a tie going to the lower loss there; None until
    every run is complete."""
    primary = runs[0].primary if runs else None
    if not runs or not all(r.status == "complete" and primary in r.metrics for r in runs):
        return None
    sign = -1 if primary in LOWER_IS_BETTER else 1
    # a tie on the metric (all at the majority class, say) goes to the lower held-out loss
    best = max(runs, key=lambda r: (sign * r.metrics[primary], -r.metrics.get("loss", 0.0)))
    return float(best.lr)


def final_points(config: SweepConfig, chosen: dict[str, dict]) -> list[Point]:
    """The seeds of every grid point, first seed of every point before any point's second, so a sweep stopped
    midway leaves a whole comparison at fewer seeds rather than some points at all seeds and others at none; under
    lr selection at the chosen lr (a point whose selection is not complete has none yet and is left out)."""
    ready = [(recipe, name, overrides + ([f"train.lr={chosen[name]['lr']!r}"] if config.lr_selection else []))
             for recipe, name, overrides in grid_points(config)
             if not (config.lr_selection and chosen[name]["lr"] is None)]
    return [Point(f"{name}/seed-{seed}", recipe, overrides + [f"seed={seed}"])
            for seed in config.seeds for recipe, name, overrides in ready]


def choose_lrs(config: SweepConfig, selection: list[Point]) -> dict[str, dict]:
    """Per grid point: the best lr of its selection runs (None until all are complete), whether it lies at the
    edge of the lrs tried, the metric, and every lr's score and loss."""
    chosen: dict[str, dict] = {}
    for _, name, _ in grid_points(config):
        points = [p for p in selection if p.selects_for == name]
        runs = [load_run(p.run_dir(config.output_root)) for p in points]
        primary = runs[0].primary if runs else None
        tried = [p.lr for p in points]  # a run not yet started has no recipe on disk to read it from
        lr = _best_lr(runs)
        chosen[name] = {"lr": lr, "at_edge": lr is not None and lr in (min(tried), max(tried)), "metric": primary,
                        "split": "train_holdout",
                        "scores": {f"{t:g}": r.metrics.get(primary) for t, r in zip(tried, runs)},
                        "losses": {f"{t:g}": r.metrics.get("loss") for t, r in zip(tried, runs)}}
    return chosen


def ready_points(config: SweepConfig, started: set[str]) -> tuple[list[Point], dict[str, dict]]:
    """The points not in `started` that may run now (complete ones too: the runner skips them), and the lr
    choices so far. Selection runs come first, each bringing a grid point nearer its choice; then the seeds of
    every grid point whose lr is chosen (its selection runs complete, no step beyond an edge due)."""
    selection = selection_points(config)
    chosen = choose_lrs(config, selection) if selection else {}
    return [p for p in selection + final_points(config, chosen) if p.name not in started], chosen


def status(point: Point, root: Path) -> str:
    """new, complete, incomplete, failed, or stale: trained under other settings than the point now has (a
    final seed after its grid point's chosen lr moved), so trained again from the start."""
    run_dir = point.run_dir(root)
    if not run_dir.is_dir():
        return "new"
    recipe = load_recipe(point.recipe, point.overrides + [f"output_dir={run_dir}"])
    return "stale" if RunDir(run_dir).changed_keys(recipe, recorded_only=True) else load_run(run_dir).status


class Runner:
    """Runs points as `sparsetune train --resume` subprocesses, `jobs` at a time, one device slot each, taking
    each next one from a plan asked again whenever a point ends: a grid point's seeds start as soon as its lr is
    chosen, while other points are still selecting, so no lane waits for a round to finish."""

    def __init__(self, root: Path, jobs: int) -> None:
        self.root, self.jobs = root, jobs
        self.slots: Queue[int] = Queue()
        for slot in range(jobs):
            self.slots.put(slot)
        self.gpus = _gpu_count()

    def run(self, plan: Callable[[set[str]], list[Point]]) -> None:
        """`plan(started)`: the points that may start now, most urgent first, leaving out those named in
        `started`. Each point is taken once: complete ones are skipped, stale ones trained again from the start."""
        started: set[str] = set()
        running: set[Future] = set()
        with ThreadPoolExecutor(self.jobs) as pool:
            while True:
                for point in plan(started):
                    if len(running) == self.jobs:
                        break
                    started.add(point.name)
                    state = status(point, self.root)
                    if state == "complete":
                        out.print(f"| {point.name} | complete (skipped) |", markup=False, highlight=False)
                        continue
                    if state == "stale":
                        out.print(f"| {point.name} | stale: trained with other settings; training again |",
                                  markup=False, highlight=False)
                    running.add(pool.submit(self._run_one, point, state == "stale"))
                if not running:
                    return
                done, running = wait(running, return_when=FIRST_COMPLETED)
                for future in done:
                    future.result()

    def _env(self, slot: int) -> dict[str, str]:
        env = dict(os.environ)
        if self.jobs > 1:  # share the cores; one GPU per job where there are several
            env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // self.jobs)))
            if self.gpus > 1:
                env["CUDA_VISIBLE_DEVICES"] = str(slot % self.gpus)
        return env

    def _run_one(self, point: Point, start_over: bool) -> None:
        slot = self.slots.get()
        try:
            log = self.root / "logs" / f"{point.name.replace('/', '__')}.log"
            log.parent.mkdir(parents=True, exist_ok=True)
            command = [sys.executable, "-m", "sparsetune", "train", str(point.recipe), *point.overrides,
                       f"output_dir={point.run_dir(self.root)}", "--force" if start_over else "--resume"]
            started = time.perf_counter()
            with log.open("w") as handle:
                code = subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT, env=self._env(slot)).returncode
            info = load_run(point.run_dir(self.root))
            metric = f"{info.primary}={info.metrics[info.primary]:.4f}" if info.primary in info.metrics else ""
            state = info.status if code == 0 else f"failed (exit {code}; {log})"
            # the run's own time summed over every resume, as the report shows it; this call's if none is recorded
            took = info.wall_time_s if info.wall_time_s is not None else time.perf_counter() - started
            out.print(f"| {point.name} | {state} | {metric} | {took:.0f} s |", markup=False, highlight=False)
        finally:
            self.slots.put(slot)


def _gpu_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def run_sweep(path: Path, jobs: int, dry_run: bool, measure_deltas: bool) -> int:
    """Run (or with `dry_run` list) the sweep; returns the number of final points that are not complete."""
    config = load_sweep(path)
    root = config.output_root
    selection = selection_points(config)
    if dry_run:
        chosen = choose_lrs(config, selection)
        for p in selection:
            out.print(f"{p.name}  selection  {status(p, root)}", markup=False, highlight=False)
        for _, name, _ in grid_points(config):
            if config.lr_selection and chosen[name]["lr"] is None:
                out.print(f"{name}/seed-{{{','.join(map(str, config.seeds))}}}  after selection  new", markup=False)
        for p in final_points(config, chosen):
            out.print(f"{p.name}  final  {status(p, root)}", markup=False, highlight=False)
        return 0
    runner = Runner(root, jobs)

    def plan(started: set[str]) -> list[Point]:
        todo, chosen = ready_points(config, started)
        if chosen:  # kept current, so a sweep stopped midway leaves its choices so far on disk
            write_json(root / SELECTION_FILE, chosen)
        return todo

    runner.run(plan)
    _, chosen = ready_points(config, set())
    if chosen:
        out.print(f"learning rates chosen on the held-out training slice: {root / SELECTION_FILE}")
        for name, choice in chosen.items():
            if choice["at_edge"]:
                out.print(f"[yellow]warning:[/] {name}: the best lr, {choice['lr']:g}, is the edge of those tried "
                          f"({', '.join(choice['scores'])}); widen the list or raise lr_selection.extend")
    finals = final_points(config, chosen)
    existing = [p.run_dir(root) for p in finals if p.run_dir(root).is_dir()]
    if existing:
        report = build_report(existing, root / "report", measure_deltas)
        out.print(f"report: {report}")
    expected = len(grid_points(config)) * len(config.seeds)
    return expected - sum(status(p, root) == "complete" for p in finals)
