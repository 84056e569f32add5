"""`sparsetune report`: runs side by side — one markdown table per task and PNG plots.

Reads only what runs wrote (recipe.yaml, manifest.json, metrics.jsonl, eval/results.json, mask files), so a
failed or unfinished run is shown with its state instead of being skipped. Delta sizes come from the manifest
(`export-delta` records them) and are measured by exporting to a temporary folder when missing.
"""

from __future__ import annotations

import glob
import json
import os
import statistics
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never a window
import matplotlib.pyplot as plt  # noqa: E402
import yaml  # noqa: E402

from sparsetune.data import TASKS  # noqa: E402
from sparsetune.errors import UserError  # noqa: E402
from sparsetune.rundir import RunDir, atomic_path, read_json  # noqa: E402

# What may differ between the points of one budget curve; `grad` only picks how SIFT computes the same gradient.
BUDGET_KEYS = ("budget", "r", "alpha", "grad")


@dataclass
class RunInfo:
    """What the report knows about one run directory."""

    path: Path
    status: str = "failed"  # complete | incomplete | failed
    note: str = ""
    recipe: dict = field(default_factory=dict)
    manifest: dict = field(default_factory=dict)
    rows: list[dict] = field(default_factory=list)
    metrics: dict = field(default_factory=dict)
    label: str = ""  # set by the report: unique among its runs (a sweep's runs are all called seed-N)

    @property
    def name(self) -> str:
        return self.label or self.path.name

    @property
    def file_stem(self) -> str:
        return self.name.replace("/", "-")

    @property
    def task(self) -> str:
        return self.recipe.get("task", {}).get("name", "?")

    @property
    def method(self) -> str:
        """The method as a reader names it: ist+lora, random-sparse, dense-critical, ..."""
        m = self.recipe.get("method", {})
        name = m.get("name", "?")
        if name == "ist":
            return f"ist+{m.get('base', {}).get('name', '?')}"
        if name == "sift" and m.get("score") in ("random", "magnitude"):
            return f"{m['score']}-sparse"
        if name == "zeroing" and m.get("mode") == "dense-critical":
            return "dense-critical"
        return name

    @property
    def budget(self) -> str:
        m = self.recipe.get("method", {})
        m = m.get("base", m) if m.get("name") == "ist" else m
        if m.get("name") == "zeroing":
            layers = m.get("layers")
            blocks = f"{layers:g} blocks" if layers >= 1 else f"{layers:.0%} of blocks"
            return blocks if m.get("mode") == "dense-critical" else f"{m['budget']:.1%} zeroed, {blocks}"
        if "budget" in m:
            return f"{m['budget']:.2%}" if m["budget"] < 1 else f"{int(m['budget']):,} entries"
        if "r" in m:
            return f"r={m['r']}"
        return "—"

    @property
    def train(self) -> dict:
        return self.manifest.get("stages", {}).get("train", {})

    @property
    def lr(self) -> float | None:
        return self.recipe.get("train", {}).get("lr")

    @property
    def wall_time_s(self) -> float | None:
        """Warm-up, selection and training together (evaluation not included)."""
        stages = self.manifest.get("stages", {})
        if "wall_time_s" not in self.train:
            return None
        return sum(stages.get(s, {}).get("wall_time_s", 0.0) for s in ("warmup", "select", "train"))

    @property
    def trainable(self) -> int | None:
        return self.train.get("trainable")

    @property
    def primary(self) -> str | None:
        spec = TASKS.get(self.task)
        return spec.metrics[0] if spec else None

    def evals(self) -> list[tuple[int, dict]]:
        """(step, dev metrics) during training, then the final evaluation at the last step."""
        points = [(r["step"], r["eval"]) for r in self.rows if "eval" in r]
        if self.metrics and self.train.get("step"):
            points.append((self.train["step"], self.metrics))
        return points


