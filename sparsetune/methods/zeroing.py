"""Layer-zeroing (Radiya-Dixit & Wang, arXiv 2004.14129): learn a task by setting pretrained entries to zero.

Warm-up scores every block (and the input embeddings) by how much it wants to move for this task:
`criticality: grad_norm` is ||mean gradient|| / ||theta|| over a few batches; `delta_l1` is ||theta' - theta||_1
/ ||theta||_1 after a few dense fine-tuning steps (the paper's measure). Selection keeps the `layers` most
critical blocks and their targeted tensors. Training learns, per targeted tensor, which `budget` share of its
entries to zero (top-k of real-valued scores, straight-through gradients); the pretrained weights never change
and the task head trains densely, so the whole delta is a list of indices plus the head.
`mode: dense-critical` fine-tunes the same selected blocks densely instead: the paper's other finding.
"""

from __future__ import annotations

import copy
from typing import ClassVar, Literal

import torch
from pydantic import Field
from torch import nn
from transformers import PreTrainedModel

from sparsetune.console import progress
from sparsetune.data import Split, TaskData
from sparsetune.device import Placement
from sparsetune.distributed import data_parallel, world
from sparsetune.errors import UserError
from sparsetune.methods import register
from sparsetune.methods.base import Method
from sparsetune.models import LoadedModel, find_blocks, target_linears
from sparsetune.recipe import MethodConfig
from sparsetune.rundir import RunDir, read_json
from sparsetune.sparse.delta import index_dtype
from sparsetune.sparse.mask import ZeroMaskLinear

CRITICALITY_FILE = "warmup/criticality.json"
SELECTION_FILE = "mask/selection.json"
EMBEDDINGS = "embeddings"


class ZeroingConfig(MethodConfig):
    name: Literal["zeroing"] = "zeroing"
    mode: Literal["zero", "dense-critical"] = Field(
        "zero", description="zero: learn which entries to zero; dense-critical: fine-tune the selected blocks densely")
    criticality: Literal["grad_norm", "delta_l1"] = Field(
        "delta_l1", description="grad_norm: relative norm of the mean gradient (cheap); delta_l1: relative L1 change "
        "after a short dense fine-tune (the paper's measure)")
    warmup_batches: int = Field(8, gt=0, description="micro-batches (grad_norm) or dense steps (delta_l1) of warm-up")
    warmup_lr: float = Field(5e-5, gt=0, description="learning rate of the delta_l1 warm-up fine-tune")
    layers: float = Field(0.5, gt=0, description="blocks kept: a fraction of them (< 1) or a count (>= 1)")
    target: list[str] | None = Field(None, description="Linear modules relative to a block; default per architecture")
    budget: float = Field(0.05, gt=0, lt=1, description="share of each selected tensor's entries set to zero")
    init: Literal["magnitude", "constant"] = Field(
        "magnitude", description="initial zeroing scores: -|W| (smallest entries are zeroed first) or all equal")
    ramp_steps: int = Field(0, ge=0, description="steps over which the zeros in the forward grow from 0 to the "
                            "budget (0: the full budget from the first step)")


