"""`sparsetune predict`: one base model in memory serving many tasks, switched in place.

Each task (a delta file, or a PEFT adapter folder written by export-delta) is checked against the base once,
by its checksums, and kept as what it writes: per touched tensor the flat indices, the base values there and
the task's values there (base + increment, or 0 for a zeroing delta), computed in fp32 and then cast to the
base's dtype, as a merged model placed in that dtype would hold them; dense entries (a task head, an adapter's
merged matrices) as whole tensors. Switching from task A to task B writes A's base values back at A's entries
and B's values at B's entries (two index writes per touched tensor, a pointer swap per dense one), so the model
is bit-for-bit B's merged model and no other weight is touched or reloaded.

A PEFT adapter is merged once into a copy of the base when it is loaded; its matrices then switch as dense
entries (exact, but a copy of every matrix it wraps: sparse deltas are what make switching cheap).
"""

from __future__ import annotations

import copy
import csv
import io
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from sparsetune.console import progress
from sparsetune.data.glue import GLUE, GlueFormat
from sparsetune.data.instruct import Record
from sparsetune.device import Placement
from sparsetune.errors import UserError, unknown
from sparsetune.evaluate import generate_text, head_outputs
from sparsetune.models import HeadSpec, LoadedModel, is_causal_lm
from sparsetune.peft_adapter import apply_adapter, read_adapter_meta
from sparsetune.sparse.delta import read_delta, split_key, verify_delta

INPUT_FORMATS = ("auto", "jsonl", "tsv", "text")
DEFAULT_MAX_LENGTH = 128  # a delta written before `max_length` was recorded: the recipes' default


@dataclass
class TaskSource:
    """One `--delta`: its name, its file (or adapter folder), its header and (for a delta file) its entries."""

    name: str
    path: Path
    meta: dict
    tensors: dict[str, torch.Tensor] | None  # None for a PEFT adapter folder

    @property
    def head(self) -> HeadSpec:
        return HeadSpec(**self.meta["head"])

    @property
    def kind(self) -> str:
        """causal-lm, regression or classification: what a prediction is."""
        head = self.head
        return head.kind if head.kind == "causal-lm" else "regression" if head.num_labels == 1 else "classification"

    @property
    def glue(self) -> GlueFormat | None:
        """The GLUE task the delta was trained on, if it was one."""
        return GLUE.get(self.meta.get("task", ""))

    @property
    def labels(self) -> list[str]:
        """Label names in id order: the GLUE task's own, else the ids as strings."""
        if self.glue is not None and self.glue.labels is not None and len(self.glue.labels) == self.head.num_labels:
            return list(self.glue.labels)
        return [str(i) for i in range(self.head.num_labels)]

    @property
    def text_columns(self) -> tuple[str, ...]:
        """The GLUE task's named text columns (so its own TSV files predict as they are), else none."""
        return tuple(c for c in self.glue.text_cols if isinstance(c, str)) if self.glue else ()

    @property
    def takes_pair(self) -> bool:
        return self.glue is not None and len(self.glue.text_cols) == 2

    @property
    def max_length(self) -> int:
        return int(self.meta.get("max_length", DEFAULT_MAX_LENGTH))


def open_sources(specs: list[str]) -> dict[str, TaskSource]:
    """`--delta` values (`PATH` or `NAME=PATH`; the name defaults to the file's stem) read and checked."""
    sources: dict[str, TaskSource] = {}
    for spec in specs:
        name, sep, rest = spec.partition("=")
        named = bool(sep) and not Path(spec).exists() and "/" not in name
        path = Path(rest if named else spec)
        name = name if named else path.name.removesuffix(".safetensors")
        if name in sources:
            raise UserError(f"--delta: two deltas are named '{name}'; name them as NAME=PATH")
        if path.is_dir():
            source = TaskSource(name, path, read_adapter_meta(path), None)
        else:
            tensors, meta = read_delta(path)
            source = TaskSource(name, path, meta, tensors)
        sources[name] = source
    kinds = {s.head.kind for s in sources.values()}
    if len(kinds) > 1:
        raise UserError(f"--delta: the deltas mix heads ({', '.join(sorted(kinds))}); one predict call serves one "
                        "base model with one kind of head")
    return sources


