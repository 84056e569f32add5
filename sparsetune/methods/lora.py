"""LoRA through `peft`: the low-rank baseline, exported as a PEFT adapter folder."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Literal

from peft import LoraConfig as PeftLoraConfig
from peft import TaskType, get_peft_model
from peft.tuners.lora import LoraLayer
from transformers.pytorch_utils import Conv1D
from pydantic import Field
from torch import nn
from transformers import PreTrainedModel

from sparsetune.errors import UserError
from sparsetune.methods import register
from sparsetune.methods.base import Method
from sparsetune.models import LoadedModel, default_targets, is_causal_lm
from sparsetune.recipe import MethodConfig
from sparsetune.peft_adapter import save_adapter
from sparsetune.rundir import RunDir


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
        causal = is_causal_lm(model)
        targets = self.cfg.target or default_targets(model)
        config = PeftLoraConfig(
            task_type=TaskType.CAUSAL_LM if causal else TaskType.SEQ_CLS,
            r=self.cfg.r,
            lora_alpha=self.cfg.alpha,
            lora_dropout=self.cfg.dropout,
            target_modules=targets,
            fan_in_fan_out=any(isinstance(m, Conv1D) for n, m in model.named_modules() if n.endswith(tuple(targets))),
        )
        try:
            return get_peft_model(model, config)
        except ValueError as exc:
            raise UserError(f"method.target: {str(exc).splitlines()[0]}") from None

    def merged(self, model: nn.Module) -> PreTrainedModel:
        return model.merge_and_unload()

    def scale_updates(self, module: nn.Module, factor: float) -> None:
        """LoRA's own scaling, set to factor * alpha / r (factor 1.0 gives back alpha / r exactly)."""
        for layer in module.modules():
            if isinstance(layer, LoraLayer):
                for adapter in layer.scaling:
                    layer.set_scale(adapter, factor)

    def export(self, model: nn.Module, loaded_base: LoadedModel, out: Path, fmt: str, values: str = "fp32") -> Path:
        if fmt not in ("auto", "peft"):
            return super().export(model, loaded_base, out, fmt, values)
        return save_adapter(model, loaded_base, out, self.delta_meta())
