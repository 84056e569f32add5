"""The delta file: a self-describing safetensors file that turns the base model into the tuned one.

Entries per parameter: `<p>.dense` (new values), `<p>.idx` + `<p>.val` (flat indices, new - base),
or `<p>.zero` (flat indices set to zero). The header carries the method, the base model id, the head,
per-tensor counts and a checksum of the base values at every touched entry, so a delta is never
applied to a different base.
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
VERSION = "1"
KINDS = ("dense", "idx", "val", "zero")


def base_checksum(base: torch.Tensor, idx: torch.Tensor | None) -> str:
    """sha256 of the base values at the touched flat indices (all of them when idx is None)."""
    values = base.detach().reshape(-1) if idx is None else base.detach().reshape(-1)[idx.long().to(base.device)]
    return hashlib.sha256(values.contiguous().cpu().numpy().tobytes()).hexdigest()


def _split(key: str) -> tuple[str, str]:
    name, _, kind = key.rpartition(".")
    if kind not in KINDS:
        raise UserError(f"delta entry '{key}': unknown kind '{kind}'")
    return name, kind


def _touched(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor | None]:
    """Parameter name -> its touched flat indices (None for dense entries)."""
    touched: dict[str, torch.Tensor | None] = {}
    for key, value in tensors.items():
        name, kind = _split(key)
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
) -> int:
    """Write the delta with checksums of `base_params` at the touched entries; returns its size in bytes."""
    touched = _touched(tensors)
    header = dict(meta)
    header["nnz"] = {n: (base_params[n].numel() if i is None else int(i.numel())) for n, i in touched.items()}
    header["base_checksums"] = {n: base_checksum(base_params[n], i) for n, i in touched.items() if n in pretrained_names}
    with atomic_path(path) as tmp:
        save_file(
            {k: v.detach().contiguous().cpu() for k, v in tensors.items()},
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
    if header.get("version") != VERSION:
        raise UserError(f"'{path}': delta format version {header.get('version')} is not supported (want {VERSION})")
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
        name, kind = _split(key)
        if name not in params:
            raise UserError(f"delta touches '{name}', which the base model does not have (different base model?)")
        numel = params[name].numel()
        if kind in ("idx", "zero"):
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


@torch.no_grad()
def apply_delta(model: torch.nn.Module, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    """Apply in place; refuses (before changing anything) malformed entries and a base whose values differ."""
    params = dict(model.named_parameters())
    check_entries(tensors, params)
    touched = _touched(tensors)
    for name, idx in touched.items():
        expected = meta["base_checksums"].get(name)
        if expected is not None and base_checksum(params[name], idx) != expected:
            raise UserError(f"delta was made for a different base model: the base values of '{name}' differ")
    for key, value in tensors.items():
        name, kind = _split(key)
        flat = params[name].data.view(-1)
        if kind == "dense":
            params[name].data.copy_(value.to(params[name].dtype))
        elif kind == "val":
            idx = tensors[f"{name}.idx"].long()
            idx = idx.to(flat.device)
            flat[idx] = flat[idx] + value.to(flat)
        elif kind == "zero":
            flat[value.long().to(flat.device)] = 0