def base_model_name(sources: dict[str, TaskSource], base: str | None) -> str:
    if base is not None:
        return base
    names = sorted({s.meta["base_model"] for s in sources.values()})
    if len(names) > 1:
        raise UserError(f"--delta: the deltas name different base models ({', '.join(names)}); pass --base")
    return names[0]


class TaskBank:
    """The loaded base and every task's entries; `use(name)` turns the model into that task's merged model."""

    def __init__(self, loaded: LoadedModel, sources: dict[str, TaskSource], placement: Placement) -> None:
        self.loaded, self.model, self.placement = loaded, loaded.model, placement
        self.model.requires_grad_(False).eval()
        self.params = dict(self.model.named_parameters())
        labels = 0 if is_causal_lm(self.model) else self.model.config.num_labels
        # a task head is the fresh (not pretrained) tensors shaped by the label count; each task brings its own
        self.head_names = [n for n, p in self.params.items()
                           if labels and n not in loaded.pretrained_names and p.shape[0] == labels]
        self.sparse: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]] = {}
        self.dense: dict[str, dict[str, torch.Tensor]] = {}
        for name, source in progress(sources.items(), "loading tasks", total=len(sources)):
            self._add(name, source)
        placement.place(self.model)  # swaps each parameter's data, so `self.params` still names the placed ones
        self.base_dense = {n: self.params[n].data for task in self.dense.values() for n in task}
        for task in self.sparse.values():
            for n, (idx, base, values) in task.items():
                dtype, device = self.params[n].dtype, self.params[n].device
                task[n] = (idx.to(device), base.to(device, dtype), values.to(device, dtype))
        for task in self.dense.values():
            for n, tensor in task.items():
                task[n] = tensor.to(placement.device, placement.storage_dtype(tensor)).contiguous()
        self.active: str | None = None
        self.switch_seconds: list[float] = []

    def _head_shaped(self, source: TaskSource) -> dict[str, torch.Tensor]:
        """The base's tensors with the head resized to the task's label count (its values come from the task)."""
        params = dict(self.params)
        for n in self.head_names:
            params[n] = torch.zeros((source.head.num_labels, *params[n].shape[1:]))
        return params

    @torch.no_grad()
    def _add(self, name: str, source: TaskSource) -> None:
        """Check the task against the fp32 base and keep what it writes (base values first, for the way back)."""
        params = self._head_shaped(source)
        sparse, dense = {}, {}
        if source.tensors is None:  # a PEFT adapter: merge into a copy, keep every tensor the merge changed
            merged_copy = copy.deepcopy(self.model)
            for n, param in merged_copy.named_parameters():
                if n in self.head_names:
                    param.data = params[n]  # a fresh tensor of the task's head shape
            merged = apply_adapter(merged_copy, source.path, source.meta)
            for n, param in merged.named_parameters():
                if n not in params:
                    raise UserError(f"--delta {source.path}: the merged adapter has '{n}', which the base lacks")
                if param.shape != params[n].shape or not torch.equal(param, params[n]):
                    dense[n] = param.detach().clone()
        else:
            verify_delta(source.tensors, source.meta, params)
            for key, value in source.tensors.items():
                n, kind = split_key(key)
                flat = params[n].detach().reshape(-1)
                if kind == "dense":
                    dense[n] = value.to(flat.dtype).clone()
                elif kind in ("idx", "zero"):
                    idx = value.long()
                    base = flat[idx].clone()
                    new = base + source.tensors[f"{n}.val"].to(flat) if kind == "idx" else torch.zeros_like(base)
                    sparse[n] = (idx, base, new)  # base + increment: the very sum apply-delta writes
        missing = [n for n in self.head_names if n not in dense]
        if missing:
            raise UserError(f"--delta {source.path}: it carries no task head ({', '.join(missing)}); a classifier's "
                            "delta holds its trained head")
        self.sparse[name], self.dense[name] = sparse, dense

    @torch.no_grad()
    def use(self, name: str | None) -> None:
        """Make the model `name`'s merged model (None: the base): revert the active task's entries, write this one's."""
        if name == self.active:
            return
        started = time.perf_counter()
        if self.active is not None:
            self._write(self.active, revert=True)
        if name is not None:
            self._write(name, revert=False)
        if self.placement.device.type == "cuda":
            torch.cuda.synchronize(self.placement.device)
        if self.active is not None:
            self.switch_seconds.append(time.perf_counter() - started)
        self.active = name

    def _write(self, name: str, revert: bool) -> None:
        for n, (idx, base, values) in self.sparse[name].items():
            self.params[n].data.view(-1)[idx] = base if revert else values
        for n, tensor in self.dense[name].items():
            self.params[n].data = self.base_dense[n] if revert else tensor


