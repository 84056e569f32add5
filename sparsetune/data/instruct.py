"""Instruction data (Alpaca JSON/JSONL): a prompt template, and loss on response tokens only."""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from sparsetune.errors import UserError

IGNORE_INDEX = -100  # label id that the causal-LM loss skips: prompt tokens and padding

ALPACA_TEMPLATE = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)


@dataclass(frozen=True)
class Record:
    instruction: str
    input: str
    output: str


DATA_SUFFIXES = (".json", ".jsonl", ".json.gz", ".jsonl.gz")


def data_file(path: Path | None) -> Path:
    """`task.data_file`, checked: it exists and is (gzipped) JSON or JSONL."""
    if path is None:
        raise UserError("task.data_file: required for task 'instruct' (Alpaca JSON or JSONL, optionally gzipped)")
    if not path.name.endswith(DATA_SUFFIXES):
        raise UserError(f"task.data_file: '{path}' should end in {', '.join(DATA_SUFFIXES)}")
    if not path.is_file():
        raise UserError(f"task.data_file: file '{path}' not found")
    return path


def _record(item, where: str, path: Path) -> Record:
    if not isinstance(item, dict) or "instruction" not in item or "output" not in item:
        raise UserError(f"task.data_file: {where} of '{path}' lacks 'instruction' or 'output'")
    return Record(str(item["instruction"]), str(item.get("input") or ""), str(item["output"]))


def iter_records(path: Path | None) -> Iterator[Record]:
    """The records of a JSON list or a JSONL file, gzipped or not, checked one by one as they are read; JSONL is
    read line by line, so a corpus is never held whole."""
    path = data_file(path)
    lines = path.name.endswith((".jsonl", ".jsonl.gz"))
    try:
        with (gzip.open(path, "rt", encoding="utf-8") if path.suffix == ".gz" else path.open(encoding="utf-8")) as handle:
            if not lines:
                items = json.load(handle)
                if not isinstance(items, list):
                    raise UserError(f"task.data_file: '{path}' must hold a list of records")
                for i, item in enumerate(items):
                    yield _record(item, f"record {i}", path)
                return
            for number, line in enumerate(handle, 1):
                if line.strip():
                    try:
                        item = json.loads(line)
                    except json.JSONDecodeError as exc:
                        raise UserError(f"task.data_file: '{path}' is not valid JSON ({exc.msg} at line {number})") from None
                    yield _record(item, f"line {number}", path)
    except UnicodeDecodeError as exc:
        raise UserError(f"task.data_file: '{path}' is not UTF-8 text (byte {exc.start})") from None
    except json.JSONDecodeError as exc:
        raise UserError(f"task.data_file: '{path}' is not valid JSON ({exc.msg} at line {exc.lineno})") from None
    except (OSError, EOFError) as exc:  # a truncated or non-gzip .gz
        raise UserError(f"task.data_file: '{path}' could not be read ({exc})") from None


def read_records(path: Path | None) -> list[Record]:
    return list(iter_records(path))


def prompt_text(record: Record, tokenizer) -> str:
    """The tokenizer's chat template when it has one, else the Alpaca template."""
    user = record.instruction + (f"\n\n{record.input}" if record.input else "")
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "user", "content": user}]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return ALPACA_TEMPLATE.format(instruction=user)


def leading_special_ids(tokenizer) -> list[int]:
    """The special tokens the tokenizer puts before a text (Llama's and Gemma's <bos>, BERT's [CLS]; none for GPT-2)."""
    ids = tokenizer("a")["input_ids"]
    special = set(tokenizer.all_special_ids)
    return ids[: next((i for i, t in enumerate(ids) if t not in special), len(ids))]


def prompt_ids(record: Record, tokenizer) -> list[int]:
    """The prompt as the model expects it in training, evaluation and generation alike: a chat template renders
    its own special tokens; the plain template gets the ones the tokenizer adds in front of any text."""
    ids = tokenizer(prompt_text(record, tokenizer), add_special_tokens=False)["input_ids"]
    return ids if getattr(tokenizer, "chat_template", None) else leading_special_ids(tokenizer) + ids


def target_count(labels: list[int]) -> int:
    """The tokens a causal LM's loss averages over in one row: labels not IGNORE_INDEX after the shift by one."""
    return sum(t != IGNORE_INDEX for t in labels[1:])


def tokenize_records(batch: dict[str, list], tokenizer, max_length: int) -> dict[str, list]:
    """`Dataset.map` (batched): input_ids = prompt + response + eos, labels = IGNORE_INDEX over the prompt, and
    the target tokens the loss averages over; a record left with nothing to learn after truncation is dropped."""
    records = [Record(*row) for row in zip(batch["instruction"], batch["input"], batch["output"])]
    chat = bool(getattr(tokenizer, "chat_template", None))
    lead = [] if chat else leading_special_ids(tokenizer)  # as prompt_ids, for the whole batch at once
    prompts = tokenizer([prompt_text(r, tokenizer) for r in records], add_special_tokens=False)["input_ids"]
    responses = tokenizer(batch["output"], add_special_tokens=False)["input_ids"]
    out: dict[str, list] = {key: [] for key in (*batch, "input_ids", "attention_mask", "labels", "loss_items")}
    for i, (prompt, response) in enumerate(zip(prompts, responses)):
        prompt, response = lead + prompt, response + [tokenizer.eos_token_id]
        labels = ([IGNORE_INDEX] * len(prompt) + response)[:max_length]
        targets = target_count(labels)
        if not targets:
            continue
        for key in batch:
            out[key].append(batch[key][i])
        input_ids = (prompt + response)[:max_length]
        out["input_ids"].append(input_ids)
        out["attention_mask"].append([1] * len(input_ids))
        out["labels"].append(labels)
        out["loss_items"].append(targets)
    return out


def pack(batch: dict[str, list], max_length: int) -> dict[str, list]:
    """`Dataset.map` (batched): consecutive examples concatenated into rows of at most `max_length` tokens, with
    position ids restarting at 0 for each example, so that the model masks every example off from the others.
    Each example starts with prompt tokens (IGNORE_INDEX), so no label asks the model to predict across a seam."""
    out: dict[str, list] = {"input_ids": [], "position_ids": [], "labels": [], "loss_items": []}
    row: dict[str, list] = {key: [] for key in out}
    items = 0
    for ids, labels, count in zip(batch["input_ids"], batch["labels"], batch["loss_items"]):
        if row["input_ids"] and len(row["input_ids"]) + len(ids) > max_length:
            for key in ("input_ids", "position_ids", "labels"):
                out[key].append(row[key])
            out["loss_items"].append(items)
            row, items = {key: [] for key in out}, 0
        row["input_ids"] += ids
        row["position_ids"] += list(range(len(ids)))
        row["labels"] += labels
        items += count
    if row["input_ids"]:
        for key in ("input_ids", "position_ids", "labels"):
            out[key].append(row[key])
        out["loss_items"].append(items)
    return out
