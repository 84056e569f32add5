"""Feeding the training loop: a DataLoader over micro-batch plans that keeps the seeded, resumable order.

The sampler decides everything that must be reproducible (which rows, in which order, each rank's shard and its
share of the step's loss) in the main process; the workers only read rows from the memory-mapped split and pad
them, so a run's order does not depend on how many workers collate it, and a resumed run starts at the micro-batch
its checkpoint recorded.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler

from sparsetune.data import Split, collate
from sparsetune.data.stream import StreamSplit, as_columns, loss_items
from sparsetune.distributed import world

Fed = tuple[dict[str, torch.Tensor], "MicroBatch", int]  # a padded batch, its plan, its tokens before padding


def micro_batches(n: int, batch_size: int, seed: int, start: int) -> Iterator[list[int]]:
    """Endless stream of index batches; one seeded permutation per epoch, so position k is reproducible."""
    per_epoch = math.ceil(n / batch_size)
    k, epoch, perm = start, -1, None
    while True:
        e, pos = divmod(k, per_epoch)
        if e != epoch:
            epoch, perm = e, torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1000003 + e))
        yield perm[pos * batch_size : (pos + 1) * batch_size].tolist()
        k += 1


@dataclass(frozen=True)
class MicroBatch:
    indices: list[int]  # this rank's rows
    share: float  # the fraction of the optimizer step's loss they carry
    examples: int  # rows in the global micro-batch


def shard(split: Split, indices: list[int], total: int | None = None) -> MicroBatch:
    """This rank's shard of the global batch `indices` and its share of `total` (default: the batch's own loss
    items), counted as the loss averages (examples, or target tokens for instruction data). Summed over ranks the
    shares give the global mean; under DDP, which averages, a rank's loss enters as share x world size."""
    mine, counts = world().shard(indices)
    total = split.loss_items(indices) if total is None else total
    return MicroBatch(mine, split.loss_items(mine) / total if counts else 0.0, len(indices))


class StepSampler(Sampler[MicroBatch]):
    """The micro-batches of optimizer steps, from micro-batch `start` on: `grad_accum` at a time, so that each
    knows its share of the whole step's loss."""

    def __init__(self, split: Split, micro_batch: int, grad_accum: int, seed: int, start: int) -> None:
        self.split, self.micro_batch, self.grad_accum, self.seed, self.start = split, micro_batch, grad_accum, seed, start

    def __iter__(self) -> Iterator[MicroBatch]:
        stream = micro_batches(len(self.split), self.micro_batch, self.seed, self.start)
        while True:
            step = [next(stream) for _ in range(self.grad_accum)]
            total = self.split.loss_items([i for idx in step for i in idx])
            for idx in step:
                yield shard(self.split, idx, total)


class _Rows(Dataset):
    def __init__(self, split: Split, pad_id: int) -> None:
        self.split, self.pad_id = split, pad_id

    def __getitem__(self, plan: MicroBatch) -> tuple[dict[str, torch.Tensor], MicroBatch, int]:
        columns = self.split.columns(plan.indices)
        return collate(columns, self.pad_id), plan, sum(map(len, columns["input_ids"]))


def stream_batches(split: StreamSplit, pad_id: int, micro_batch: int, grad_accum: int, seed: int,
                   start: int) -> Iterator[Fed]:
    """A stream's micro-batches, as the sampler plans them for a table: `grad_accum` global micro-batches of rows
    per step, each rank's strided shard with its share of the step's loss; the first `start` are read and passed
    over (a resumed run)."""
    rows, k = split.rows(seed), 0
    while True:
        step = [[next(rows) for _ in range(micro_batch)] for _ in range(grad_accum)]
        total = loss_items([row for micro in step for row in micro])
        for micro in step:
            if k >= start:
                mine, counts = world().shard(list(range(len(micro))))
                picked = [micro[i] for i in mine]
                columns = as_columns(picked)
                plan = MicroBatch(mine, loss_items(picked) / total if counts else 0.0, len(micro))
                yield collate(columns, pad_id), plan, sum(map(len, columns["input_ids"]))
            k += 1


class _Stream(IterableDataset):
    def __init__(self, *args) -> None:
        self.args = args

    def __iter__(self) -> Iterator[Fed]:
        return stream_batches(*self.args)


def _as_is(item):
    return item


def train_batches(split: Split | StreamSplit, pad_id: int, micro_batch: int, grad_accum: int, seed: int, start: int,
                  workers: int, pin_memory: bool) -> Iterator[Fed]:
    """The training loop's feed from micro-batch `start` on, for a table or a stream (which one worker at most
    reads ahead: several would each replay the whole stream)."""
    if isinstance(split, StreamSplit):
        loader = DataLoader(_Stream(split, pad_id, micro_batch, grad_accum, seed, start), batch_size=None,
                            collate_fn=_as_is, num_workers=min(workers, 1), pin_memory=pin_memory,
                            generator=torch.Generator().manual_seed(0))
    else:
        loader = train_loader(split, pad_id, StepSampler(split, micro_batch, grad_accum, seed, start), workers,
                              pin_memory)
    return iter(loader)


def train_loader(split: Split, pad_id: int, sampler: StepSampler, workers: int, pin_memory: bool) -> DataLoader:
    """(padded batch, plan, tokens before padding) in the sampler's order; `workers` processes read and pad ahead of the step. The
    loader seeds its workers from a generator of its own: drawing from the global one would shift dropout's
    stream, and a resumed run would no longer match one that never stopped."""
    return DataLoader(_Rows(split, pad_id), sampler=sampler, batch_size=None, collate_fn=_as_is, num_workers=workers,
                      pin_memory=pin_memory, prefetch_factor=4 if workers else None,
                      generator=torch.Generator().manual_seed(0))
