"""Full fine-tuning: every parameter trains. The reference every sparse method is measured against."""

from __future__ import annotations

from typing import ClassVar, Literal

from torch import nn

from sparsetune.methods import register
from sparsetune.methods.base import Method
from sparsetune.models import LoadedModel
from sparsetune.recipe import MethodConfig
from sparsetune.rundir import RunDir


class FullConfig(MethodConfig):
    name: Literal["full"] = "full"


@register
class Full(Method):
    name: ClassVar[str] = "full"
    Config = FullConfig

    def prepare(self, loaded: LoadedModel, run: RunDir | None) -> nn.Module:
        loaded.model.requires_grad_(True)
        return loaded.model
