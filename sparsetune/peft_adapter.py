"""PEFT adapter folders as export format: written with base checksums, merged back by `apply-delta`."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from peft import PeftModel
from transformers import PreTrainedModel

from sparsetune.errors import UserError
from sparsetune.models import LoadedModel
from sparsetune.rundir import atomic_path
from sparsetune.sparse.delta import base_checksum, same_base

ADAPTER_META = "sparsetune.json"  # beside PEFT's own files: base model id, head, base checksums


def save_adapter(peft_model: PeftModel, loaded_base: LoadedModel, out: Path, meta: dict) -> Path:
    """save_pretrained plus the checksums of every base weight an adapter layer wraps."""
    wrapped = {n.removeprefix("base_model.model.").replace(".base_layer", "")
               for n, _ in peft_model.named_parameters() if ".base_layer." in n}
    base = dict(loaded_base.model.named_parameters())
    meta = meta | {"base_checksums": {n: base_checksum(base[n], None) for n in sorted(wrapped)}}
    with atomic_path(out) as tmp:
        peft_model.save_pretrained(tmp)
        (tmp / ADAPTER_META).write_text(json.dumps(meta, indent=2))
    return out


def read_adapter_meta(folder: Path) -> dict:
    path = folder / ADAPTER_META
    if not path.is_file():
        raise UserError(f"'{folder}' is a PEFT adapter without {ADAPTER_META}; pass one written by export-delta")
    return json.loads(path.read_text())


@torch.no_grad()
def apply_adapter(base: PreTrainedModel, folder: Path, meta: dict) -> PreTrainedModel:
    """Merge an exported adapter into `base`, refusing a base whose wrapped weights differ."""
    params = dict(base.named_parameters())
    for name, expected in meta.get("base_checksums", {}).items():
        if name not in params or not same_base(base_checksum(params[name], None), expected):
            raise UserError(f"adapter was made for a different base model: the base values of '{name}' differ")
    return PeftModel.from_pretrained(base, str(folder)).merge_and_unload()
