"""Layer-zeroing invariants: exact zero budget in the selected blocks only, criticality definitions, STE, export."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn
from transformers import AutoModelForSequenceClassification

from sparsetune.methods.zeroing import Zeroing, delta_l1_criticality, grad_norm_criticality
from sparsetune.models import HeadSpec, load_model
from sparsetune.rundir import RunDir
from sparsetune.sparse.delta import read_delta
from sparsetune.sparse.mask import ZeroMaskLinear
from sparsetune.train import restore

from conftest import FP32_CPU, load_without_dropout, run_cli, text_batch

TARGETS = ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense")


def zeroing(**settings) -> dict:
    return {"name": "zeroing", "budget": 0.05, "layers": 2, "warmup_batches": 2} | settings


def base_params(folder) -> dict[str, torch.Tensor]:
    return dict(load_model(str(folder), HeadSpec("sequence-classification", 2)).model.named_parameters())


@pytest.mark.parametrize("criticality", ["grad_norm", "delta_l1"])
def test_zeros_exactly_the_budget_in_the_selected_blocks(bert_recipe, tmp_path, tiny_bert4, criticality):
    recipe, model = bert_recipe(zeroing(criticality=criticality), max_steps=3), f"model.name={tiny_bert4}"
    for stage in ("warmup", "select", "train"):  # the stages as separate commands, sharing one run directory
        assert run_cli(stage, recipe, model) == 0
    run = tmp_path / "run"
    scores = json.loads((run / "warmup/criticality.json").read_text())["scores"]
    assert set(scores) == {"0", "1", "2", "3", "embeddings"}
    selected = json.loads((run / "mask/selection.json").read_text())["blocks"]
    assert selected == sorted(sorted(range(4), key=lambda i: scores[str(i)], reverse=True)[:2])

    session = restore(RunDir(run), with_data=False)
    wrapped = session.method._wrapped
    base = base_params(tiny_bert4)
    assert all(torch.equal(layer.base_layer.weight, base[f"{name}.weight"]) for name, layer in wrapped.items())
    merged = dict(session.method.merged(session.model).named_parameters())
    expected = {f"bert.encoder.layer.{i}.{t}.weight" for i in selected for t in TARGETS}
    zeroed_total = 0
    for name, value in merged.items():
        if name.startswith("classifier"):
            continue
        changed = value != base[name]
        if name in expected:
            assert torch.all(value[changed] == 0)
            zeroed = int((value == 0).sum() - (base[name] == 0).sum())
            assert zeroed == round(0.05 * value.numel())
            zeroed_total += zeroed
        else:
            assert torch.equal(value, base[name]), name  # every other pretrained entry is bit-identical
    assert zeroed_total == 8 * round(0.05 * 32 * 32)


def test_export_apply_reproduces_logits(bert_recipe, tmp_path, tiny_bert4):
    recipe = bert_recipe(zeroing(), max_steps=3)
    assert run_cli("train", recipe, f"model.name={tiny_bert4}") == 0
    run = tmp_path / "run"
    assert run_cli("export-delta", run, "-o", tmp_path / "task.delta") == 0
    tensors, _ = read_delta(tmp_path / "task.delta")  # the logical entries (the file stores index gaps)
    assert {k.rpartition(".")[2] for k in tensors} == {"zero", "dense"}  # indices, plus the dense head
    assert sum(v.numel() for k, v in tensors.items() if k.endswith(".zero")) == 8 * round(0.05 * 1024)
    assert run_cli("apply-delta", tmp_path / "task.delta", "-o", tmp_path / "applied") == 0
    session = restore(RunDir(run), with_data=False)
    applied = AutoModelForSequenceClassification.from_pretrained(tmp_path / "applied")
    batch = text_batch(session.loaded)
    session.model.eval(), applied.eval()
    with torch.no_grad():
        assert torch.equal(session.model(**batch).logits, applied(**batch).logits)


def test_dense_critical_trains_only_the_selected_blocks(bert_recipe, tmp_path, tiny_bert4):
    assert run_cli("train", bert_recipe(zeroing(mode="dense-critical"), max_steps=2), f"model.name={tiny_bert4}") == 0
    run = tmp_path / "run"
    selected = json.loads((run / "mask/selection.json").read_text())["blocks"]
    merged = dict(restore(RunDir(run), with_data=False).model.named_parameters())
    base = base_params(tiny_bert4)
    moved = {n.split(".")[3] for n in merged if not n.startswith("classifier") and not torch.equal(merged[n], base[n])}
    assert moved == {str(i) for i in selected}


def test_straight_through_gradient_and_ramp():
    torch.manual_seed(0)
    layer = nn.Linear(6, 4)
    wrapped = ZeroMaskLinear(layer, k=5, init=-layer.weight.detach().abs())
    x = torch.randn(3, 6)
    wrapped.active_k = 0  # the start of a ramp: nothing zeroed
    assert torch.equal(wrapped(x), layer(x))
    wrapped.active_k = 5
    out = wrapped(x)
    zeroed = wrapped.zeroed()
    assert torch.equal(zeroed, (-layer.weight.abs()).reshape(-1).topk(5).indices.sort().values)  # smallest |W|
    used = layer.weight.detach().clone().reshape(-1)
    used[zeroed] = 0
    used = used.view_as(layer.weight).requires_grad_(True)
    reference = x @ used.t() + layer.bias
    assert torch.equal(out, reference)
    out.square().sum().backward()
    reference.square().sum().backward()
    assert torch.allclose(wrapped.scores.grad, -(used.grad * layer.weight.detach()))
    assert layer.weight.grad is None


def test_entries_already_zero_in_the_base_never_count_to_the_budget():
    """A dequantized checkpoint holds exact zeros; `init: magnitude` ranks them first, so they must be skipped."""
    torch.manual_seed(0)
    layer = nn.Linear(10, 10)
    with torch.no_grad():
        layer.weight.view(-1)[::10] = 0  # 10 base zeros
    wrapped = ZeroMaskLinear(layer, k=7, init=-layer.weight.detach().abs())
    zeroed = wrapped.zeroed()
    assert zeroed.numel() == 7 and torch.all(layer.weight.view(-1)[zeroed] != 0)
    nonzero = layer.weight.view(-1) != 0
    expected = (-layer.weight.abs()).reshape(-1).masked_fill(~nonzero, float("-inf")).topk(7).indices.sort().values
    assert torch.equal(zeroed, expected)  # the 7 smallest non-zero magnitudes
    x = torch.randn(2, 10)
    used = layer.weight.detach().clone().reshape(-1)
    used[zeroed] = 0
    assert torch.equal(wrapped(x), x @ used.view_as(layer.weight).t() + layer.bias)
    assert int((used == 0).sum()) == 17  # the base's 10 and the budget's 7
    assert ZeroMaskLinear(layer, k=95, init=torch.zeros_like(layer.weight)).k == 90  # never more than can change


def test_a_delta_counts_only_entries_it_changes(bert_recipe, tmp_path, tiny_bert4, glue_root):
    """Through the CLI on a base with 10% exact zeros in every targeted matrix: the delta's zeros are all changes."""
    folder = tmp_path / "zeros-bert"
    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert4, num_labels=2)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if any(t in name for t in TARGETS) and name.endswith("weight"):
                param.view(-1)[::10] = 0
    model.base_model.save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        (folder / name).write_bytes((tiny_bert4 / name).read_bytes())
    recipe = bert_recipe(zeroing(criticality="grad_norm"), max_steps=2)
    assert run_cli("train", recipe, f"model.name={folder}") == 0
    assert run_cli("export-delta", tmp_path / "run", "-o", tmp_path / "d.safetensors") == 0
    tensors, _ = read_delta(tmp_path / "d.safetensors")
    base = base_params(folder)
    zeros = {k.removesuffix(".zero"): v for k, v in tensors.items() if k.endswith(".zero")}
    assert len(zeros) == 2 * len(TARGETS)
    for name, idx in zeros.items():
        assert idx.numel() == round(0.05 * base[name].numel()) and torch.all(base[name].view(-1)[idx] != 0), name


