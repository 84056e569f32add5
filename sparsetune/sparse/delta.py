"""The delta file: a self-describing safetensors file that turns the base model into the tuned one.

Entries per parameter: `<p>.dense` (new values), `<p>.idx` + `<p>.val` (flat indices, new - base),
or `<p>.zero` (flat indices set to zero). The header carries the method, the base model id, the head,
per-tensor counts and a checksum of the base values at every touched entry, so a delta is never
applied to a different base.

On disk (format version 2) index sets are stored sorted, as gaps (`encode_indices`): `<p>.<kind>.gaps` is a
uint8 stream (a gap g as g // 255 bytes of 255 and a byte g % 255) or, when smaller, int16 gaps whose large
ones are escaped into `<p>.<kind>.gapx` (int64). At the 0.8% default a SIFT entry's index costs about 1.3
bytes instead of 4 (README, "The delta file"). Version 1 files (int32/int64 `.idx` and `.zero`) still load.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from sparsetune.errors import UserError
from sparsetune.rundir import atomic_path

FORMAT = "sparsetune-delta"
VERSION = "2"
READABLE_VERSIONS = ("1", "2")
KINDS = ("dense", "idx", "val", "zero")
INDEX_KINDS = ("idx", "zero")
ESCAPE16 = torch.iinfo(torch.int16).max


def encode_indices(idx: torch.Tensor) -> dict[str, torch.Tensor]:
    """Sorted unique flat indices as gaps g (idx[0], then idx[i] - idx[i-1] - 1), in the smaller of two forms:

    - uint8 runs: each gap as g // 255 bytes of 255 and one byte g % 255 (a gap under 255 is one byte);
    - int16 with escapes: a gap under 32767 as itself, a larger one as 32767 and its value in `gapx` (int64).
    """
    gaps = torch.diff(idx.long(), prepend=torch.tensor([-1])) - 1
    if (gaps < 0).any():
        raise ValueError("encode_indices: indices must be sorted and unique")
    runs = gaps // 255 + 1  # bytes per gap in the uint8 form
    large = gaps >= ESCAPE16
    if int(runs.sum()) <= 2 * gaps.numel() + 8 * int(large.sum()):
        stream = torch.full((int(runs.sum()),), 255, dtype=torch.uint8)
        stream[torch.cumsum(runs, 0) - 1] = (gaps % 255).to(torch.uint8)
        return {"gaps": stream}
    encoded = {"gaps": torch.where(large, ESCAPE16, gaps).to(torch.int16)}
    return encoded | ({"gapx": gaps[large]} if large.any() else {})


def decode_indices(gaps: torch.Tensor, gapx: torch.Tensor | None) -> torch.Tensor:
    """The int64 flat indices that `encode_indices` stored."""
    if gaps.ndim != 1 or gaps.dtype not in (torch.uint8, torch.int16):
        raise UserError(f"delta: index gaps must be 1-D uint8 or int16, got {gaps.dtype} of shape {tuple(gaps.shape)}")
    values = gaps.long()
    if gaps.dtype == torch.uint8:
        if gapx is not None or (values.numel() and values[-1] == 255):
            raise UserError("delta: a uint8 gap stream must end its last gap and has no escaped gaps")
        ends = values < 255
        return torch.cumsum(torch.where(ends, values + 1, values), 0)[ends] - 1
    large = values == ESCAPE16
    count = int(large.sum())
    if count != (0 if gapx is None else gapx.numel()) or (gapx is not None and gapx.dtype != torch.int64):
        raise UserError(f"delta: {count} escaped gaps but {0 if gapx is None else gapx.numel()} large gaps stored")
    if count:
        values[large] = gapx
    return torch.cumsum(values + 1, 0) - 1


def _sorted(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Index sets in ascending order, their values permuted alike (what the gap coding stores, and what the base
    checksums are taken over, so that a file reads back to the entries its checksums name)."""
    result = dict(tensors)
    for key, value in tensors.items():
        name, kind = split_key(key)
        if kind in INDEX_KINDS:
            order = torch.argsort(value.long())
            result[key] = value[order]
            if kind == "idx":
                result[f"{name}.val"] = tensors[f"{name}.val"][order]
    return result


