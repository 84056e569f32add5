"""`task.streaming: true`: train from an instruction corpus read as it trains, never held or tokenized whole.

The file (JSONL, gzipped or not) is read line by line, every epoch again: records whose content hash puts them in
the held-out split are skipped (the held-out split itself is the first `eval_limit` of them, tokenized up front),
the rest pass through a seeded shuffle buffer, are tokenized in chunks with the same batched function the cached
path maps, and packed when asked. The order is a function of the seed alone, so a resumed run replays the stream
up to its checkpoint's micro-batch (reading, not training) and continues exactly where it stopped.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Iterator
from pathlib import Path

import datasets

from sparsetune.data.glue import in_heldout
from sparsetune.data.instruct import Record, data_file, iter_records, pack, tokenize_records
from sparsetune.errors import UserError
from sparsetune.recipe import TaskConfig

CHUNK = 256  # records tokenized per call
DEFAULT_HELDOUT = 1000  # held-out records when task.eval_limit is not set: the corpus is not scanned to its end


def heldout_of(record: Record, fraction: float) -> bool:
    return in_heldout(record.instruction + record.input, fraction)


def streaming_file(cfg: TaskConfig) -> Path:
    path = data_file(cfg.data_file)
    if not path.name.endswith((".jsonl", ".jsonl.gz")):
        raise UserError(f"task.streaming: '{path}' is a JSON list, which is parsed whole; stream a line-delimited "
                        "file (.jsonl or .jsonl.gz)")
    return path


def heldout_records(cfg: TaskConfig) -> list[Record]:
    """The held-out split: the first `eval_limit` (default 1,000) records the content hash puts there."""
    limit, out = cfg.eval_limit or DEFAULT_HELDOUT, []
    for record in iter_records(streaming_file(cfg)):
        if heldout_of(record, cfg.eval_fraction):
            out.append(record)
            if len(out) == limit:
                break
    return out


class StreamSplit:
    """The training split as an endless, seeded stream of token rows (epoch after epoch)."""

    name = "train"

    def __init__(self, cfg: TaskConfig, tokenizer, max_length: int) -> None:
        self.cfg, self.tokenizer, self.max_length = cfg, tokenizer, max_length
        self.path = streaming_file(cfg)
        self.unit = "packed rows" if cfg.packing else "examples"

    def _records(self, seed: int, epoch: int) -> Iterator[Record]:
        """One epoch of training records through a shuffle buffer of `task.shuffle_buffer`."""
        rng = random.Random(seed * 1000003 + epoch)
        buffer: list[Record] = []
        kept = 0
        for record in iter_records(self.path):
            if heldout_of(record, self.cfg.eval_fraction):
                continue
            if self.cfg.train_limit and kept == self.cfg.train_limit:
                break
            kept += 1
            if len(buffer) < self.cfg.shuffle_buffer:
                buffer.append(record)
                continue
            i = rng.randrange(len(buffer))
            yield buffer[i]
            buffer[i] = record
        rng.shuffle(buffer)
        yield from buffer
        if not kept:
            raise UserError(f"task.data_file: '{self.path}' has no training record outside the held-out split")

    def rows(self, seed: int) -> Iterator[dict[str, list]]:
        """Token rows (as `Split.columns` gives them, one row each), epoch after epoch."""
        epoch = 0
        while True:
            chunk: list[Record] = []
            for record in itertools.chain(self._records(seed, epoch), [None]):  # None: the epoch's end
                if record is not None:
                    chunk.append(record)
                if chunk and (len(chunk) == CHUNK or record is None):
                    yield from self._encode(chunk)
                    chunk = []
            epoch += 1

    def _encode(self, records: list[Record]) -> Iterator[dict]:
        batch = {"instruction": [r.instruction for r in records], "input": [r.input for r in records],
                 "output": [r.output for r in records]}
        tokens = tokenize_records(batch, self.tokenizer, self.max_length)
        for key in ("instruction", "input", "output"):
            tokens.pop(key)
        if self.cfg.packing:
            tokens = pack(tokens, self.max_length)
        for i in range(len(tokens["input_ids"])):
            yield {key: values[i] for key, values in tokens.items()}


def as_columns(rows: list[dict]) -> dict[str, list]:
    return {key: [row[key] for row in rows] for key in rows[0] if key != "loss_items"}


def loss_items(rows: list[dict]) -> int:
    return sum(row["loss_items"] for row in rows)


def heldout_dataset(records: list[Record], tokenizer, max_length: int) -> datasets.Dataset:
    """The held-out records tokenized in memory (a small split; the stream itself is never cached)."""
    table = datasets.Dataset.from_dict({"instruction": [r.instruction for r in records],
                                        "input": [r.input for r in records], "output": [r.output for r in records]})
    return table.map(tokenize_records, batched=True, fn_kwargs={"tokenizer": tokenizer, "max_length": max_length},
                     keep_in_memory=True)