def test_criticality_follows_its_definitions(tiny_bert4):
    loaded = load_without_dropout(tiny_bert4)
    model, batches = loaded.model, [text_batch(loaded)] * 2
    groups = Zeroing.layer_groups(model)
    assert groups["embeddings"] == ["bert.embeddings.word_embeddings.weight"]
    reference = copy.deepcopy(model)

    scores = grad_norm_criticality(model, groups, [(b, 1.0) for b in batches], FP32_CPU)
    loss = sum(reference(**b).loss for b in batches) / 2
    params = dict(reference.named_parameters())
    for layer, names in groups.items():
        grads = torch.autograd.grad(loss, [params[n] for n in names], retain_graph=True)
        norm = torch.cat([g.reshape(-1) for g in grads]).norm()
        weight = torch.cat([params[n].detach().reshape(-1) for n in names]).norm()
        assert scores[layer] == pytest.approx(float(norm / weight), rel=1e-4)

    scores = delta_l1_criticality(model, groups, [(b, 1.0) for b in batches], 1e-3, FP32_CPU)
    tuned = copy.deepcopy(reference)
    optimizer = torch.optim.AdamW(tuned.parameters(), lr=1e-3, weight_decay=0.0)
    for b in batches:
        tuned(**b).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    after = {n: p.detach() for n, p in tuned.named_parameters()}
    params = {n: p.detach() for n, p in params.items()}
    for layer, names in groups.items():
        change = sum((after[n] - params[n]).abs().sum() for n in names)
        assert scores[layer] == pytest.approx(float(change / sum(params[n].abs().sum() for n in names)), rel=1e-4)
    assert all(torch.equal(p, params[n]) for n, p in model.named_parameters())  # the warm-up left the model as it was


def test_too_many_layers_is_one_line(bert_recipe, tiny_bert4, capsys):
    assert run_cli("validate", bert_recipe(zeroing(layers=9)), f"model.name={tiny_bert4}") == 2
    assert "method.layers: 9 blocks asked for, the model has 4" in capsys.readouterr().err
