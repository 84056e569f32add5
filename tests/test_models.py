"""Model helpers: block discovery and default targets on BERT, Llama and GPT-2 built from configs."""

from __future__ import annotations

import pytest
import torch
from transformers import (BertConfig, BertForSequenceClassification, GPT2Config, GPT2LMHeadModel, LlamaConfig,
                          LlamaForCausalLM)

from sparsetune.errors import UserError
from sparsetune.models import default_targets, find_blocks, resolve

TINY = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64, vocab_size=100)


def test_blocks_and_targets_for_bert():
    model = BertForSequenceClassification(BertConfig(**TINY))
    name, blocks = find_blocks(model)
    assert name == "bert.encoder.layer" and len(blocks) == 3
    assert default_targets(model) == ["attention.self.query", "attention.self.key", "attention.self.value",
                                      "attention.output.dense"]


def test_blocks_and_targets_for_llama():
    model = LlamaForCausalLM(LlamaConfig(**TINY, num_key_value_heads=2))
    name, blocks = find_blocks(model)
    assert name == "model.layers" and len(blocks) == 3
    assert sorted(default_targets(model)) == sorted(["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                                     "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj",
                                                     "mlp.down_proj"])


def test_blocks_for_gpt2():
    model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=3, n_head=2, vocab_size=100))
    name, blocks = find_blocks(model)
    assert name == "transformer.h" and len(blocks) == 3


def test_no_blocks_is_a_clear_error():
    with pytest.raises(UserError, match="model class Linear: no stack of repeated transformer blocks"):
        find_blocks(torch.nn.Linear(2, 2))


def test_unknown_model_names_fail_fast():
    with pytest.raises(UserError, match="did you mean 'minilm-l6'"):
        resolve("minilm-l8")