def load_run(path: Path) -> RunInfo:
    info = RunInfo(path)
    if not (path / "recipe.yaml").is_file():
        info.note = "not a run directory (no recipe.yaml)"
        return info
    try:
        info.recipe = yaml.safe_load((path / "recipe.yaml").read_text()) or {}
        info.manifest = read_json(path / "manifest.json") if (path / "manifest.json").is_file() else {}
        if (path / "metrics.jsonl").is_file():
            info.rows = [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines() if line]
        results = path / "eval" / "results.json"
        info.metrics = read_json(results)["metrics"] if results.is_file() else {}
    except (OSError, ValueError, KeyError, yaml.YAMLError) as exc:
        info.note = f"unreadable: {exc}"
        return info
    last = max((r["step"] for r in info.rows if "loss" in r), default=0)
    if info.train.get("completed") and info.metrics:
        info.status = "complete"
    elif info.train.get("completed"):
        info.status, info.note = "incomplete", "trained; not evaluated (run `sparsetune eval`)"
    elif info.train:
        info.status, info.note = "incomplete", f"stopped at step {info.train.get('step')}; continue with --resume"
    elif checkpoints := RunDir(path).checkpoint_steps():  # killed (or still running): nothing recorded, but resumable
        info.status, info.note = "incomplete", (f"logged to step {last}, checkpoint at step {checkpoints[-1]} (still "
                                                f"running, or killed); continue with --resume")
    elif last:
        info.note = f"logged to step {last}, no checkpoint or final state (still running, crashed or killed)"
    else:
        info.note = "no training recorded"
    return info


def delta_bytes(info: RunInfo, measure: bool) -> int | None:
    """The size of the method's own export of final/: recorded by export-delta, else measured now."""
    recorded = info.manifest.get("delta", {})
    if recorded.get("recipe_fingerprint") == info.manifest.get("recipe_fingerprint") and "bytes" in recorded:
        return recorded["bytes"]
    if not measure or info.status != "complete" or not (info.path / "final").is_dir():
        return None
    from sparsetune.train import export_run  # loads torch and the model; only when needed

    with tempfile.TemporaryDirectory() as tmp:
        return export_run(RunDir(info.path), Path(tmp) / "export", "auto")


# --- plots --------------------------------------------------------------------------------------
def _save(fig, path: Path) -> str:
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return path.name


def plot_curves(task: str, runs: list[RunInfo], out: Path) -> str | None:
    """Training loss and the primary dev metric against step, one line per run."""
    runs = [r for r in runs if any("loss" in row for row in r.rows)]
    if not runs:
        return None
    fig, (loss_ax, dev_ax) = plt.subplots(1, 2, figsize=(12, 4.5))
    primary = runs[0].primary or "metric"
    points = [[(s, m[r.primary]) for s, m in r.evals() if r.primary in m] for r in runs]
    # one colour per sweep point, one dash per seed: 21 runs of 7 methods stay readable
    keys = list(dict.fromkeys(_point_key(r) for r in runs))
    colours = [f"C{keys.index(_point_key(r)) % 10}" for r in runs]
    dashes = [("-", "--", ":", "-.")[[q for q in runs if _point_key(q) == _point_key(r)].index(r) % 4] for r in runs]
    for r, colour, dash in zip(runs, colours, dashes):
        steps = [row["step"] for row in r.rows if "loss" in row]
        loss_ax.plot(steps, [row["loss"] for row in r.rows if "loss" in row], label=r.name, linewidth=1.2,
                     color=colour, linestyle=dash)
    if all(len(p) <= 1 for p in points):  # one evaluation per run: a line would be a single dot
        finals = [(index, p[0][1]) for index, p in enumerate(points) if p]
        dev_ax.barh(range(len(finals)), [value for _, value in finals], color=[colours[i] for i, _ in finals])
        dev_ax.set_yticks(range(len(finals)), [runs[i].name for i, _ in finals])
        for y, (_, value) in enumerate(finals):
            dev_ax.annotate(f"{value:.4f}", (value, y), xytext=(3, 0), textcoords="offset points", va="center",
                            fontsize=8)
        dev_ax.invert_yaxis()
        dev_ax.set(title=f"{task}: final dev {primary}", xlabel=primary)
    else:
        for r, p, colour, dash in zip(runs, points, colours, dashes):
            if p:
                dev_ax.plot(*zip(*p), marker="o", label=r.name, linewidth=1.2, color=colour, linestyle=dash)
        dev_ax.set(title=f"{task}: dev {primary}", xlabel="optimizer step", ylabel=primary)
    loss_ax.set(title=f"{task}: training loss", xlabel="optimizer step", ylabel="loss")
    for ax in (loss_ax, dev_ax):
        ax.grid(alpha=0.3)
    loss_ax.legend(fontsize=7, loc="best")
    return _save(fig, out / f"curves-{task}.png")


