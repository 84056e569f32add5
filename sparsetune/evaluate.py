"""Evaluation: official metrics on each dev split, per-example predictions, generations for instructions.

Under torchrun each rank scores its strided shard of a split and the results are gathered, so every rank gets
the metrics of the whole split (those of one process, up to padding's rounding); generations come from rank 0.
"""

from __future__ import annotations

import math
from dataclasses import asdict

import torch
from torch import nn

from sparsetune.data import Split, TaskData, TaskSpec, collate
from sparsetune.data.instruct import prompt_ids
from sparsetune.data.metrics import compute_metrics
from sparsetune.device import Placement
from sparsetune.distributed import world


def _batches(columns: dict[str, list], batch_size: int, pad_id: int, placement: Placement):
    for start in range(0, len(columns["input_ids"]), batch_size):
        yield placement.batch(collate({k: v[start : start + batch_size] for k, v in columns.items()}, pad_id))


@torch.no_grad()
def head_outputs(model: nn.Module, columns: dict[str, list], batch_size: int, pad_id: int,
                 placement: Placement) -> torch.Tensor:
    """The classifier's fp32 logits for every row of the token `columns`, in order, shape (rows, num_labels)."""
    outputs = []
    for batch in _batches(columns, batch_size, pad_id, placement):
        batch.pop("labels", None)
        with placement.autocast():
            outputs.append(model(**batch).logits.float().cpu())
    return torch.cat(outputs) if outputs else torch.zeros(0, model.config.num_labels)


def head_loss(logits: torch.Tensor, labels: torch.Tensor, kind: str) -> float:
    """The summed loss the head trains on (cross-entropy, or squared error for regression): a continuous score
    that still separates runs whose discrete metric ties, e.g. two that both predict the majority class."""
    if kind == "regression":
        return float(nn.functional.mse_loss(logits.squeeze(-1), labels.float(), reduction="sum"))
    return float(nn.functional.cross_entropy(logits, labels.long(), reduction="sum"))


@torch.no_grad()
def evaluate_split(model: nn.Module, split: Split, spec: TaskSpec, tokenizer, batch_size: int,
                   placement: Placement) -> tuple[dict, list[dict]]:
    """(metrics, prediction rows) for one split: the task's metrics and the mean loss per example; instruction
    data gives token-weighted loss and perplexity."""
    was_training = model.training
    model.eval()
    ranks = world()
    mine = split.columns(range(ranks.rank, len(split), ranks.size))
    try:
        if spec.kind == "instruct":
            sums = torch.zeros(2, dtype=torch.float64)  # loss x target tokens, target tokens
            for batch in _batches(mine, batch_size, tokenizer.pad_token_id, placement):
                n = int((batch["labels"][:, 1:] != -100).sum())  # the model shifts labels by one
                with placement.autocast():
                    sums[0] += float(model(**batch).loss) * n
                sums[1] += n
            total, tokens = ranks.all_reduce_(sums).tolist()
            loss = total / tokens
            return {"loss": loss, "perplexity": math.exp(min(loss, 50.0))}, []
        logits = head_outputs(model, mine, batch_size, tokenizer.pad_token_id, placement)
        local = logits.squeeze(-1).tolist() if spec.kind == "regression" else logits.argmax(-1).tolist()
        loss_sum = torch.tensor([head_loss(logits, torch.tensor(mine["labels"]), spec.kind), len(logits)],
                                dtype=torch.float64)
        total, rows_scored = ranks.all_reduce_(loss_sum).tolist()
        predictions: list = [None] * len(split)
        for rank, shard in enumerate(ranks.all_gather(local)):
            predictions[rank :: ranks.size] = shard
        examples = split.examples
        labels = [e.label for e in examples]
        rows = [asdict(e) | {"index": i, "prediction": p} for i, (e, p) in enumerate(zip(examples, predictions))]
        return compute_metrics(spec.metrics, predictions, labels) | {"loss": total / max(rows_scored, 1)}, rows
    finally:
        model.train(was_training)


@torch.no_grad()
def generate(model: nn.Module, split: Split, tokenizer, count: int, max_new_tokens: int,
             placement: Placement) -> list[dict]:
    """Greedy generations for the first `count` held-out prompts, one at a time (no padding effects)."""
    model.eval()
    return [{"instruction": record.instruction, "input": record.input, "reference": record.output,
             "generation": generate_text(model, record, tokenizer, max_new_tokens, placement)}
            for record in split.examples[:count]]


@torch.no_grad()
def generate_text(model: nn.Module, record, tokenizer, max_new_tokens: int, placement: Placement) -> str:
    """The greedy response to one record's prompt (the template training used)."""
    prompt = torch.tensor([prompt_ids(record, tokenizer)])
    ids = placement.batch({"input_ids": prompt, "attention_mask": torch.ones_like(prompt)})
    with placement.autocast():
        out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)


def evaluate(model: nn.Module, data: TaskData, tokenizer, batch_size: int, placement: Placement,
             generations: int = 0, max_new_tokens: int = 64, splits: int | None = None) -> tuple[dict, list[dict]]:
    """Metrics over the dev splits (the first unsuffixed, others suffixed `_<split>`) and prediction rows."""
    metrics: dict = {}
    rows: list[dict] = []
    for i, split in enumerate(data.evals[:splits]):
        split_metrics, split_rows = evaluate_split(model, split, data.spec, tokenizer, batch_size, placement)
        suffix = "" if i == 0 else f"_{split.name}"
        metrics |= {f"{k}{suffix}": v for k, v in split_metrics.items()}
        rows += [{"split": split.name} | r for r in split_rows]
    if data.spec.kind == "instruct" and generations and world().is_main:
        generated = generate(model, data.evals[0], tokenizer, generations, max_new_tokens, placement)
        rows += [{"split": data.evals[0].name} | r for r in generated]
    return metrics, rows
