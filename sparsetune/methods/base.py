"""The method interface: what a fine-tuning method may contribute to the one pipeline.

A method can add a warm-up stage and a selection stage (both write into the run directory),
decides which state is trainable, may act after each optimizer step, and writes its own delta.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import ClassVar

import torch
from torch import nn
from transformers import PreTrainedModel

from sparsetune import __version__
from sparsetune.data import Split, TaskData, task_spec
from sparsetune.data.loader import shard, stream_batches
from sparsetune.data.stream import StreamSplit
from sparsetune.device import Placement
from sparsetune.distributed import world
from sparsetune.errors import UserError
from sparsetune.models import HeadSpec, LoadedModel
from sparsetune.recipe import MethodConfig, Recipe
from sparsetune.rundir import RunDir, atomic_path
from sparsetune.sparse.delta import write_delta

EXPORT_FORMATS = ("auto", "delta", "merged", "peft")


class Method:
    name: ClassVar[str]
    Config: ClassVar[type[MethodConfig]]
    native_format: ClassVar[str] = "delta"  # what export-delta writes by default
    stages: ClassVar[tuple[str, ...]] = ()  # which of "warmup", "select" the method has
    random_access: ClassVar[bool] = False  # draws training examples at random (a stream cannot feed it)
    partial_gradients: ClassVar[bool] = False  # some trainable parameters sit out a step (DDP then looks for them)

    def __init__(self, recipe: Recipe, reported_as: Recipe | None = None):
        """`reported_as`: the recipe an exported delta names (IST runs a base method on its own sub-recipe)."""
        self.recipe = recipe
        self.cfg = recipe.method
        self.reported_as = reported_as or recipe
        self.placement = Placement.from_config(recipe.train)  # where every stage of this method computes

    # --- stages before training ---------------------------------------------------------------
    def stage_fingerprint(self, stage: str) -> str:
        """What a stage's output depends on; a later stage refuses the output when this changes."""
        return self.recipe.fingerprint("seed", "model", "task", "method")

    def warmup(self, loaded: LoadedModel, data: TaskData, run: RunDir) -> str | None:
        """Compute what selection needs; returns a summary, or None when the method has no warm-up."""
        return None

    def select(self, loaded: LoadedModel, data: TaskData, run: RunDir) -> str | None:
        """Choose what to train; returns a summary, or None when the method has no selection."""
        return None

    # --- training -----------------------------------------------------------------------------
    def prepare(self, loaded: LoadedModel, run: RunDir | None) -> nn.Module:
        """Freeze or wrap the base model; returns the module the training loop calls."""
        raise NotImplementedError

    def trainable_parameters(self, model: nn.Module) -> dict[str, nn.Parameter]:
        """The parameters the optimizer updates."""
        return {n: p for n, p in model.named_parameters() if p.requires_grad}

    def trainable_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """Everything that training changes; what checkpoints and final/ hold (on the CPU, for any machine)."""
        return {n: p.detach().cpu() for n, p in self.trainable_parameters(model).items()}

    def load_trainable_state(self, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
        params = self.trainable_parameters(model)
        missing = [n for n in params if n not in state]
        extra = [n for n in state if n not in params]
        if missing or extra:
            raise UserError(f"checkpoint does not match the method's trainable state (missing {missing[:3]}, extra {extra[:3]})")
        with torch.no_grad():
            for name, value in state.items():
                params[name].copy_(value)

    def param_groups(self, model: nn.Module, weight_decay: float) -> list[dict]:
        """Decay matrices; biases and norm weights (1-D) are not decayed."""
        params = list(self.trainable_parameters(model).values())
        return [
            {"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
        ]

    def optimizer_groups(self, model: nn.Module, loaded: LoadedModel) -> list[dict]:
        """`param_groups`, with the fresh task head in groups of its own at `train.head_lr` when that is set: the
        head starts from random while everything else starts pretrained, and methods train at lrs decades apart."""
        groups = self.param_groups(model, self.recipe.train.weight_decay)
        head_lr = self.recipe.train.head_lr
        if head_lr is None:
            return groups
        # peft keeps the trained copy of a head under `modules_to_save.default` inside `base_model.model`
        head = {id(p) for n, p in model.named_parameters()
                if n.removeprefix("base_model.model.").replace(".modules_to_save.default.", ".") in loaded.head_names}
        split = []
        for group in groups:
            for in_head in (False, True):
                params = [p for p in group["params"] if (id(p) in head) == in_head]
                if params:
                    split.append(group | {"params": params} | ({"lr": head_lr} if in_head else {}))
        return split

    def trainable_count(self, model: nn.Module) -> int:
        return sum(p.numel() for p in self.trainable_parameters(model).values())

    def describe(self, loaded: LoadedModel) -> str:
        """What training would update, for `validate` (without running any stage)."""
        count = self.trainable_count(self.prepare(loaded, None))
        total = sum(p.numel() for p in loaded.model.parameters())
        return f"trainable parameters: {count:,} of {total:,} ({100 * count / total:.3f}%)"

    def before_step(self, model: nn.Module, step: int, train: Split, pad_id: int) -> dict | None:
        """Called before optimizer step `step + 1`; what it returns is logged to metrics.jsonl for that step."""
        return None

    def after_step(self, model: nn.Module) -> None:
        """Called after every optimizer step (sparse methods write their increments back here)."""

    # --- helpers the sparse methods share -----------------------------------------------------
    @staticmethod
    def freeze_base(loaded: LoadedModel) -> nn.Module:
        """Freeze every pretrained parameter; a fresh task head stays trainable (trained densely, outside budgets)."""
        for name, param in loaded.model.named_parameters():
            param.requires_grad_(name not in loaded.pretrained_names)
        return loaded.model

    @staticmethod
    def swap_module(model: nn.Module, name: str, module: nn.Module) -> None:
        """Put `module` where the submodule `name` is (wrapping a layer, or unwrapping it again)."""
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, module)

    def warmup_batches(self, data: TaskData, pad_id: int, count: int) -> Iterator[tuple[dict[str, torch.Tensor], float]]:
        """`count` global training batches (`batch_size x world size`) in one seeded order (wrapping around), the
        same on every rerun of a stage: this rank's shard of each, placed, with its share of the batch's loss."""
        train, size = data.train, self.recipe.train.batch_size * world().size
        if isinstance(train, StreamSplit):  # the stream's first batches
            for _, (batch, plan, _) in zip(range(count), stream_batches(train, pad_id, size, 1, self.recipe.seed, 0)):
                yield self.placement.batch(batch), plan.share
            return
        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(self.recipe.seed))
        for b in range(count):
            plan = shard(train, order[(b * size) % len(train):][:size].tolist())
            yield self.placement.batch(train.batch(plan.indices, pad_id)), plan.share

    def method_state(self) -> dict[str, torch.Tensor]:
        """State the method keeps across steps besides trainable tensors (saved in checkpoints for exact resume)."""
        return {}

    def load_method_state(self, state: dict[str, torch.Tensor]) -> None:
        """Restore what `method_state` returned."""

    def scale_updates(self, module: nn.Module, factor: float) -> None:
        """Scale what training added inside `module` by `factor` (1.0 restores it exactly); IST needs this."""
        raise UserError(f"method '{self.name}' cannot scale its updates per block (IST's method.base: lora or sift)")

    def merged(self, model: nn.Module) -> PreTrainedModel:
        """A plain Hugging Face model with the training merged in."""
        return model

    # --- export -------------------------------------------------------------------------------
    def delta_meta(self) -> dict:
        head = HeadSpec.for_task(task_spec(self.recipe.task.name))
        method = self.reported_as.method
        return {
            "method": method.name,
            "method_settings": method.model_dump(mode="json"),
            "base_model": self.recipe.model.name,
            "head": asdict(head),
            "task": self.recipe.task.name,
            "max_length": self.recipe.model.max_length,  # what `predict` truncates to, as training did
            "sparsetune_version": __version__,
        }

    def delta_tensors(self, model: nn.Module, base: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Delta entries; by default every tensor that changed, stored dense."""
        merged = dict(self.merged(model).named_parameters())
        return {f"{n}.dense": p for n, p in merged.items() if n not in base or not torch.equal(p, base[n])}

    def export(self, model: nn.Module, loaded_base: LoadedModel, out: Path, fmt: str, values: str = "fp32") -> Path:
        """Write the trained model in `fmt`; `loaded_base` is a fresh copy of the untouched base; `values`: the
        dtype of a delta file's sparse values (bf16 is lossy)."""
        fmt = self.native_format if fmt == "auto" else fmt
        if fmt == "merged":
            merged = self.merged(model)
            with atomic_path(out) as tmp:
                merged.save_pretrained(tmp)
                loaded_base.tokenizer.save_pretrained(tmp)
            return out
        if fmt == "delta":
            base = {n: p.detach() for n, p in loaded_base.model.named_parameters()}
            write_delta(out, self.delta_tensors(model, base), base, loaded_base.pretrained_names, self.delta_meta(),
                        values)
            return out
        raise UserError(f"export format '{fmt}' is not available for method '{self.name}' (use delta or merged)")
