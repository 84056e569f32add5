"""Keep a sweep's results without its run directories, and bring them back.

A run directory is mostly checkpoints and weights; what `sparsetune report` and the sweep's skip rule read is four
small files per run (recipe.yaml, manifest.json, metrics.jsonl, eval/results.json, the mask's JSON) plus the sweep's
lr-selection.json. This copies those of every complete run from a sweep's output root into a records folder
(docs/results/sweeps/ holds the evidence behind docs/RESULTS.md), and the same command the other way brings them
back, so `sparsetune sweep` on a fresh machine counts the recorded points as complete and runs only the rest:

    python scripts/sweep_records.py runs/sweeps/glue-mrpc docs/results/sweeps/glue-mrpc    # keep
    python scripts/sweep_records.py docs/results/sweeps/glue-mrpc runs/sweeps/glue-mrpc    # bring back

Only complete runs are saved: an interrupted one is resumed from its checkpoint, which a record does not hold.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from sparsetune.report import load_run

# what report reads: the mask summaries too, where a method has them
RECORD_FILES = ("recipe.yaml", "manifest.json", "metrics.jsonl", "eval/results.json", "mask/mask.json",
                "mask/selection.json")
SWEEP_FILES = ("lr-selection.json",)


def complete_runs(root: Path) -> list[Path]:
    return sorted(p.parent for p in root.rglob("recipe.yaml") if load_run(p.parent).status == "complete")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path)
    parser.add_argument("dest", type=Path)
    args = parser.parse_args()
    if not args.source.is_dir():
        parser.exit(2, f"error: '{args.source}' is not a folder\n")
    runs = complete_runs(args.source)
    files = [run / name for run in runs for name in RECORD_FILES if (run / name).is_file()]
    files += [args.source / name for name in SWEEP_FILES if (args.source / name).is_file()]
    for f in files:
        target = args.dest / f.relative_to(args.source)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(f, target)
    print(f"{len(runs)} complete runs from {args.source} to {args.dest}")


if __name__ == "__main__":
    main()
