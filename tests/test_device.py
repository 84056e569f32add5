"""Device and precision: bf16/fp16 bases, SIFT's exact increments on them, activation checkpointing, grad: auto,
device errors. CUDA-only checks skip without a GPU."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from transformers import AutoModelForSequenceClassification


from sparsetune.device import Placement
from sparsetune.evaluate import evaluate
from sparsetune.models import find_blocks
from sparsetune.recipe import load_recipe
from sparsetune.rundir import RunDir
from sparsetune.sparse import increments
from sparsetune.sparse.increments import SiftLinear, use_indexed
from sparsetune.train import build, restore

from conftest import run_cli
from test_methods import METHOD_SETTINGS, losses

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
BF16_CPU = Placement(torch.device("cpu"), torch.bfloat16)


def _sift_linear(weight: torch.Tensor, idx: torch.Tensor, grad_mode: str = "auto") -> SiftLinear:
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    layer.weight.data.copy_(weight)
    return SiftLinear(layer, idx, None, grad_mode)


def test_bf16_base_keeps_an_increment_far_below_its_ulp():
    torch.manual_seed(0)
    weight = torch.full((4, 8), 0.75) + 0.01 * torch.randn(4, 8)
    idx = torch.tensor([5, 17])  # rows 0 and 2, columns 5 and 1
    wrapped = BF16_CPU.place(_sift_linear(weight, idx))
    assert wrapped.base_layer.weight.dtype == torch.bfloat16 and wrapped.weight_inc.values.dtype == torch.float32
    w0 = wrapped.base_layer.weight.float()
    ulp = 2.0 ** (torch.floor(torch.log2(w0.reshape(-1)[idx].abs())) - 7)  # bf16: 8 significant bits
    increment = 1e-2 * ulp  # a hundredth of an ulp
    assert torch.equal((w0.reshape(-1)[idx] + increment).bfloat16().float(), w0.reshape(-1)[idx])  # a write-back loses it
    x = torch.randn(3, 8)
    with BF16_CPU.autocast():
        before = wrapped(x)
        with torch.no_grad():
            wrapped.weight_inc.values.copy_(increment)
        wrapped.write_back()
        after = wrapped(x)
    assert after.dtype == torch.float32
    change = (after - before).double()
    expected = torch.zeros(3, 4, dtype=torch.float64)
    expected[:, 0] = increment[0].double() * x[:, 5].bfloat16().double()
    expected[:, 2] = increment[1].double() * x[:, 1].bfloat16().double()
    assert expected.abs().min(dim=0).values[[0, 2]].min() > 0
    resolution = 4 * torch.finfo(torch.float32).eps * after.abs().max().item()  # the fp32 output's own rounding
    assert resolution < 0.05 * expected.abs().max(dim=0).values[[0, 2]].min()
    torch.testing.assert_close(change, expected, rtol=0, atol=resolution)  # fp32 output: the increment is there
    assert torch.equal(change[:, [1, 3]], torch.zeros(3, 2, dtype=torch.float64))  # and only where it belongs


@pytest.mark.parametrize("grad", ["indexed", "dense"])
def test_bf16_gradients_match_the_dense_reference(grad):
    torch.manual_seed(0)
    weight, x = torch.randn(6, 10), torch.randn(2, 5, 10, requires_grad=True)
    idx = torch.randperm(60)[:12].sort().values
    wrapped = BF16_CPU.place(_sift_linear(weight, idx, grad))
    with torch.no_grad():
        wrapped.weight_inc.values.copy_(torch.randn(12) * 1e-2)
    dy = torch.randn(2, 5, 6)
    with BF16_CPU.autocast():
        y = wrapped(x)
    y.backward(dy)
    # reference: the same bf16 base plus the fp32 increments as one dense fp32 weight
    effective = wrapped.base_layer.weight.float().reshape(-1).clone()
    effective[idx] += wrapped.weight_inc.values.detach()
    x_ref = x.detach().bfloat16().float().requires_grad_(True)
    w_ref = effective.view(6, 10).requires_grad_(True)
    torch.nn.functional.linear(x_ref, w_ref).backward(dy)
    # the base's product is rounded to bf16 (about 0.4%); the increments' share is added in fp32
    torch.testing.assert_close(y.detach(), torch.nn.functional.linear(x_ref, w_ref).detach(), rtol=1e-2, atol=1e-2)
    tol = {"rtol": 2e-2, "atol": 2e-2} if grad == "dense" else {"rtol": 1e-4, "atol": 1e-4}  # dense dW is bf16
    torch.testing.assert_close(wrapped.weight_inc.values.grad, w_ref.grad.reshape(-1)[idx], **tol)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=2e-2, atol=2e-2)  # through the bf16 base


def test_grad_auto_follows_the_measured_rule(monkeypatch):
    cases = [  # (k, rows, cols, tokens, indexed?) as docs/BENCH.md's CPU crossover table has them
        (1180, 384, 384, 128, True),  # MiniLM at 1 x 128, 0.8%: indexed
        (1180, 384, 384, 4096, False),  # MiniLM at 32 x 128: its small tensors go dense
        (2654, 576, 576, 1024, True), (885, 192, 576, 1024, False),  # SmolLM2 at 4 x 256, 0.8%
        (16777, 2048, 2048, 4096, False), (4194, 2048, 2048, 4096, True),  # 1B-scale q/o at 8 x 512: 0.4%, 0.1%
        (167772, 8192, 2048, 4096, True), (838860, 8192, 2048, 4096, False),  # its MLP: 1%, 5%
    ]
    for k, rows, cols, tokens, indexed in cases:
        assert use_indexed("auto", k, rows * cols, tokens, "cpu") is indexed, (k, rows, cols, tokens)
    assert not use_indexed("auto", 1, 10**6, 128, "cuda")  # not measured there yet: the dense GEMM
    assert use_indexed("indexed", 10**6, 10**6, 4096, "cpu") and not use_indexed("dense", 1, 10**6, 128, "cpu")
    calls = []
    real = increments.sampled_weight_grad
    monkeypatch.setattr(increments, "sampled_weight_grad", lambda *a: calls.append(1) or real(*a))
    torch.manual_seed(0)
    weight, x = torch.randn(64, 64), torch.randn(16, 64)
    for density, indexed in ((0.005, True), (0.1, False)):  # 16 tokens: indexed below 2%
        calls.clear()
        k = max(1, int(density * 64 * 64))
        layer = _sift_linear(weight, torch.randperm(64 * 64)[:k])
        layer(x).sum().backward()
        assert bool(calls) == indexed and layer.weight_inc.values.grad is not None


@pytest.mark.parametrize("method", sorted(METHOD_SETTINGS))
def test_every_method_trains_in_bf16_through_the_cli(bert_recipe, tmp_path, method):
    run = tmp_path / "run"
    assert run_cli("train", bert_recipe(METHOD_SETTINGS[method], device="cpu", dtype="bf16")) == 0
    manifest = json.loads((run / "manifest.json").read_text())
    assert (manifest["device"], manifest["dtype"]) == ("cpu", "bf16") and "peak_device_memory_bytes" in manifest
    assert manifest["stages"]["train"]["dtype"] == "bf16"
    trained = load_file(str(run / "final/trainable.safetensors"))
    assert trained and all(t.dtype == torch.float32 for t in trained.values())  # trainables stay fp32
    assert len(losses(run)) == 4 and all(torch.isfinite(torch.tensor(v)) for v in losses(run))
    session = restore(RunDir(run), with_data=False)
    frozen = [p for p in session.model.parameters() if not p.requires_grad and p.ndim >= 2]
    assert all(p.dtype == torch.bfloat16 for p in frozen) and (frozen or method == "full")
    assert all(p.dtype == torch.float32 for p in session.model.parameters() if p.requires_grad)


@pytest.mark.parametrize("method", ["full", "sift"])
def test_fp16_trains_with_a_loss_scaler(bert_recipe, tmp_path, method):
    run = tmp_path / "run"
    assert run_cli("train", bert_recipe(METHOD_SETTINGS[method], device="cpu", dtype="fp16", save_every=2)) == 0
    state = torch.load(run / "checkpoints/step-2/state.pt", weights_only=True)
    assert state["scaler"]["scale"] > 0  # the scaler's state is checkpointed for resume
    assert len(losses(run)) == 4 and all(torch.isfinite(torch.tensor(v)) for v in losses(run))


def test_bf16_loss_curve_tracks_fp32(bert_recipe, tmp_path):
    curves = {}
    for dtype in ("fp32", "bf16"):
        recipe = bert_recipe(METHOD_SETTINGS["sift"], max_steps=12, lr=1e-2, device="cpu", dtype=dtype)
        assert run_cli("train", recipe, f"output_dir={tmp_path / dtype}") == 0
        curves[dtype] = losses(tmp_path / dtype)
    assert len(curves["bf16"]) == 12
    gaps = [abs(a - b) for a, b in zip(curves["fp32"], curves["bf16"])]
    spread = max(curves["fp32"]) - min(curves["fp32"])
    assert spread > 0.01 and max(gaps) < 0.1 * spread, gaps  # the curve's shape, step for step, not just its level


@pytest.mark.parametrize("method", ["sift", "zeroing", "lora"])
def test_bf16_delta_applies_to_the_fp32_base_and_scores_what_the_run_scored(bert_recipe, tmp_path, tiny_bert,
                                                                           method):
    run = tmp_path / "run"
    settings = METHOD_SETTINGS[method]
    assert run_cli("train", bert_recipe(settings, max_steps=8, lr=1e-2, device="cpu", dtype="bf16")) == 0
    assert run_cli("export-delta", run, "-o", tmp_path / "delta") == 0
    assert run_cli("apply-delta", tmp_path / "delta", "-o", tmp_path / "merged") == 0
    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged")
    base = AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=2)
    assert all(p.dtype == torch.float32 for p in merged.parameters())
    if method == "sift":  # the fp32 base as distributed, plus the trained fp32 increments, entry for entry
        session = restore(RunDir(run), with_data=False)
        base_params, merged_params = dict(base.named_parameters()), dict(merged.named_parameters())
        for name, layer in session.method.increments(session.model).items():
            expected = base_params[f"{name}.weight"].detach().reshape(-1).clone()
            expected[layer.weight_inc.idx] = expected[layer.weight_inc.idx] + layer.weight_inc.values.detach()
            assert torch.equal(merged_params[f"{name}.weight"].detach().reshape(-1), expected), name
    session = restore(RunDir(run))
    results = json.loads((run / "eval/results.json").read_text())
    fp32 = Placement(torch.device("cpu"), torch.float32)
    metrics, rows = evaluate(merged, session.data, session.loaded.tokenizer, 8, fp32)
    assert metrics == pytest.approx(results["metrics"], abs=1 / 12)  # at most one of the 12 dev rows may flip
    predicted = [json.loads(line)["prediction"] for line in (run / "eval/predictions.jsonl").read_text().splitlines()]
    assert sum(a == r["prediction"] for a, r in zip(predicted, rows)) >= len(rows) - 1
    dev = session.data.evals[0]
    batch = dev.batch(range(len(dev)), session.loaded.tokenizer.pad_token_id)
    batch.pop("labels")
    with torch.no_grad(), session.placement.autocast():
        run_logits = session.model(**batch).logits.float()
    with torch.no_grad():
        merged_logits = merged.eval()(**batch).logits
    torch.testing.assert_close(merged_logits, run_logits, rtol=0.05, atol=0.05)  # bf16 base against fp32 base


@pytest.mark.parametrize("method", sorted(METHOD_SETTINGS))
def test_gradient_checkpointing_gives_the_same_gradients(bert_recipe, tmp_path, method):
    recipe_path = bert_recipe(METHOD_SETTINGS[method], device="cpu")
    assert run_cli("warmup", recipe_path) == 0 and run_cli("select", recipe_path) == 0  # where the method has them
    grads, forwards = {}, {}
    for checkpointing in (False, True):
        recipe = load_recipe(recipe_path, [f"train.gradient_checkpointing={checkpointing}"])
        session = build(recipe, RunDir(recipe.output_dir))
        model = session.model
        for module in model.modules():
            if isinstance(module, nn.Dropout):
                module.p = 0.0
        _, blocks = find_blocks(session.loaded.model)
        count = []
        next(blocks[-1].children()).register_forward_hook(lambda *_: count.append(1))  # runs inside the block
        model.train()
        train = session.data.train
        session.method.before_step(model, 0, train, session.loaded.tokenizer.pad_token_id)  # IST draws blocks
        batch = train.batch(range(4), session.loaded.tokenizer.pad_token_id)
        model(**batch).loss.backward()
        grads[checkpointing] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        forwards[checkpointing] = len(count)
    assert forwards == {False: 1, True: 2}  # the last block's insides really ran again in the backward
    assert grads[False] and grads[False].keys() == grads[True].keys()
    for name, grad in grads[False].items():
        torch.testing.assert_close(grads[True][name], grad, rtol=1e-5, atol=1e-7, msg=name)


def test_a_device_this_machine_lacks_is_one_clear_error(bert_recipe, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for device, message in (("cuda", "sees no CUDA device"), ("cuda:3", "sees no CUDA device"),
                            ("tpu", "expected auto, cpu, cuda, cuda:N or mps")):
        capsys.readouterr()
        assert run_cli("train", bert_recipe(), f"train.device={device}") == 2
        err = capsys.readouterr().err
        assert err.startswith("error: train.device") and message in err and "Traceback" not in err
        assert len(err.strip().splitlines()) == 1
        assert not (tmp_path / "run").exists()  # nothing written


def test_bf16_on_a_gpu_without_it_is_one_clear_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Tesla V100")
    from sparsetune.errors import UserError

    with pytest.raises(UserError, match="train.dtype: bf16 asked for, but Tesla V100 does not support bfloat16"):
        Placement.from_config(SimpleNamespace(device="cuda", dtype="bf16", gradient_checkpointing=False))
    with pytest.raises(UserError, match="only 1 CUDA device"):
        Placement.from_config(SimpleNamespace(device="cuda:1", dtype="fp32", gradient_checkpointing=False))


# --- on a GPU -------------------------------------------------------------------------------------------
@needs_cuda
@pytest.mark.parametrize("grad", ["indexed", "dense"])
def test_cuda_sift_gradients_match_the_cpu(grad):
    torch.manual_seed(0)
    weight, x, dy = torch.randn(64, 48), torch.randn(2, 9, 48), torch.randn(2, 9, 64)
    idx = torch.randperm(64 * 48)[:100].sort().values
    results = {}
    for device in ("cpu", "cuda"):
        layer = _sift_linear(weight, idx, grad).to(device)
        xd = x.to(device).requires_grad_(True)
        layer(xd).backward(dy.to(device))
        results[device] = (layer.weight_inc.values.grad.cpu(), xd.grad.cpu())
    torch.testing.assert_close(results["cuda"][0], results["cpu"][0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(results["cuda"][1], results["cpu"][1], rtol=1e-4, atol=1e-4)


@needs_cuda
def test_cuda_bf16_run_exports_a_delta_that_applies_on_the_cpu(bert_recipe, tmp_path):
    run = tmp_path / "run"
    assert run_cli("train", bert_recipe(METHOD_SETTINGS["sift"], device="cuda", dtype="bf16")) == 0
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["device"].startswith("cuda") and manifest["peak_device_memory_bytes"] > 0
    assert run_cli("export-delta", run, "-o", tmp_path / "delta", "--device", "cuda") == 0
    assert run_cli("apply-delta", tmp_path / "delta", "-o", tmp_path / "merged", "--device", "cpu") == 0
    assert run_cli("eval", run, "--device", "cpu") == 0
    assert Path(tmp_path / "merged/config.json").is_file()
