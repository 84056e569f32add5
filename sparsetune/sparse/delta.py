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
    return tensors, json.loads(header["meta"])


@torch.no_grad()
def apply_delta(model: torch.nn.Module, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    """Apply in place; refuses (before changing anything) when the base values do not match."""
    params = dict(model.named_parameters())
    touched = _touched(tensors)
    for name, idx in touched.items():
        if name not in params:
            raise UserError(f"delta touches '{name}', which the base model does not have (different base model?)")
        expected = meta["base_checksums"].get(name)
        if expected is not None and base_checksum(params[name], idx) != expected:
            raise UserError(f"delta was made for a different base model: the base values of '{name}' differ")
    for key, value in tensors.items():
        name, kind = _split(key)
        flat = params[name].data.view(-1)
        if kind == "dense":
            if value.shape != params[name].shape:
                raise UserError(f"delta entry '{key}' has shape {tuple(value.shape)}, model has {tuple(params[name].shape)}")
            params[name].data.copy_(value.to(params[name].dtype))
        elif kind == "val":
            idx = tensors[f"{name}.idx"].long()
            idx = idx.to(flat.device)
            flat[idx] = flat[idx] + value.to(flat)
        elif kind == "zero":
            flat[value.long().to(flat.device)] = 0