def _pack(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The file's entries: sorted index sets stored as gaps."""
    packed: dict[str, torch.Tensor] = {}
    for key, value in tensors.items():
        if split_key(key)[1] in INDEX_KINDS:
            packed |= {f"{key}.{part}": t for part, t in encode_indices(value).items()}
        else:
            packed[key] = value
    return packed


def _unpack(stored: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The logical entries (`.idx`, `.zero` as int64) of a version-2 file."""
    tensors: dict[str, torch.Tensor] = {}
    for key, value in stored.items():
        if key.endswith(".gapx"):
            continue
        if key.endswith(".gaps"):
            base = key.removesuffix(".gaps")
            tensors[base] = decode_indices(value, stored.get(f"{base}.gapx"))
        else:
            tensors[key] = value
    return tensors


CHECKSUM_CHARS = 16  # a 64-bit prefix of the sha256: a wrong base never matches by chance, and it keeps deltas small


def base_checksum(base: torch.Tensor, idx: torch.Tensor | None) -> str:
    """sha256 (its first CHECKSUM_CHARS hex digits) of the base values at the touched flat indices (all of them
    when idx is None)."""
    values = base.detach().reshape(-1) if idx is None else base.detach().reshape(-1)[idx.long().to(base.device)]
    return hashlib.sha256(values.contiguous().cpu().numpy().tobytes()).hexdigest()[:CHECKSUM_CHARS]


def same_base(actual: str, expected: str) -> bool:
    """Whether a recorded checksum (full sha256 in older files, its prefix now) names these base values."""
    return len(expected) >= CHECKSUM_CHARS and expected[:CHECKSUM_CHARS] == actual


def split_key(key: str) -> tuple[str, str]:
    name, _, kind = key.rpartition(".")
    if kind not in KINDS:
        raise UserError(f"delta entry '{key}': unknown kind '{kind}'")
    return name, kind


def _touched(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor | None]:
    """Parameter name -> its touched flat indices (None for dense entries)."""
    touched: dict[str, torch.Tensor | None] = {}
    for key, value in tensors.items():
        name, kind = split_key(key)
        if kind in ("idx", "zero"):
            touched[name] = value
        elif kind == "dense":
            touched[name] = None
    return touched


def index_dtype(numel: int) -> torch.dtype:
    return torch.int32 if numel < 2**31 else torch.int64


def write_delta(
    path: Path,
    tensors: dict[str, torch.Tensor],
    base_params: dict[str, torch.Tensor],
    pretrained_names: frozenset[str],
    meta: dict,
    values: str = "fp32",
) -> int:
    """Write the delta with checksums of `base_params` at the touched entries; returns its size in bytes.

    `values="bf16"` stores the sparse increments in bfloat16 (lossy: the header records the largest error it
    introduced); dense entries stay fp32.
    """
    tensors = _sorted({k: v.detach().cpu() for k, v in tensors.items()})
    touched = _touched(tensors)
    header = dict(meta)
    if values == "bf16":
        rounded = {k: v.detach().to(torch.bfloat16) for k, v in tensors.items() if k.endswith(".val")}
        header["values"] = "bf16"
        header["values_max_abs_error"] = max((float((v.float() - tensors[k].detach().float()).abs().max())
                                              for k, v in rounded.items() if v.numel()), default=0.0)
        tensors = tensors | rounded
    header["base_checksums"] = {n: base_checksum(base_params[n], i) for n, i in touched.items() if n in pretrained_names}
    with atomic_path(path) as tmp:
        save_file(
            {k: v.contiguous() for k, v in _pack(tensors).items()},
            str(tmp),
            metadata={"format": FORMAT, "version": VERSION, "meta": json.dumps(header)},
        )
    return path.stat().st_size


def read_delta(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    if not path.is_file():
        raise UserError(f"delta file '{path}' not found")
    try:
        with safe_open(str(path), framework="pt") as handle:
            header = handle.metadata() or {}
            tensors = {k: handle.get_tensor(k) for k in handle.keys()}
    except Exception as exc:  # safetensors raises its own error types for a damaged file
        raise UserError(f"'{path}' is not a safetensors delta file ({exc})") from None
    if header.get("format") != FORMAT:
        raise UserError(f"'{path}' is not a sparsetune delta (format={header.get('format')!r})")
    if header.get("version") not in READABLE_VERSIONS:
        raise UserError(f"'{path}': delta format version {header.get('version')} is not supported (this sparsetune "
                        f"reads {', '.join(READABLE_VERSIONS)})")
    if header["version"] != "1":
        tensors = _unpack(tensors)
    try:
        meta = json.loads(header["meta"])
        missing = [k for k in ("base_model", "head", "base_checksums") if k not in meta]
    except (KeyError, TypeError, json.JSONDecodeError):
        raise UserError(f"'{path}': the delta's header has no readable 'meta' entry") from None
    if missing:
        raise UserError(f"'{path}': the delta's header lacks {', '.join(missing)}")
    return tensors, meta


def check_entries(tensors: dict[str, torch.Tensor], params: dict[str, torch.Tensor]) -> None:
    """Refuse a delta whose entries cannot be applied to `params`: unknown tensors, indices that are not 1-D
    integers, out of range or repeated, values that do not pair with their indices, dense entries of another shape."""
    for key, value in tensors.items():
        name, kind = split_key(key)
        if name not in params:
            raise UserError(f"delta touches '{name}', which the base model does not have (different base model?)")
        numel = params[name].numel()
        if kind in INDEX_KINDS:
            if value.dtype not in (torch.int32, torch.int64) or value.ndim != 1:
                raise UserError(f"delta entry '{key}': expected 1-D int32/int64 flat indices, got {value.dtype} "
                                f"of shape {tuple(value.shape)}")
            if value.numel() and (int(value.min()) < 0 or int(value.max()) >= numel):
                raise UserError(f"delta entry '{key}': indices must lie in [0, {numel}), got {int(value.min())}.."
                                f"{int(value.max())}")
            if torch.unique(value).numel() != value.numel():
                raise UserError(f"delta entry '{key}': {value.numel() - torch.unique(value).numel()} repeated indices")
        if kind in ("dense", "val") and not value.is_floating_point():
            raise UserError(f"delta entry '{key}': expected floating-point values, got {value.dtype}")
        if kind == "dense" and value.shape != params[name].shape:
            raise UserError(f"delta entry '{key}' has shape {tuple(value.shape)}, model has {tuple(params[name].shape)}")
        if kind in ("idx", "val"):
            pair = f"{name}.{'val' if kind == 'idx' else 'idx'}"
            if pair not in tensors:
                raise UserError(f"delta entry '{key}' has no matching '{pair}'")
            if kind == "val" and (value.ndim != 1 or value.numel() != tensors[pair].numel()):
                raise UserError(f"delta entry '{key}': expected {tensors[pair].numel()} values (one per index), "
                                f"got shape {tuple(value.shape)}")


def verify_delta(tensors: dict[str, torch.Tensor], meta: dict, params: dict[str, torch.Tensor]) -> None:
    """Refuse malformed entries (`check_entries`) and a base whose values at the touched entries differ."""
    check_entries(tensors, params)
    for name, idx in _touched(tensors).items():
        expected = meta["base_checksums"].get(name)
        if expected is not None and not same_base(base_checksum(params[name], idx), expected):
            raise UserError(f"delta was made for a different base model: the base values of '{name}' differ")


@torch.no_grad()
def apply_delta(model: torch.nn.Module, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    """Apply in place; refuses (before changing anything) malformed entries and a base whose values differ."""
    params = dict(model.named_parameters())
    verify_delta(tensors, meta, params)
    for key, value in tensors.items():
        name, kind = split_key(key)
        flat = params[name].data.view(-1)
        if kind == "dense":
            params[name].data.copy_(value.to(params[name].dtype))
        elif kind == "val":
            idx = tensors[f"{name}.idx"].long()
            idx = idx.to(flat.device)
            flat[idx] = flat[idx] + value.to(flat)
        elif kind == "zero":
            flat[value.long().to(flat.device)] = 0