def plot_entries(run: RunInfo, out: Path) -> str | None:
    """Trainable (SIFT) or zeroed (layer-zeroing) entries per block and tensor, as a heatmap."""
    counts: dict[str, int] = {}
    if (run.path / "mask/mask.json").is_file():
        counts = {n: c["k"] for n, c in read_json(run.path / "mask/mask.json")["per_tensor"].items()}
        what = "trained entries"
    elif (run.path / "mask/selection.json").is_file() and run.method == "zeroing":
        budget = run.recipe["method"]["budget"]
        counts = {n: round(budget * numel) for n, numel in read_json(run.path / "mask/selection.json")["tensors"].items()}
        what = "zeroed entries"
    if not counts:
        return None
    cells: dict[tuple[int, str], int] = {}
    for name, count in counts.items():
        parts = name.split(".")
        index = next((i for i, p in enumerate(parts) if p.isdigit()), None)
        if index is None:
            continue
        cells[(int(parts[index]), ".".join(parts[index + 1:]))] = count
    blocks = sorted({b for b, _ in cells})
    tensors = sorted({t for _, t in cells})
    first, last = blocks[0], blocks[-1]
    grid = [[cells.get((b, t), 0) for t in tensors] for b in range(first, last + 1)]
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(tensors), 1.2 + 0.35 * len(grid)))
    image = ax.imshow(grid, aspect="auto", cmap="viridis")
    ax.set_xticks(range(len(tensors)), tensors, rotation=45, ha="right", fontsize=7)
    ax.set_yticks(range(len(grid)), [str(b) for b in range(first, last + 1)], fontsize=7)
    ax.set(title=f"{run.name}: {what}", xlabel="tensor", ylabel="block")
    fig.colorbar(image, ax=ax, label=what)
    return _save(fig, out / f"entries-{run.file_stem}.png")


