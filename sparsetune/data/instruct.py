"""Instruction data (Alpaca JSON/JSONL): a prompt template, and loss on response tokens only."""

from __future__ import annotations

import json
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


def read_records(path: Path | None) -> list[Record]:
    if path is None:
        raise UserError("task.data_file: required for task 'instruct' (Alpaca JSON or JSONL)")
    if not path.is_file():
        raise UserError(f"task.data_file: file '{path}' not found")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"task.data_file: '{path}' is not UTF-8 text (byte {exc.start})") from None
    try:
        if path.suffix == ".jsonl":
            items = [json.loads(line) for line in text.splitlines() if line.strip()]
        else:
            items = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UserError(f"task.data_file: '{path}' is not valid JSON ({exc.msg} at line {exc.lineno})") from None
    if not isinstance(items, list):
        raise UserError(f"task.data_file: '{path}' must hold a list of records")
    records = []
    for i, item in enumerate(items):
        if not isinstance(item, dict) or "instruction" not in item or "output" not in item:
            raise UserError(f"task.data_file: record {i} of '{path}' lacks 'instruction' or 'output'")
        records.append(Record(str(item["instruction"]), str(item.get("input") or ""), str(item["output"])))
    return records


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


def encode(record: Record, tokenizer, max_length: int) -> dict | None:
    """input_ids = prompt + response + eos, labels = IGNORE_INDEX over the prompt; None if nothing to learn."""
    prompt = prompt_ids(record, tokenizer)
    response = tokenizer(record.output, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    input_ids = (prompt + response)[:max_length]
    labels = ([IGNORE_INDEX] * len(prompt) + response)[:max_length]
    if all(t == IGNORE_INDEX for t in labels):
        return None
    return {"input_ids": input_ids, "attention_mask": [1] * len(input_ids), "labels": labels}