# --- inputs ---------------------------------------------------------------------------------------------
@dataclass
class Row:
    where: str  # "argument 2", "data.jsonl line 7": what an error names
    line: int
    fields: dict = field(repr=False)


def read_rows(texts: list[str], input_path: str | None, fmt: str) -> list[Row]:
    """Rows from TEXT arguments, then from `--input` (a file, or - for stdin) in `fmt`."""
    if fmt not in INPUT_FORMATS:
        raise unknown("--input-format", fmt, INPUT_FORMATS)
    rows = [Row(f"argument {i}", i, {"text": text}) for i, text in enumerate(texts, 1)]
    if input_path is not None:
        rows += _read_input(input_path, fmt)
    if not rows:
        raise UserError("predict: no input; give TEXT arguments, --input FILE, or --input - to read stdin")
    return rows


def _read_input(input_path: str, fmt: str) -> list[Row]:
    label = "stdin" if input_path == "-" else input_path
    try:
        raw = sys.stdin.buffer.read() if input_path == "-" else Path(input_path).read_bytes()
        text = raw.decode("utf-8-sig")
    except FileNotFoundError:
        raise UserError(f"--input: file '{input_path}' not found") from None
    except IsADirectoryError:
        raise UserError(f"--input: '{input_path}' is a folder; expected a JSONL, TSV or text file") from None
    except UnicodeDecodeError as exc:
        raise UserError(f"--input: {label} is not UTF-8 text (byte {exc.start})") from None
    if fmt == "auto":
        suffix = Path(input_path).suffix.lower()
        fmt = {".jsonl": "jsonl", ".json": "jsonl", ".tsv": "tsv", ".txt": "text"}.get(suffix, "")
        if not fmt:  # stdin or another name: JSON lines when the first line is an object
            fmt = "jsonl" if text.lstrip().startswith("{") else "text"
    lines = text.splitlines()
    if fmt == "text":
        return [Row(f"{label} line {i}", i, {"text": line}) for i, line in enumerate(lines, 1) if line.strip()]
    if fmt == "jsonl":
        rows = []
        for i, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError as exc:
                raise UserError(f"{label} line {i}: not valid JSON ({exc.msg} at column {exc.colno})") from None
            if not isinstance(item, dict):
                raise UserError(f"{label} line {i}: expected a JSON object, got {type(item).__name__}")
            rows.append(Row(f"{label} line {i}", i, item))
        return rows
    reader = csv.reader(io.StringIO(text), delimiter="\t", quoting=csv.QUOTE_NONE)
    header = next(reader, None)
    if not header:
        raise UserError(f"{label}: empty TSV; expected a header line naming the columns (text, text_b, task, ...)")
    rows = []
    for values in reader:
        i = reader.line_num
        if not any(v.strip() for v in values):
            continue
        if len(values) != len(header):
            raise UserError(f"{label} line {i}: {len(values)} columns, the header has {len(header)}")
        rows.append(Row(f"{label} line {i}", i, dict(zip(header, values))))
    return rows


def _text(row: Row, key: str, value: object) -> str:
    if not isinstance(value, str):
        raise UserError(f"{row.where}: '{key}' must be a string, got {type(value).__name__}")
    return value


