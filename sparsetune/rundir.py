"""Run-directory layout, atomic writes, and the manifest that lets each stage refuse stale inputs."""

from __future__ import annotations

import functools
import hashlib
import json
import os
import platform
import re
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Any

import yaml
from safetensors.torch import save_file

from sparsetune import __version__
from sparsetune.distributed import world
from sparsetune.errors import UserError
from sparsetune.recipe import Recipe, build_recipe

TRAIN_OUTPUTS = ("checkpoints", "final", "metrics.jsonl", "eval")
CHECKSUMS = "checksums.json"
_STEP_DIR = re.compile(r"step-(\d+)$")


def package_versions() -> dict[str, str]:
    names = ("torch", "transformers", "peft", "datasets", "safetensors", "numpy")
    versions = {"python": platform.python_version(), "sparsetune": __version__}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary sibling to write (a file or a folder); it replaces `path` only on success."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    _remove(tmp)
    try:
        yield tmp
        _remove(path)
        os.replace(tmp, path)
    finally:
        _remove(tmp)


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _writer_only(method: Callable[..., None]) -> Callable[..., None]:
    """A RunDir write that does nothing on ranks other than the writer (rank 0)."""

    @functools.wraps(method)
    def write(self: RunDir, *args: Any, **kwargs: Any) -> None:
        if self.writer:
            method(self, *args, **kwargs)

    return write