def plot_ist(run: RunInfo, out: Path) -> str | None:
    """IST importance (sampling weight sigmoid(-s)) of every block against step."""
    points = [(row["step"], row["ist"]["importance"]) for row in run.rows if "importance" in row.get("ist", {})]
    if not points:
        return None
    steps = [s for s, _ in points]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for block in range(len(points[0][1])):
        ax.plot(steps, [v[block] for _, v in points], label=f"block {block}", linewidth=1)
    ax.set(title=f"{run.name}: IST importance", xlabel="optimizer step", ylabel="importance = sigmoid(-score)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=max(1, len(points[0][1]) // 10), loc="best")
    return _save(fig, out / f"ist-{run.file_stem}.png")


def _recipe_key(run: RunInfo, top: tuple[str, ...] = ("output_dir",), method: tuple[str, ...] = (),
                train: tuple[str, ...] = ()) -> str:
    """The recipe without the `top` keys, the `method` keys (IST's base's too) and the `train` keys: runs with
    equal keys differ only in those."""
    recipe = json.loads(json.dumps(run.recipe, default=str))
    for key in top:
        recipe.pop(key, None)
    for section in (recipe.get("method", {}), recipe.get("method", {}).get("base", {})):
        if isinstance(section, dict):
            for key in method:
                section.pop(key, None)
    for key in train:
        recipe.get("train", {}).pop(key, None)
    return json.dumps(recipe, sort_keys=True)


def budget_curves(runs: list[RunInfo]) -> list[dict[int, list[RunInfo]]]:
    """The budget curves among complete runs: runs that differ only in budget, seed and lr are one curve, whose
    points are its trainable counts, each holding its seeds. The lr may differ between counts (a sweep selects
    one per count) but not within one: a curve with two lrs at one count is split by lr."""
    groups: dict[str, list[RunInfo]] = {}
    for r in runs:
        if r.status == "complete" and r.trainable and r.primary in r.metrics:
            key = _recipe_key(r, top=("output_dir", "seed"), method=BUDGET_KEYS, train=("lr",))
            groups.setdefault(key, []).append(r)
    curves = []
    for members in groups.values():
        lrs_at: dict[int, set] = {}
        for r in members:
            lrs_at.setdefault(r.trainable, set()).add(r.lr)
        split = any(len(lrs) > 1 for lrs in lrs_at.values())
        by_lr: dict = {}
        for r in members:
            by_lr.setdefault(r.lr if split else None, []).append(r)
        for part in by_lr.values():
            points: dict[int, list[RunInfo]] = {}
            for r in sorted(part, key=lambda r: r.trainable):
                points.setdefault(r.trainable, []).append(r)
            if len(points) > 1:
                curves.append(points)
    return curves


def plot_budget(task: str, runs: list[RunInfo], out: Path) -> str | None:
    """Primary metric against trainable entries (log scale), one line per budget curve: each point the mean over
    its seeds, with a bar of one standard deviation where there are several."""
    curves = budget_curves(runs)
    if not curves:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for index, points in enumerate(curves):  # distinct markers and dashes keep equal curves visible
        stats = [mean_std([r.metrics[r.primary] for r in seeds]) for seeds in points.values()]
        first = next(iter(points.values()))[0]
        ax.errorbar(list(points), [m for m, _ in stats], yerr=[s for _, s in stats], label=first.method,
                    marker="os^vDP"[index % 6], linestyle=("-", "--", ":", "-.")[index % 4],
                    markersize=(8, 6.5, 5)[index % 3], capsize=3, alpha=0.85)
    primary = runs[0].primary
    ax.set_xscale("log")
    ax.set(title=f"{task}: dev {primary} against trainable entries", xlabel="trainable entries (log scale)",
           ylabel=f"{primary} (mean ± std over seeds)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    return _save(fig, out / f"budget-{task}.png")


# --- the report ---------------------------------------------------------------------------------
def _fmt_seconds(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    minutes, secs = divmod(round(seconds), 60)
    return f"{minutes} min {secs:02d} s" if minutes else f"{secs} s"


def _fmt(value, spec: str = ",") -> str:
    return "—" if value is None else format(value, spec)


def _table(runs: list[RunInfo], sizes: dict[Path, int | None]) -> list[str]:
    metric_names = list(dict.fromkeys(k for r in runs for k in r.metrics))
    header = ["run", "status", "model", "method", "budget", "trainable", *metric_names, "steps", "time", "device",
              "peak memory (MiB)", "delta bytes"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in runs:
        # a GPU's own peak where there is one (its RSS is only the host side), else the process's peak RSS
        peak = r.train.get("peak_device_memory_bytes") or r.train.get("peak_rss_bytes")
        device = " ".join(str(r.train[k]) for k in ("device", "dtype") if r.train.get(k)) or "—"
        status = r.status if not r.note else f"{r.status}: {r.note}"
        cells = [r.name, status, str(r.recipe.get("model", {}).get("name", "?")), r.method, r.budget,
                 _fmt(r.trainable), *[_fmt(r.metrics.get(k), ".4f") for k in metric_names],
                 _fmt(r.train.get("step")), _fmt_seconds(r.wall_time_s), device,
                 _fmt(None if peak is None else round(peak / 2**20)), _fmt(sizes.get(r.path))]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return lines


def _mean_row(runs: list[RunInfo]) -> list[str]:
    """Per method, each task's primary metric as mean ± std over its runs, and their average over tasks when the
    method completed every task: with the same seeds on every task, each seed's average over the tasks, then mean
    ± std of those, so the spread is the seeds' and not the tasks'."""
    tasks = sorted({r.task for r in runs})
    values: dict[str, dict[str, dict[object, list[float]]]] = {}
    for r in runs:
        if r.status == "complete" and r.primary in r.metrics:
            per_seed = values.setdefault(r.method, {}).setdefault(r.task, {})
            per_seed.setdefault(r.recipe.get("seed"), []).append(r.metrics[r.primary])

    def cell(scores: list[float]) -> str:
        mean, std = mean_std(scores)
        return f"{mean:.4f} ± {std:.4f}" if len(scores) > 1 else f"{mean:.4f}"

    def every(per_seed: dict[object, list[float]]) -> list[float]:
        return [v for vs in per_seed.values() for v in vs]

    lines = ["| method | " + " | ".join(tasks) + " | average |", "|" + "---|" * (len(tasks) + 2)]
    for method, per_task in sorted(values.items()):
        cells = [cell(every(per_task[t])) if t in per_task else "—" for t in tasks]
        average = "—"
        if len(per_task) == len(tasks):
            seed_sets = {frozenset(per_seed) for per_seed in per_task.values()}
            if len(seed_sets) == 1:  # the same seeds on every task
                scores = [statistics.fmean(statistics.fmean(per_task[t][s]) for t in tasks)
                          for s in sorted(seed_sets.pop(), key=str)]
            else:
                scores = [statistics.fmean(statistics.fmean(every(per_task[t])) for t in tasks)]
            average = cell(scores)
        lines.append(f"| {method} | " + " | ".join(cells) + f" | {average} |")
    return lines


LOWER_IS_BETTER = frozenset({"loss", "perplexity"})


def _point_key(run: RunInfo) -> str:
    """Runs with equal keys differ only in seed: one point of a sweep."""
    return _recipe_key(run, top=("output_dir", "seed"))


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def _seed_table(runs: list[RunInfo]) -> list[str]:
    """Per point with several complete seeds: each metric's mean ± std, and the primary metric against the best
    point's: `within noise` when the mean ± std intervals overlap."""
    points: dict[str, list[RunInfo]] = {}
    for r in runs:
        if r.status == "complete" and r.primary in r.metrics:
            points.setdefault(_point_key(r), []).append(r)
    points = {k: v for k, v in points.items() if len(v) > 1}
    if not points:
        return []
    primary = next(iter(points.values()))[0].primary
    metric_names = list(dict.fromkeys(k for group in points.values() for r in group for k in r.metrics))
    stats = {k: {m: mean_std([r.metrics[m] for r in group if m in r.metrics]) for m in metric_names
                 if any(m in r.metrics for r in group)} for k, group in points.items()}
    sign = -1 if primary in LOWER_IS_BETTER else 1
    best = max(stats, key=lambda k: sign * stats[k][primary][0])
    low, high = stats[best][primary][0] - stats[best][primary][1], stats[best][primary][0] + stats[best][primary][1]
    # steps and time tell apart points of one method, budget and lr: equal steps against equal wall time, say
    header = ["method", "budget", "lr", "steps", "seeds", "time per run", *metric_names, f"{primary} vs best"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for key, group in sorted(points.items(), key=lambda item: -sign * stats[item[0]][primary][0]):
        mean, std = stats[key][primary]
        verdict = ("best" if key == best else "within noise" if mean - std <= high and mean + std >= low
                   else f"{'below' if sign > 0 else 'above'} by {abs(mean - stats[best][primary][0]):.4f}")
        steps = sorted({r.train.get("step") for r in group if r.train.get("step") is not None})
        times = [r.wall_time_s for r in group if r.wall_time_s is not None]
        cells = [group[0].method, group[0].budget, _fmt(group[0].lr, "g"),
                 "—" if not steps else f"{steps[0]:,}" if len(steps) == 1 else f"{steps[0]:,}–{steps[-1]:,}",
                 ", ".join(str(r.recipe.get("seed", "?")) for r in group),
                 _fmt_seconds(statistics.fmean(times)) if times else "—",
                 *[f"{stats[key][m][0]:.4f} ± {stats[key][m][1]:.4f}" if m in stats[key] else "—" for m in metric_names],
                 verdict]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def label_runs(runs: list[RunInfo]) -> None:
    """Name each run by its path below the runs' common folder: `mrpc-sift/default/seed-0` in a sweep, where the
    folder names alone repeat."""
    if len(runs) > 1:
        common = Path(os.path.commonpath([r.path.resolve().parent for r in runs]))
        for r in runs:
            r.label = r.path.resolve().relative_to(common).as_posix()


def build_report(paths: list[Path], out: Path, measure_deltas: bool = True) -> Path:
    """Write out/report.md and its PNGs for the given run directories; returns the markdown path."""
    runs = [load_run(p) for p in paths]
    label_runs(runs)
    out.mkdir(parents=True, exist_ok=True)
    sizes = {r.path: delta_bytes(r, measure_deltas) for r in runs}
    lines = ["# sparsetune report", "", f"{len(runs)} runs: "
             + ", ".join(f"{sum(r.status == s for r in runs)} {s}" for s in ("complete", "incomplete", "failed")), ""]
    tasks = list(dict.fromkeys(r.task for r in runs))
    if len(tasks) > 1:
        lines += ["## Primary dev metric per task", "", *_mean_row(runs), ""]
    for task in tasks:
        group = [r for r in runs if r.task == task]
        lines += [f"## {task}", "", *_table(group, sizes), "",
                  "time: warm-up, selection and training (evaluation not included); peak memory: the process's "
                  "peak RSS during training; delta bytes: the method's own export of final/.", ""]
        if seeds := _seed_table(group):
            lines += [f"### {task}: mean ± standard deviation over seeds", "", *seeds, "",
                      "Runs that differ only in seed are one point; a point is within noise of the best when their "
                      "mean ± std intervals overlap.", ""]
        for image in (plot_curves(task, group, out), plot_budget(task, group, out)):
            if image:
                lines += [f"![{image}]({image})", ""]
        for r in group:
            for image in (plot_entries(r, out), plot_ist(r, out)):
                if image:
                    lines += [f"![{image}]({image})", ""]
    report = out / "report.md"
    with atomic_path(report) as tmp:
        tmp.write_text("\n".join(lines))
    return report


def expand(patterns: list[str]) -> list[Path]:
    """Run directories from paths or globs (a quoted glob works too), in the given order, without duplicates.

    A glob keeps only folders with a recipe.yaml (every run writes it first, so a run that failed has one); a
    named folder must be a run directory.
    """
    found: list[Path] = []
    for pattern in patterns:
        if any(c in pattern for c in "*?["):
            matches = [Path(m) for m in sorted(glob.glob(pattern)) if (Path(m) / "recipe.yaml").is_file()]
            if not matches:
                raise UserError(f"RUN_DIR: '{pattern}' matches no run directory")
        elif not Path(pattern).is_dir():
            raise UserError(f"RUN_DIR: '{pattern}' is not a directory")
        elif not (Path(pattern) / "recipe.yaml").is_file():
            raise UserError(f"RUN_DIR: '{pattern}' is not a sparsetune run directory (no recipe.yaml)")
        else:
            matches = [Path(pattern)]
        found += [m for m in matches if m.is_dir() and m not in found]
    return found
