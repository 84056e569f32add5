"""Tasks: what each task is (kind, labels, metrics), and its data as tokenized Arrow tables.

A task's splits are built once with `datasets` (`Dataset.map`, batched) and kept as Arrow files in the data cache,
under a fingerprint of the data files' bytes, the tokenizer, `max_length`, the task settings that shape the splits
and this package's data code: every later stage and every later run memory-maps the same files instead of
tokenizing again, and the rows live in the page cache rather than in Python objects.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Literal

import datasets
import numpy as np
import torch

from sparsetune.console import log
from sparsetune.data.glue import (GLUE, Example, glue_files, in_heldout, read_glue, read_rotten_tomatoes,
                                  rotten_tomatoes_file, tokenize_pairs)
from sparsetune.data.instruct import (IGNORE_INDEX, Record, data_file, pack, read_records, target_count,
                                      tokenize_records)
from sparsetune.errors import UserError, unknown
from sparsetune.recipe import TaskConfig

TaskKind = Literal["classification", "regression", "instruct"]
TOKEN_COLUMNS = ("input_ids", "attention_mask", "token_type_ids", "position_ids", "labels")
WEIGHT_COLUMN = "loss_items"  # what a row adds to what a batch's loss averages over

_GLUE_METRICS = {"cola": ("matthews_correlation",), "mrpc": ("f1", "accuracy"), "qqp": ("f1", "accuracy"),
                 "stsb": ("pearson", "spearmanr")}


@dataclass(frozen=True)
class TaskSpec:
    name: str
    kind: TaskKind
    num_labels: int  # classes; 1 for regression; 0 for instruction data
    metrics: tuple[str, ...]


def _glue_spec(name: str) -> TaskSpec:
    labels = GLUE[name].labels
    kind: TaskKind = "regression" if labels is None else "classification"
    return TaskSpec(name, kind, len(labels) if labels else 1, _GLUE_METRICS.get(name, ("accuracy",)))


TASKS: dict[str, TaskSpec] = {name: _glue_spec(name) for name in GLUE} | {
    "rotten_tomatoes": TaskSpec("rotten_tomatoes", "classification", 2, ("accuracy", "f1")),
    "instruct": TaskSpec("instruct", "instruct", 0, ("loss", "perplexity")),
}


def task_spec(name: str) -> TaskSpec:
    if name not in TASKS:
        raise unknown("task.name", name, TASKS)
    return TASKS[name]


class Split:
    """One split, memory-mapped: its raw fields (for predictions and generations) and its tokens, row-aligned."""

    def __init__(self, name: str, dataset: datasets.Dataset) -> None:
        self.name, self.dataset = name, dataset
        self._tokens = dataset.select_columns([c for c in TOKEN_COLUMNS if c in dataset.column_names])

    @classmethod
    def from_columns(cls, name: str, columns: dict[str, list]) -> Split:
        """An in-memory split of ready token columns (a benchmark's batch, a test's rows); each row's loss weight is
        1, or its target tokens where labels are sequences."""
        weights = [target_count(y) if isinstance(y, list) else 1 for y in columns["labels"]]
        return cls(name, datasets.Dataset.from_dict(columns | {WEIGHT_COLUMN: weights}))

    def __len__(self) -> int:
        return len(self.dataset)

    @property
    def unit(self) -> str:
        return "packed rows" if "position_ids" in self._tokens.column_names else "examples"

    @cached_property
    def weights(self) -> np.ndarray:
        """Per row, what it adds to the loss's denominator: 1 per example, or its target tokens (instructions)."""
        return np.asarray(self.dataset[WEIGHT_COLUMN], dtype=np.int64)

    def loss_items(self, indices: list[int]) -> int:
        return int(self.weights[indices].sum())

    def columns(self, indices: list[int] | range) -> dict[str, list]:
        """The token columns of rows `indices`, in that order."""
        return self._tokens[list(indices)] if len(indices) else {c: [] for c in self._tokens.column_names}

    def batch(self, indices: list[int] | range, pad_id: int) -> dict[str, torch.Tensor]:
        return collate(self.columns(indices), pad_id)

    @property
    def examples(self) -> list[Example] | list[Record]:
        """The rows' raw fields (small dev splits; a training split is only read by columns)."""
        if "instruction" in self.dataset.column_names:
            raw = self.dataset.select_columns(["instruction", "input", "output"]).to_dict()
            return [Record(*row) for row in zip(raw["instruction"], raw["input"], raw["output"])]
        raw = self.dataset.select_columns(["text_a", "text_b", "labels"]).to_dict()
        return [Example(*row) for row in zip(raw["text_a"], raw["text_b"], raw["labels"])]