def write_json(path: Path, data: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")


def read_json(path: Path) -> Any:
    return json.loads(path.read_text())


class RunDir:
    """One run's folder. Stages read what earlier stages wrote, checked by recipe fingerprints.

    Under torchrun only rank 0 is its `writer`: on the other ranks every write below does nothing, and they read
    what rank 0 wrote after a barrier (`open` and each stage end with one).
    """

    def __init__(self, root: Path | str, writer: bool | None = None):
        self.root = Path(root)
        self.writer = world().is_main if writer is None else writer

    recipe_path = property(lambda self: self.root / "recipe.yaml")
    manifest_path = property(lambda self: self.root / "manifest.json")
    metrics_path = property(lambda self: self.root / "metrics.jsonl")
    checkpoints = property(lambda self: self.root / "checkpoints")
    final = property(lambda self: self.root / "final")
    eval_dir = property(lambda self: self.root / "eval")

    def stage_dir(self, stage: str) -> Path:
        """Where a stage writes: warm-up into warmup/, selection into mask/."""
        return self.root / {"select": "mask"}.get(stage, stage)

    # --- the recipe and manifest --------------------------------------------------------------
    def load_recipe(self) -> Recipe:
        if not self.recipe_path.is_file():
            raise UserError(f"'{self.root}' is not a sparsetune run directory (no recipe.yaml)")
        return build_recipe(yaml.safe_load(self.recipe_path.read_text()), str(self.recipe_path))

    def manifest(self) -> dict:
        return read_json(self.manifest_path) if self.manifest_path.is_file() else {}

    def open(self, recipe: Recipe) -> None:
        """Create or re-enter the run directory for `recipe`, saving the resolved recipe and manifest."""
        if self.root.exists() and not self.root.is_dir():
            raise UserError(f"output_dir: '{self.root}' exists and is a file; expected a directory (or a new path)")
        parent = next((p for p in (self.root, *self.root.parents) if p.exists()), Path("."))
        if not os.access(parent, os.W_OK | os.X_OK):
            raise UserError(f"output_dir: '{self.root}' cannot be written ('{parent}' is not a writable folder)")
        if self.root.exists() and any(self.root.iterdir()) and not self.recipe_path.is_file():
            raise UserError(f"output_dir: '{self.root}' is not empty and is not a sparsetune run directory")
        if self.has_training_outputs() and (changed := self.changed_keys(recipe)):
            raise UserError(f"output_dir '{self.root}' holds a training run of another recipe: the recipe changed "
                            f"({', '.join(changed)}); use another output_dir, or train --force to start over")
        self._write_recipe(recipe)
        world().barrier()

    @_writer_only
    def _write_recipe(self, recipe: Recipe) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        with atomic_path(self.recipe_path) as tmp:
            tmp.write_text(recipe.to_yaml())
        manifest = self.manifest()
        manifest.setdefault("created", time.strftime("%Y-%m-%dT%H:%M:%S%z"))
        manifest.update(seed=recipe.seed, versions=package_versions(), recipe_fingerprint=recipe.fingerprint(),
                        trust_remote_code=recipe.model.trust_remote_code)
        manifest.setdefault("stages", {})
        write_json(self.manifest_path, manifest)

    @_writer_only
    def update_manifest(self, **entries: Any) -> None:
        write_json(self.manifest_path, self.manifest() | entries)

    @_writer_only
    def save_tensors(self, relative: str, tensors: dict) -> None:
        """Write a safetensors file under the run (atomically; CPU tensors)."""
        with atomic_path(self.root / relative) as tmp:
            save_file({n: t.detach().cpu().contiguous() for n, t in tensors.items()}, str(tmp))

    @_writer_only
    def save_json(self, relative: str, data: Any) -> None:
        write_json(self.root / relative, data)

    @_writer_only
    def record_stage(self, stage: str, fingerprint: str, **info: Any) -> None:
        manifest = self.manifest()
        manifest.setdefault("stages", {})[stage] = {"fingerprint": fingerprint, **info}
        write_json(self.manifest_path, manifest)

    def check_stage(self, stage: str, fingerprint: str, world_size: int | None = None) -> bool:
        """True when `stage` was completed for this fingerprint (and, when given, this many processes, since its
        batches held `batch_size x world size` examples); a stale result is an error. Reading a finished run
        (eval, export) accepts a stage from any world size."""
        done = self.manifest().get("stages", {}).get(stage)
        if done is None:
            return False
        if world_size is not None and (saved := done.get("world_size", 1)) != world_size:
            raise UserError(
                f"{self.root}: the {stage} stage was computed on {saved} process(es), whose batches hold "
                f"batch_size x {saved} examples, and this run has {world_size}: launch it the same way "
                f"({'without --nproc' if saved == 1 else f'--nproc {saved}'}), or rerun with --force to recompute it")
        if done["fingerprint"] != fingerprint:
            raise UserError(
                f"{self.root}: the {stage} stage was computed for a different recipe "
                f"(model, data or method changed); rerun with --force to recompute it"
            )
        return True

    def changed_keys(self, recipe: Recipe, recorded_only: bool = False) -> list[str]:
        """Dotted recipe keys that differ from the recipe saved in the run directory; with `recorded_only`, only
        keys the saved recipe has (a key added to the recipe schema since, at its default, does not count)."""
        if not self.recipe_path.is_file():
            return []
        old = yaml.safe_load(self.recipe_path.read_text())
        new = recipe.model_dump(mode="json")

        def diff(a: Any, b: Any, prefix: str) -> list[str]:
            if isinstance(a, dict) and isinstance(b, dict):
                keys = set(a) if recorded_only else set(a) | set(b)
                return [k for key in sorted(keys) for k in diff(a.get(key), b.get(key), f"{prefix}{key}.")]
            return [] if a == b else [prefix.rstrip(".")]

        return [k for k in diff(old, new, "") if k != "output_dir"]

    def has_training_outputs(self) -> bool:
        return any((self.root / name).exists() for name in TRAIN_OUTPUTS)

    @_writer_only
    def clear_training_outputs(self) -> None:
        for name in TRAIN_OUTPUTS:
            _remove(self.root / name)
        manifest = self.manifest()
        manifest.get("stages", {}).pop("train", None)
        write_json(self.manifest_path, manifest)

    # --- checkpoints --------------------------------------------------------------------------
    def checkpoint_steps(self) -> list[int]:
        """Steps of complete checkpoints (a folder appears only after it is fully written)."""
        if not self.checkpoints.is_dir():
            return []
        return sorted(int(m.group(1)) for p in self.checkpoints.iterdir() if (m := _STEP_DIR.match(p.name)))

    @staticmethod
    def seal(folder: Path) -> None:
        """Record a sha256 of every file in `folder` (a checkpoint or final/ being written), so that a file
        damaged later (a truncated copy, a disk fault) is found before it is loaded."""
        sums = {p.name: _sha256(p) for p in sorted(folder.iterdir()) if p.is_file()}
        (folder / CHECKSUMS).write_text(json.dumps(sums, indent=2) + "\n")

    @staticmethod
    def damage(folder: Path) -> str | None:
        """What is wrong with a sealed folder (None when intact; folders from before sealing are not checked)."""
        listing = folder / CHECKSUMS
        if not listing.is_file():
            return None if folder.is_dir() else "missing"
        try:
            sums = json.loads(listing.read_text())
        except (ValueError, UnicodeDecodeError):
            return f"{CHECKSUMS} is unreadable"
        for name, expected in sums.items():
            if not (folder / name).is_file():
                return f"{name} is missing"
            if _sha256(folder / name) != expected:
                return f"{name} does not match its checksum"
        return None

    def checkpoint(self, step: int) -> Path:
        return self.checkpoints / f"step-{step}"

    @_writer_only
    def prune_checkpoints(self, keep: int) -> None:
        for step in self.checkpoint_steps()[:-keep]:
            _remove(self.checkpoint(step))

    @_writer_only
    def append_metrics(self, row: dict) -> None:
        with self.metrics_path.open("a") as handle:
            handle.write(json.dumps(row) + "\n")

    @_writer_only
    def truncate_metrics(self, step: int) -> None:
        """Drop rows logged after `step`, so a resumed run does not log them twice."""
        if not self.metrics_path.is_file():
            return
        rows = [line for line in self.metrics_path.read_text().splitlines() if json.loads(line).get("step", 0) <= step]
        with atomic_path(self.metrics_path) as tmp:
            tmp.write_text("".join(r + "\n" for r in rows))
