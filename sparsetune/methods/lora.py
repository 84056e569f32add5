"""LoRA through `peft`: the low-rank baseline, exported as a PEFT adapter folder."""

from __future__ import annotations

import json
from pathlib import Path
from typing import ClassVar, Literal

import torch
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, TaskType, get_peft_model
from pydantic import Field
from torch import nn
from transformers import PreTrainedModel

from sparsetune.errors import UserError
from sparsetune.methods import register
from sparsetune.methods.base import Method
from sparsetune.models import LoadedModel, default_targets
from sparsetune.recipe import MethodConfig
from sparsetune.rundir import RunDir, atomic_path
from sparsetune.sparse.delta import base_checksum

ADAPTER_META = "sparsetune.json"  # beside PEFT's own files: base model id, head, base checksums


class LoraConfig(MethodConfig):
    name: Literal["lora"] = "lora"
    r: int = Field(8, gt=0)
    alpha: float = Field(16.0, gt=0)
    dropout: float = Field(0.05, ge=0, lt=1)
    target: list[str] | None = Field(None, description="module names relative to a block; default per architecture")


@register
class Lora(Method):
    name: ClassVar[str] = "lora"
    Config = LoraConfig
    native_format: ClassVar[str] = "peft"

    def prepare(self, loaded: LoadedModel, run: RunDir | None) -> nn.Module:
        model = loaded.model
        causal = type(model).__name__.endswith("ForCausalLM")
        config = PeftLoraConfig(
            task_type=TaskType.CAUSAL_LM if causal else TaskType.SEQ_CLS,
            r=self.cfg.r,
            lora_alpha=self.cfg.alpha,
            lora_dropout=self.cfg.dropout,
            target_modules=self.cfg.target or default_targets(model),
        )
        try:
            return get_peft_model(model, config)
        except ValueError as exc:
            raise UserError(f"method.target: {str(exc).splitlines()[0]}") from None

    def merged(self, model: nn.Module) -> PreTrainedModel:
        return model.merge_and_unload()

    def export(self, model: nn.Module, loaded_base: LoadedModel, out: Path, fmt: str) -> Path:
        if fmt not in ("auto", "peft"):
            return super().export(model, loaded_base, out, fmt)
        targeted = {n.removeprefix("base_model.model.").replace(".base_layer", "") for n, _ in model.named_parameters()
                    if ".base_layer." in n}
        base = dict(loaded_base.model.named_parameters())
        meta = self.delta_meta() | {"base_checksums": {n: base_checksum(base[n], None) for n in sorted(targeted)}}
        with atomic_path(out) as tmp:
            model.save_pretrained(tmp)
            (tmp / ADAPTER_META).write_text(json.dumps(meta, indent=2))
        return out


def read_adapter_meta(folder: Path) -> dict:
    path = folder / ADAPTER_META
    if not path.is_file():
        raise UserError(f"'{folder}' is a PEFT adapter without {ADAPTER_META}; pass one written by export-delta")
    return json.loads(path.read_text())


@torch.no_grad()
def apply_adapter(base: PreTrainedModel, folder: Path, meta: dict) -> PreTrainedModel:
    """Merge an exported adapter into `base`, refusing a base whose targeted weights differ."""
    params = dict(base.named_parameters())
    for name, expected in meta.get("base_checksums", {}).items():
        if name not in params or base_checksum(params[name], None) != expected:
            raise UserError(f"adapter was made for a different base model: the base values of '{name}' differ")
    return PeftModel.from_pretrained(base, str(folder)).merge_and_unload()