@dataclass
class TaskData:
    spec: TaskSpec
    train: Split  # or, with task.streaming, a StreamSplit
    evals: list[Split]  # the first is the primary dev split


def data_cache() -> Path:
    """Where tokenized splits are kept: $SPARSETUNE_DATA_CACHE, else the data/ folder of sparsetune's cache."""
    from sparsetune.models import cache_dir

    return Path(os.environ.get("SPARSETUNE_DATA_CACHE") or cache_dir() / "data")


def tokenizer_fingerprint(tokenizer) -> str:
    """What decides the ids: the vocabulary and rules (a fast tokenizer's serialised form), the special tokens,
    the chat template (instruction prompts use it) and the class."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:  # without the truncation and padding a call leaves set: they are per call here
        rules = json.dumps(json.loads(backend.to_str()) | {"truncation": None, "padding": None}, sort_keys=True)
    else:
        rules = datasets.fingerprint.Hasher.hash(tokenizer)
    parts = [type(tokenizer).__name__, rules, json.dumps(tokenizer.special_tokens_map, sort_keys=True, default=str),
             str(getattr(tokenizer, "chat_template", None)), str(tokenizer.padding_side)]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()


def _code_fingerprint() -> str:
    """The data code itself: a change to how rows are read, split or encoded never reuses an older cache."""
    digest = hashlib.sha256()
    for path in sorted(Path(__file__).parent.glob("*.py")):
        digest.update(path.read_bytes())
    return digest.hexdigest()


def _source_files(cfg: TaskConfig, spec: TaskSpec) -> list[Path]:
    """The files a task's rows come from (checked to exist: a missing one fails before anything is built)."""
    if spec.kind == "instruct":
        return [data_file(cfg.data_file)]
    if spec.name == "rotten_tomatoes":
        return [rotten_tomatoes_file()]
    return glue_files(spec.name, cfg.data_dir, with_dev=cfg.eval_split == "dev")


def fingerprint(cfg: TaskConfig, spec: TaskSpec, tokenizer, max_length: int) -> str:
    digest = hashlib.sha256()
    settings = cfg.model_dump(mode="json", include={"name", "train_limit", "eval_limit", "eval_fraction", "eval_split",
                                                     "packing"}) | {"hub": cfg.data_dir is None}
    digest.update(json.dumps({"settings": settings, "max_length": max_length, "code": _code_fingerprint(),
                              "tokenizer": tokenizer_fingerprint(tokenizer)}, sort_keys=True).encode())
    for path in _source_files(cfg, spec):
        with path.open("rb") as handle:
            digest.update(path.name.encode() + hashlib.file_digest(handle, "sha256").digest())
    return digest.hexdigest()[:20]


def _raw_splits(cfg: TaskConfig, spec: TaskSpec) -> tuple[list, dict[str, list]]:
    """(training rows, {evaluation split: rows}) as read and checked from the task's files."""
    if spec.kind == "instruct":
        records = read_records(cfg.data_file)
        train = [r for r in records if not in_heldout(r.instruction + r.input, cfg.eval_fraction)]
        heldout = [r for r in records if in_heldout(r.instruction + r.input, cfg.eval_fraction)]
        return train[: cfg.train_limit], {"heldout": heldout[: cfg.eval_limit]}
    holdout = cfg.eval_split == "train_holdout"
    if spec.name == "rotten_tomatoes":
        train, devs = read_rotten_tomatoes(cfg.eval_fraction, cfg.train_limit, cfg.eval_limit)
    else:
        train, devs = read_glue(spec.name, cfg.data_dir, cfg.train_limit, cfg.eval_limit, with_dev=not holdout)
    if holdout:  # scored on training examples only: a second, salted hash split of the training data
        held = [in_heldout(f"train_holdout:{e.text_a}\t{e.text_b}", cfg.eval_fraction) for e in train]
        devs = {"train_holdout": [e for e, h in zip(train, held) if h][: cfg.eval_limit]}
        train = [e for e, h in zip(train, held) if not h]
    return train, devs


def _as_table(rows: list) -> datasets.Dataset:
    if rows and isinstance(rows[0], Record):
        return datasets.Dataset.from_dict({"instruction": [r.instruction for r in rows],
                                           "input": [r.input for r in rows], "output": [r.output for r in rows]})
    labels = [e.label for e in rows]
    return datasets.Dataset.from_dict({"text_a": [e.text_a for e in rows],
                                       "text_b": [e.text_b for e in rows], "labels": labels})