def task_inputs(row: Row, source: TaskSource) -> dict[str, str]:
    """The texts this row gives `source`'s task: instruction and input, or text and (for pair tasks) text_b."""
    f = row.fields
    if source.kind == "causal-lm":
        key = "instruction" if "instruction" in f else "text"
        if key not in f:
            raise UserError(f"{row.where}: no 'instruction' (or 'text') for task '{source.name}'")
        return {"instruction": _text(row, key, f[key]), "input": _text(row, "input", f.get("input", ""))}
    keys = ("text", "text_b") if "text" in f else source.text_columns
    if not keys or keys[0] not in f:
        also = f" or its GLUE columns {', '.join(repr(c) for c in source.text_columns)}" if source.text_columns else ""
        raise UserError(f"{row.where}: no 'text'{also} for task '{source.name}'")
    texts = {"text": _text(row, keys[0], f[keys[0]])}
    second = keys[1] if len(keys) > 1 and keys[1] in f else None
    if source.takes_pair and second is None:
        raise UserError(f"{row.where}: task '{source.name}' takes a sentence pair; add 'text_b'")
    if second is not None and not source.takes_pair:
        raise UserError(f"{row.where}: task '{source.name}' takes one text; drop '{second}'")
    if second is not None:
        texts["text_b"] = _text(row, second, f[second])
    return texts


def row_tasks(row: Row, sources: dict[str, TaskSource]) -> list[str]:
    """The task a row names (`task`: a delta's name, or the task its delta was trained on), else every task."""
    if "task" not in row.fields:
        return list(sources)
    wanted = row.fields["task"]
    if wanted in sources:
        return [wanted]
    trained_on = [n for n, s in sources.items() if s.meta.get("task") == wanted]
    if len(trained_on) == 1:
        return trained_on
    raise UserError(f"{row.where}: task '{wanted}' is none of the deltas ({', '.join(sources)})"
                    + (" and names several of their tasks; use a delta's name" if trained_on else ""))


# --- predictions ----------------------------------------------------------------------------------------
def plan(rows: list[Row], sources: dict[str, TaskSource]) -> list[tuple[Row, str, dict[str, str]]]:
    """(row, task, inputs) jobs, in output order; every row is checked before the model loads."""
    return [(row, name, task_inputs(row, sources[name])) for row in rows for name in row_tasks(row, sources)]


def predict(bank: TaskBank, sources: dict[str, TaskSource], jobs: list[tuple[Row, str, dict[str, str]]],
            batch_size: int, max_new_tokens: int, max_length: int | None = None) -> list[dict]:
    """One output row per job, in job order. Jobs are taken task by task (one switch per task) in the order tasks
    first appear, and in input order within a task, so a task's batches are those of its rows alone."""
    results: list[dict | None] = [None] * len(jobs)
    order: dict[str, list[int]] = {}
    for position, (_, name, _) in enumerate(jobs):
        order.setdefault(name, []).append(position)
    for name, positions in order.items():
        bank.use(name)
        source = sources[name]
        inputs = [jobs[p][2] for p in positions]
        predictions = task_predictions(bank.model, bank.loaded.tokenizer, bank.placement, source, inputs, batch_size,
                                       max_new_tokens, max_length or source.max_length)
        for p, prediction in zip(positions, predictions):
            fields = {k: v for k, v in jobs[p][0].fields.items() if k != "task"}  # the input, echoed
            results[p] = {"line": jobs[p][0].line, "task": name} | fields | prediction
    return results  # type: ignore[return-value]


def task_predictions(model: torch.nn.Module, tokenizer, placement: Placement, source: TaskSource,
                     inputs: list[dict[str, str]], batch_size: int, max_new_tokens: int, max_length: int) -> list[dict]:
    """What `model` (the task's merged model, or the bank switched to it) predicts for each input of `source`'s
    task: a label and its probabilities, a score, or a generation."""
    if source.kind == "causal-lm":
        return [{"generation": generate_text(model, Record(i["instruction"], i["input"], ""), tokenizer,
                                             max_new_tokens, placement)}
                for i in progress(inputs, f"{source.name}: generating")]
    pairs = [i["text_b"] for i in inputs] if source.takes_pair else None
    enc = tokenizer([i["text"] for i in inputs], pairs, truncation=True, max_length=max_length)
    columns = {k: enc[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc}
    logits = head_outputs(model, columns, batch_size, tokenizer.pad_token_id, placement)
    if source.kind == "regression":
        return [{"prediction": score} for score in logits.squeeze(-1).tolist()]
    labels = source.labels
    return [{"prediction": labels[int(p.argmax())], "probabilities": dict(zip(labels, p.tolist()))}
            for p in torch.softmax(logits, dim=-1)]
