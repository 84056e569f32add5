"""Tasks: what each task is (kind, labels, metrics) and how its data becomes padded batches."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

from sparsetune.data.glue import GLUE, Example, in_heldout, read_glue, read_rotten_tomatoes
from sparsetune.data.instruct import IGNORE_INDEX, Record, encode, read_records
from sparsetune.errors import UserError, unknown
from sparsetune.recipe import TaskConfig

TaskKind = Literal["classification", "regression", "instruct"]

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


@dataclass
class Split:
    """One split: the raw examples (for predictions) and their tokenized features, index-aligned."""

    name: str
    examples: list = field(repr=False)
    features: list[dict] = field(repr=False)


@dataclass
class TaskData:
    spec: TaskSpec
    train: Split
    evals: list[Split]  # the first is the primary dev split


def _encode_pairs(name: str, examples: list[Example], tokenizer, max_length: int) -> Split:
    if not examples:
        raise UserError(f"task '{name}': split is empty")
    second = [e.text_b for e in examples] if examples[0].text_b is not None else None
    enc = tokenizer([e.text_a for e in examples], second, truncation=True, max_length=max_length)
    keys = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc]
    features = [{k: enc[k][i] for k in keys} | {"labels": e.label} for i, e in enumerate(examples)]
    return Split(name, examples, features)


def _encode_records(name: str, records: list[Record], tokenizer, max_length: int) -> Split:
    if not records:
        raise UserError(f"task.data_file: the {name} split is empty (adjust task.eval_fraction)")
    pairs = [(r, f) for r in records if (f := encode(r, tokenizer, max_length)) is not None]
    if not pairs:
        raise UserError(f"task.data_file: no {name} record fits model.max_length={max_length}")
    return Split(name, [r for r, _ in pairs], [f for _, f in pairs])


def load_task(cfg: TaskConfig, tokenizer, max_length: int) -> TaskData:
    spec = task_spec(cfg.name)
    if spec.kind == "instruct":
        records = read_records(cfg.data_file)
        train = [r for r in records if not in_heldout(r.instruction + r.input, cfg.eval_fraction)]
        heldout = [r for r in records if in_heldout(r.instruction + r.input, cfg.eval_fraction)]
        return TaskData(
            spec,
            _encode_records("train", train[: cfg.train_limit], tokenizer, max_length),
            [_encode_records("heldout", heldout[: cfg.eval_limit], tokenizer, max_length)],
        )
    holdout = cfg.eval_split == "train_holdout"
    if spec.name == "rotten_tomatoes":
        train, devs = read_rotten_tomatoes(cfg.eval_fraction, cfg.train_limit, cfg.eval_limit)
    else:
        train, devs = read_glue(spec.name, cfg.data_dir, cfg.train_limit, cfg.eval_limit, with_dev=not holdout)
    if holdout:  # scored on training examples only: a second, salted hash split of the training data
        held = [in_heldout(f"train_holdout:{e.text_a}\t{e.text_b}", cfg.eval_fraction) for e in train]
        devs = {"train_holdout": [e for e, h in zip(train, held) if h][: cfg.eval_limit]}
        train = [e for e, h in zip(train, held) if not h]
    return TaskData(
        spec,
        _encode_pairs("train", train, tokenizer, max_length),
        [_encode_pairs(split, examples, tokenizer, max_length) for split, examples in devs.items()],
    )


def loss_items(features: list[dict]) -> int:
    """What a batch's loss averages over: its examples, or for instruction data its target tokens (after the
    causal shift by one), so that batches of unequal size are weighted as one batch of all of them would be."""
    return sum(len(f["labels"]) - 1 - f["labels"][1:].count(IGNORE_INDEX) if isinstance(f["labels"], list) else 1
               for f in features)


def collate(features: list[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Pad to the longest example; labels are padded with IGNORE_INDEX when they are sequences."""
    width = max(len(f["input_ids"]) for f in features)
    batch: dict[str, torch.Tensor] = {}
    for key in features[0]:
        values = [f[key] for f in features]
        if isinstance(values[0], list):
            fill = {"input_ids": pad_token_id, "labels": IGNORE_INDEX}.get(key, 0)
            batch[key] = torch.tensor([v + [fill] * (width - len(v)) for v in values])
        else:
            batch[key] = torch.tensor(values, dtype=torch.float32 if isinstance(values[0], float) else torch.long)
    return batch