def _build(folder: Path, cfg: TaskConfig, spec: TaskSpec, tokenizer, max_length: int) -> None:
    """Read, check and tokenize every split into `folder` (written under a temporary name, then renamed)."""
    log.print(f"tokenizing {spec.name} into the cache: {folder}", markup=False, highlight=False)
    train, evals = _raw_splits(cfg, spec)
    tmp = folder.with_name(f"{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tokenize = tokenize_records if spec.kind == "instruct" else tokenize_pairs
    names = []
    for name, rows in [("train", train), *evals.items()]:
        if not rows:
            raise UserError(f"task.data_file: the {name} split is empty (adjust task.eval_fraction)"
                            if spec.kind == "instruct" else f"task '{spec.name}': split is empty")
        table = _as_table(rows).map(tokenize, batched=True, batch_size=1000, fn_kwargs={
            "tokenizer": tokenizer, "max_length": max_length}, cache_file_name=str(tmp / f"{name}.tokens.arrow"),
            new_fingerprint=f"{folder.name}-{name}", desc=f"tokenizing {name}")
        if not len(table):
            raise UserError(f"task.data_file: no {name} record fits model.max_length={max_length}")
        if name == "train" and cfg.packing:
            table.map(pack, batched=True, batch_size=1000, fn_kwargs={"max_length": max_length},
                      remove_columns=table.column_names, cache_file_name=str(tmp / "train.arrow"),
                      new_fingerprint=f"{folder.name}-packed", desc="packing train")
            (tmp / "train.tokens.arrow").unlink()
        else:
            (tmp / f"{name}.tokens.arrow").rename(tmp / f"{name}.arrow")
        names.append(name)
    (tmp / "splits.json").write_text(json.dumps({"splits": names, "task": spec.name, "max_length": max_length}))
    try:
        tmp.rename(folder)
    except OSError:  # another process built the same splits first: theirs are identical
        shutil.rmtree(tmp, ignore_errors=True)


def load_task(cfg: TaskConfig, tokenizer, max_length: int) -> TaskData:
    """The task's splits from the data cache, built on first use."""
    spec = task_spec(cfg.name)
    if not sys.stderr.isatty():
        datasets.disable_progress_bars()  # a log file gets our one line per build, not a bar per split
    for key in ("packing", "streaming"):
        if getattr(cfg, key) and spec.kind != "instruct":
            raise UserError(f"task.{key}: only for instruction data (task.name is '{cfg.name}')")
    if cfg.streaming:
        from sparsetune.data.stream import StreamSplit, heldout_dataset, heldout_records

        held = heldout_dataset(heldout_records(cfg), tokenizer, max_length)
        if not len(held):
            raise UserError(f"task.data_file: no held-out record in '{cfg.data_file}' (raise task.eval_fraction)")
        return TaskData(spec, StreamSplit(cfg, tokenizer, max_length), [Split("heldout", held)])
    folder = data_cache() / f"{spec.name}-{fingerprint(cfg, spec, tokenizer, max_length)}"
    if not (folder / "splits.json").is_file():  # a cache hit says nothing: the stages of a run all open it
        _build(folder, cfg, spec, tokenizer, max_length)
    names = json.loads((folder / "splits.json").read_text())["splits"]
    splits = [Split(name, datasets.Dataset.from_file(str(folder / f"{name}.arrow"))) for name in names]
    return TaskData(spec, splits[0], splits[1:])


def collate(columns: dict[str, list], pad_id: int) -> dict[str, torch.Tensor]:
    """Pad to the longest row; labels are padded with IGNORE_INDEX when they are sequences. Packed rows (with
    position ids and no attention mask) get their padding as sequences of their own, and no KV cache, so the
    model's mask keeps every example to itself (transformers reads sequence boundaries from the position ids)."""
    batch: dict[str, torch.Tensor] = {}
    width = max(len(v) for v in columns["input_ids"])
    for key, values in columns.items():
        if isinstance(values[0], list):
            fill = {"input_ids": pad_id, "labels": IGNORE_INDEX}.get(key, 0)
            batch[key] = torch.tensor([v + [fill] * (width - len(v)) for v in values])
        else:
            batch[key] = torch.tensor(values, dtype=torch.float32 if isinstance(values[0], float) else torch.long)
    if "position_ids" in batch:
        batch["use_cache"] = False  # type: ignore[assignment]  # a cache would turn off packed-sequence masking
    return batch