@register
class Zeroing(Method):
    name: ClassVar[str] = "zeroing"
    Config = ZeroingConfig
    stages: ClassVar[tuple[str, ...]] = ("warmup", "select")

    def stage_fingerprint(self, stage: str) -> str:
        keys = ["seed", "model", "task.name", "task.data_dir", "task.data_file", "task.train_limit", "train.batch_size",
                "method.criticality", "method.warmup_batches", "method.warmup_lr"]
        if stage == "select":
            keys += ["method.layers", "method.target"]
        return self.recipe.fingerprint(*keys)

    # --- warm-up: layer criticality -----------------------------------------------------------
    @staticmethod
    def layer_groups(model: PreTrainedModel) -> dict[str, list[str]]:
        """Parameter names per scored layer: each block by index, and the input embeddings."""
        blocks_name, blocks = find_blocks(model)
        groups = {str(i): [f"{blocks_name}.{i}.{n}" for n, _ in block.named_parameters()] for i, block in enumerate(blocks)}
        embedding = model.get_input_embeddings()
        groups[EMBEDDINGS] = [n for n, p in model.named_parameters() if any(p is q for q in embedding.parameters())]
        return groups

    def warmup(self, loaded: LoadedModel, data: TaskData, run: RunDir) -> str:
        model, groups = loaded.model, self.layer_groups(loaded.model)
        batches = list(self.warmup_batches(data, loaded.tokenizer.pad_token_id, self.cfg.warmup_batches))
        if self.cfg.criticality == "grad_norm":
            scores = grad_norm_criticality(model, groups, batches, self.placement)
        else:
            scores = delta_l1_criticality(model, groups, batches, self.cfg.warmup_lr, self.placement)
        run.save_json(CRITICALITY_FILE, {"criticality": self.cfg.criticality, "scores": scores})
        ranked = sorted((k for k in scores if k != EMBEDDINGS), key=scores.get, reverse=True)
        return f"{self.cfg.criticality} criticality; blocks most to least critical: {', '.join(ranked)}"

    # --- select: the most critical blocks -----------------------------------------------------
    def select(self, loaded: LoadedModel, data: TaskData, run: RunDir) -> str:
        path = run.root / CRITICALITY_FILE
        if not path.is_file():
            raise UserError(f"{run.root}: no criticality scores ({CRITICALITY_FILE}); run `sparsetune warmup` first")
        scores = read_json(path)["scores"]
        _, blocks = find_blocks(loaded.model)
        if sorted(k for k in scores if k != EMBEDDINGS) != sorted(str(i) for i in range(len(blocks))):
            raise UserError(f"{path}: scores do not match the model's {len(blocks)} blocks; rerun warmup with --force")
        count = self._layer_count(len(blocks))
        chosen = sorted(sorted(range(len(blocks)), key=lambda i: scores[str(i)], reverse=True)[:count])
        tensors = {f"{n}.weight": m.weight.numel() for n, m in target_linears(loaded.model, self.cfg.target, chosen).items()}
        run.save_json(SELECTION_FILE, {"blocks": chosen, "tensors": tensors, "criticality": scores})
        return f"{count} of {len(blocks)} blocks selected: {chosen}"

    def _layer_count(self, total: int) -> int:
        layers = self.cfg.layers
        count = max(1, round(layers * total)) if layers < 1 else int(layers)
        if count > total:
            raise UserError(f"method.layers: {count} blocks asked for, the model has {total}")
        return count

    # --- training -----------------------------------------------------------------------------
    def _selection(self, run: RunDir | None) -> dict:
        if run is None or not (run.root / SELECTION_FILE).is_file():
            raise UserError("layer-zeroing needs a selection: run `sparsetune select RECIPE` (train runs it when missing)")
        run.check_stage("select", self.stage_fingerprint("select"))
        return read_json(run.root / SELECTION_FILE)

    def prepare(self, loaded: LoadedModel, run: RunDir | None) -> nn.Module:
        selection = self._selection(run)
        model = self.freeze_base(loaded)
        _, blocks = find_blocks(model)
        if self.cfg.mode == "dense-critical":
            for i in selection["blocks"]:
                blocks[i].requires_grad_(True)
            return model
        self._wrapped: dict[str, ZeroMaskLinear] = {}
        for weight_name, numel in selection["tensors"].items():
            module_name = weight_name.removesuffix(".weight")
            layer = model.get_submodule(module_name)
            init = -layer.weight.detach().abs() if self.cfg.init == "magnitude" else torch.zeros_like(layer.weight)
            wrapped = ZeroMaskLinear(layer, round(self.cfg.budget * numel), init)
            self.swap_module(model, module_name, wrapped)
            self._wrapped[module_name] = wrapped
        return model

    def param_groups(self, model: nn.Module, weight_decay: float) -> list[dict]:
        """Zeroing scores are ranks, not weights: never decayed."""
        params = self.trainable_parameters(model)
        decayed = [p for n, p in params.items() if not n.endswith(".scores") and p.ndim >= 2]
        plain = [p for n, p in params.items() if n.endswith(".scores") or p.ndim < 2]
        return [{"params": decayed, "weight_decay": weight_decay}, {"params": plain, "weight_decay": 0.0}]

    def before_step(self, model: nn.Module, step: int, train: Split, pad_id: int) -> None:
        if self.cfg.mode == "zero" and self.cfg.ramp_steps:
            share = min(1.0, step / self.cfg.ramp_steps)
            for layer in self._wrapped.values():
                layer.active_k = int(share * layer.k)

    def after_step(self, model: nn.Module) -> None:
        """Between steps (evaluation, checkpoints, export) the model is the final one: the full budget of zeros."""
        if self.cfg.mode == "zero":
            for layer in self._wrapped.values():
                layer.active_k = layer.k

    def merged(self, model: nn.Module) -> PreTrainedModel:
        if self.cfg.mode == "dense-critical":
            return model
        with torch.no_grad():
            for name, layer in self._wrapped.items():
                layer.base_layer.weight.view(-1)[layer.zeroed()] = 0
                self.swap_module(model, name, layer.base_layer)
        return model

    def describe(self, loaded: LoadedModel) -> str:
        _, blocks = find_blocks(loaded.model)
        count = self._layer_count(len(blocks))
        sizes = [m.weight.numel() for m in target_linears(loaded.model, self.cfg.target, [0]).values()]
        if self.cfg.mode == "dense-critical":
            dense = sum(p.numel() for p in blocks[0].parameters()) * count
            return f"dense fine-tuning of the {count} most critical of {len(blocks)} blocks: {dense:,} parameters"
        zeros = sum(round(self.cfg.budget * n) for n in sizes) * count
        return (f"zeroes {zeros:,} of {sum(sizes) * count:,} entries in the {count} most critical of {len(blocks)} "
                "blocks (learned top-k mask); head trained densely")

    # --- export -------------------------------------------------------------------------------
    def delta_tensors(self, model: nn.Module, base: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if self.cfg.mode == "dense-critical":
            return super().delta_tensors(model, base)
        tensors = {f"{name}.weight.zero": layer.zeroed().to(index_dtype(layer.scores.numel()))
                   for name, layer in self._wrapped.items()}
        head = {n: p for n, p in self.trainable_parameters(model).items() if not n.endswith(".scores")}
        return tensors | {f"{n}.dense": p.detach() for n, p in head.items()}


def grad_norm_criticality(model: nn.Module, groups: dict[str, list[str]], batches: list[tuple[dict, float]],
                          placement: Placement) -> dict[str, float]:
    """Per layer: ||mean over batches of dL/dtheta||_2 / ||theta||_2 (the gradient summed over ranks first)."""
    params = dict(model.named_parameters())
    names = [n for group in groups.values() for n in group]
    model.requires_grad_(False)
    for name in names:
        params[name].requires_grad_(True)
    model.train()
    for batch, share in progress(batches, "criticality: gradients"):
        with placement.autocast():
            loss = model(**batch).loss * share / len(batches)
        loss.backward()
    scores = {}
    for layer, group in groups.items():
        grad = world().all_reduce_(torch.cat([params[n].grad.reshape(-1).float() for n in group]))
        weight = torch.cat([params[n].detach().reshape(-1).float() for n in group])
        scores[layer] = float(grad.norm() / weight.norm())
    model.zero_grad(set_to_none=True)
    model.requires_grad_(False)
    return scores


def delta_l1_criticality(model: nn.Module, groups: dict[str, list[str]], batches: list[tuple[dict, float]],
                         lr: float, placement: Placement) -> dict[str, float]:
    """Per layer: ||theta' - theta||_1 / ||theta||_1 after one dense AdamW step per batch on a copy of the model
    (an fp32 copy: these are full fine-tuning steps, whose weights are fp32 whatever the base's storage; under
    torchrun, data-parallel ones)."""
    tuned = copy.deepcopy(model).float()
    tuned.requires_grad_(True)
    optimizer = torch.optim.AdamW(tuned.parameters(), lr=lr, weight_decay=0.0)
    tuned.train()
    parallel = data_parallel(tuned, placement.device)
    for batch, share in progress(batches, "criticality: dense warm-up steps"):
        with placement.autocast():
            loss = parallel(**batch).loss
        (loss * share * world().size).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    before, after = dict(model.named_parameters()), dict(tuned.named_parameters())
    scores = {}
    for layer, group in groups.items():
        change = sum(float((after[n].detach() - before[n].detach().float()).abs().sum()) for n in group)
        scores[layer] = change / sum(float(before[n].detach().float().abs().sum()) for n in group)
    return scores
