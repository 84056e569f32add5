"""The compact delta format: index sets as narrow gaps with escapes, exact round trips, old files still load."""

from __future__ import annotations


import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModelForSequenceClassification

from sparsetune.sparse.delta import decode_indices, encode_indices, read_delta

from conftest import run_cli


def sample(numel: int, count: int, seed: int) -> torch.Tensor:
    return torch.randperm(numel, generator=torch.Generator().manual_seed(seed))[:count].sort().values


@pytest.mark.parametrize("numel,count", [(1, 1), (10, 0), (1024, 8), (147_456, 1180), (147_456, 7372),
                                         (2**20, 3), (2**33, 50), (70_000, 70_000)])
def test_indices_round_trip_exactly(numel, count):
    if numel > 2**24:  # too large to permute: random draws, made unique
        idx = torch.randint(0, numel, (count,), generator=torch.Generator().manual_seed(1)).unique()
    else:
        idx = sample(numel, count, 0)
    encoded = encode_indices(idx)
    assert torch.equal(decode_indices(encoded["gaps"], encoded.get("gapx")), idx.long())


def test_the_smaller_form_is_chosen_and_large_gaps_survive():
    dense = torch.arange(0, 5000, 2)  # gaps of 1: one byte each
    assert encode_indices(dense)["gaps"].dtype == torch.uint8 and encode_indices(dense)["gaps"].numel() == 2500
    runs = torch.tensor([0, 300, 600, 900])  # gaps near 300: two bytes each in uint8, as in int16
    assert torch.equal(decode_indices(encode_indices(runs)["gaps"], None), runs)
    huge = torch.tensor([0, 1, 70_000, 70_001, 2**31 + 5, 2**40])  # gaps past int16 and int32: escaped
    encoded = encode_indices(huge)
    assert encoded["gaps"].dtype == torch.int16 and encoded["gapx"].dtype == torch.int64
    assert torch.equal(decode_indices(encoded["gaps"], encoded["gapx"]), huge)


@pytest.mark.parametrize("share,limit", [(0.008, 6.0), (0.05, 2.0)])
def test_bytes_per_entry_at_the_default_budgets(share, limit):
    """SIFT at 0.8%: index + fp32 value <= 6 bytes; zeroing at 5%: index alone <= 2 bytes (384 x 384 tensors)."""
    numel, total, entries = 384 * 384, 0, 0
    for seed in range(8):
        idx = sample(numel, round(share * numel), seed)
        total += sum(t.numel() * t.element_size() for t in encode_indices(idx).values())
        entries += idx.numel()
    per_entry = total / entries + (4 if share == 0.008 else 0)
    assert per_entry <= limit, per_entry


def test_decoding_refuses_inconsistent_escapes():
    encoded = encode_indices(torch.tensor([0, 2**40]))  # one huge gap: int16 with an escape
    with pytest.raises(Exception, match="escaped gaps"):
        decode_indices(encoded["gaps"], None)
    with pytest.raises(Exception, match="must end"):
        decode_indices(torch.tensor([3, 255], dtype=torch.uint8), None)


@pytest.fixture
def trained_sift(bert_recipe, tmp_path):
    assert run_cli("train", bert_recipe({"name": "sift", "budget": 0.05, "warmup_batches": 1}, max_steps=2)) == 0
    return tmp_path / "run"


def test_old_format_delta_still_applies(trained_sift, tmp_path):
    """A version-1 file (plain int32 indices) of the same entries merges into the same weights."""
    assert run_cli("export-delta", trained_sift, "-o", tmp_path / "v2.safetensors") == 0
    tensors, _ = read_delta(tmp_path / "v2.safetensors")
    with safe_open(str(tmp_path / "v2.safetensors"), framework="pt") as handle:
        metadata = handle.metadata()
        assert metadata["version"] == "2" and any(k.endswith(".idx.gaps") for k in handle.keys())
    old = {k: v.int() if k.endswith((".idx", ".zero")) else v for k, v in tensors.items()}
    save_file(old, str(tmp_path / "v1.safetensors"), metadata=metadata | {"version": "1"})
    for name in ("v1", "v2"):
        assert run_cli("apply-delta", tmp_path / f"{name}.safetensors", "-o", tmp_path / f"merged-{name}") == 0
    a, b = (load_file(tmp_path / f"merged-{n}" / "model.safetensors") for n in ("v1", "v2"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_bf16_values_state_their_largest_error(trained_sift, tmp_path):
    assert run_cli("export-delta", trained_sift, "-o", tmp_path / "exact") == 0
    assert run_cli("export-delta", trained_sift, "-o", tmp_path / "bf16", "--values", "bf16") == 0
    assert (tmp_path / "bf16").stat().st_size < (tmp_path / "exact").stat().st_size
    exact, _ = read_delta(tmp_path / "exact")
    rounded, meta = read_delta(tmp_path / "bf16")
    errors = [float((rounded[k].float() - exact[k]).abs().max()) for k in exact if k.endswith(".val")]
    assert meta["values"] == "bf16" and meta["values_max_abs_error"] == max(errors) > 0
    for folder in ("exact", "bf16"):
        assert run_cli("apply-delta", tmp_path / folder, "-o", tmp_path / f"m-{folder}") == 0
    a = AutoModelForSequenceClassification.from_pretrained(tmp_path / "m-exact").state_dict()
    b = AutoModelForSequenceClassification.from_pretrained(tmp_path / "m-bf16").state_dict()
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert 0 < worst <= meta["values_max_abs_error"] * 1.01 + 1e-7  # W0 + v in fp32 adds at most an ulp


def test_bf16_values_need_a_delta_file(bert_recipe, tmp_path, capsys):
    assert run_cli("train", bert_recipe({"name": "lora", "r": 2}, max_steps=1)) == 0
    capsys.readouterr()
    assert run_cli("export-delta", tmp_path / "run", "-o", tmp_path / "x", "--values", "bf16") == 2
    assert "--values bf16" in capsys.readouterr().err and not (tmp_path / "x").exists()


def test_unsorted_entries_are_stored_sorted_and_apply_exactly(tmp_path):
    """write_delta sorts index sets itself (values alike), so the base checksums name what the file reads back."""
    from sparsetune.sparse.delta import apply_delta, write_delta

    base = {"w": torch.arange(12.0).reshape(3, 4), "b": torch.ones(5)}
    tensors = {"w.idx": torch.tensor([9, 2, 5], dtype=torch.int32), "w.val": torch.tensor([0.5, -1.0, 2.0]),
               "b.zero": torch.tensor([4, 0], dtype=torch.int32)}
    write_delta(tmp_path / "d", tensors, base, frozenset(base), {"base_model": "x", "head": {}})
    model = torch.nn.Module()
    model.w, model.b = (torch.nn.Parameter(base[n].clone()) for n in ("w", "b"))
    apply_delta(model, *read_delta(tmp_path / "d"))
    expected = base["w"].clone().view(-1)
    expected[[9, 2, 5]] += torch.tensor([0.5, -1.0, 2.0])
    assert torch.equal(model.w.detach().view(-1), expected)
    assert torch.equal(model.b.detach(), torch.tensor([0.0, 1, 1, 1, 0]))
