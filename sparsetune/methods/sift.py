"""SIFT — Sparse Increment Fine-Tuning (Song et al., arXiv 2312.11875).

Warm-up accumulates |gradient| of every targeted tensor over a few training batches (no update);
selection keeps the top-k entries by that score; training moves only those entries (W = W0 + scatter
(idx, values)) with optimizer state for the k values alone. `score: magnitude | random` gives the
paper's ablations (magnitude-sparse, random-sparse) from the same recipe. Unlike the official code,
the warm-up batches are not lost, updates are applied at the step they belong to, the final update is
kept, and the indices are saved.
"""

from __future__ import annotations

import copy
import hashlib
from pathlib import Path
from typing import ClassVar, Literal

import torch
from peft import ShiraConfig, TaskType, get_peft_model
from pydantic import Field
from safetensors.torch import load_file
from torch import nn
from transformers import PreTrainedModel

from sparsetune.console import progress
from sparsetune.data import TaskData
from sparsetune.distributed import world
from sparsetune.errors import UserError
from sparsetune.methods import register
from sparsetune.methods.base import Method
from sparsetune.models import LoadedModel, is_causal_lm, target_linears
from sparsetune.peft_adapter import save_adapter
from sparsetune.recipe import MethodConfig
from sparsetune.rundir import RunDir
from sparsetune.sparse.delta import index_dtype
from sparsetune.sparse.increments import SiftLinear

SCORES_FILE = "warmup/scores.safetensors"
MASK_FILE = "mask/mask.safetensors"


def _digest(tensors: dict[str, torch.Tensor]) -> str:
    """A short hash of named tensors' values, to compare what the ranks computed."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        digest.update(name.encode())
        digest.update(tensors[name].cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


class SiftConfig(MethodConfig):
    name: Literal["sift"] = "sift"
    budget: float = Field(0.008, gt=0, description="fraction of each targeted tensor (< 1) or a total entry count (>= 1)")
    target: list[str] | None = Field(None, description="Linear modules relative to a block; default per architecture")
    bias: bool = Field(True, description="also train the targeted modules' biases (the paper does)")
    score: Literal["gradient", "magnitude", "random"] = "gradient"
    selection: Literal["per_tensor", "global", "shira_rank"] = Field(
        "per_tensor", description="top-k per tensor (paper), overall, or per tensor with k = r(m+n) so that "
        "export-delta --format peft can write a PEFT SHiRA adapter")
    warmup_batches: int = Field(8, gt=0, description="micro-batches whose |gradient| is accumulated")
    grad: Literal["auto", "indexed", "dense"] = Field(
        "auto", description="indexed: gradient only at the selected entries (an SDDMM); dense: each layer's dW "
        "formed in its backward, gathered, freed; auto: per tensor and backward, by density, tokens and device "
        "(the rule measured in docs/BENCH.md)")


@register
class Sift(Method):
    name: ClassVar[str] = "sift"
    Config = SiftConfig
    stages: ClassVar[tuple[str, ...]] = ("warmup", "select")

    # --- what is targeted ---------------------------------------------------------------------
    def targets(self, model: PreTrainedModel) -> dict[str, nn.Parameter]:
        """Parameter name -> tensor for every targeted weight (and bias) in every block."""
        found: dict[str, nn.Parameter] = {}
        for name, module in target_linears(model, self.cfg.target).items():
            found[f"{name}.weight"] = module.weight
            if self.cfg.bias and module.bias is not None:
                found[f"{name}.bias"] = module.bias
        return found

    def plan(self, targets: dict[str, nn.Parameter]) -> dict[str, int]:
        """Entries to train per tensor under the budget (the global rule keeps only the total).

        shira_rank: one rank r for all tensors, k = r * (rows + cols), r chosen so the total is nearest the budget.
        """
        total = sum(p.numel() for p in targets.values())
        if self.cfg.budget > total:
            raise UserError(f"method.budget: {int(self.cfg.budget):,} entries exceed the {total:,} targeted entries")
        share = self.cfg.budget if self.cfg.budget < 1 else self.cfg.budget / total
        counts = {n: round(share * p.numel()) for n, p in targets.items()}
        if self.cfg.selection != "shira_rank":
            return counts
        if any(p.ndim != 2 for p in targets.values()):
            raise UserError("method.selection: shira_rank trains weight matrices only; set method.bias=false")
        rank = max(1, round(sum(counts.values()) / sum(sum(p.shape) for p in targets.values())))
        return {n: min(p.numel(), rank * sum(p.shape)) for n, p in targets.items()}

    def stage_fingerprint(self, stage: str) -> str:
        keys = ["seed", "model", "task.name", "task.data_dir", "task.data_file", "task.train_limit", "train.batch_size",
                "method.target", "method.bias", "method.score", "method.warmup_batches"]
        if stage == "select":
            keys += ["method.budget", "method.selection"]
        return self.recipe.fingerprint(*keys)

    # --- warm-up: score every targeted entry --------------------------------------------------
    def warmup(self, loaded: LoadedModel, data: TaskData, run: RunDir) -> str:
        model, targets = loaded.model, self.targets(loaded.model)
        self.plan(targets)  # a budget the targets cannot hold fails now, not after the warm-up
        if self.cfg.score == "magnitude":
            scores = {n: p.detach().abs().float() for n, p in targets.items()}
        elif self.cfg.score == "random":
            generator = torch.Generator().manual_seed(self.recipe.seed)
            scores = {n: torch.rand(p.shape, generator=generator) for n, p in targets.items()}
        else:
            scores = self._gradient_scores(model, targets, data, loaded.tokenizer.pad_token_id)
        run.save_tensors(SCORES_FILE, scores)
        summary = {"score": self.cfg.score, "tensors": len(scores), "entries": sum(s.numel() for s in scores.values())}
        run.save_json("warmup/summary.json", summary)
        return f"{self.cfg.score} scores for {summary['entries']:,} entries in {summary['tensors']} tensors"

    def _gradient_scores(self, model, targets, data: TaskData, pad_id: int) -> dict[str, torch.Tensor]:
        """Sum of |dL/dW| over the first warm-up batches; each dense gradient is folded in and freed at once.

        Under torchrun each gradient is summed over the ranks before its magnitude is taken, so the scores (and
        the mask) are those of one process at the global batch, bit-identical on every rank."""
        scores = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in targets.items()}
        model.requires_grad_(False)
        handles = []
        for name, param in targets.items():
            param.requires_grad_(True)

            def fold(p: torch.Tensor, score=scores[name]) -> None:
                score.add_(world().all_reduce_(p.grad.float()).abs())
                p.grad = None

            handles.append(param.register_post_accumulate_grad_hook(fold))
        model.train()
        batches = self.warmup_batches(data, pad_id, self.cfg.warmup_batches)
        for batch, share in progress(batches, "SIFT warm-up: |gradient|", total=self.cfg.warmup_batches):
            with self.placement.autocast():
                loss = model(**batch).loss
            (loss * share).backward()
        for handle in handles:
            handle.remove()
        model.requires_grad_(False)
        return scores

    # --- select: top-k ------------------------------------------------------------------------
    def select(self, loaded: LoadedModel, data: TaskData, run: RunDir) -> str:
        path = run.root / SCORES_FILE
        if not path.is_file():
            raise UserError(f"{run.root}: no warm-up scores ({SCORES_FILE}); run `sparsetune warmup` first")
        scores = load_file(str(path))
        targets = self.targets(loaded.model)
        if scores.keys() != targets.keys():
            raise UserError(f"{path}: scores do not match the targeted tensors; rerun warmup with --force")
        counts = self.plan(targets)
        if self.cfg.selection == "global":
            counts = self._global_counts(scores, sum(counts.values()))
        mask = {n: scores[n].reshape(-1).topk(k).indices.sort().values.to(index_dtype(scores[n].numel()))
                for n, k in counts.items() if k > 0}
        digests = world().all_gather(_digest(mask))  # every rank's own mask: one value when the ranks agree
        if len(set(digests)) > 1:
            raise RuntimeError(f"the ranks selected different SIFT masks ({digests}); their warm-up scores differ")
        run.save_tensors(MASK_FILE, mask)
        report = {"selection": self.cfg.selection, "score": self.cfg.score, "budget": self.cfg.budget,
                  "total": sum(int(i.numel()) for i in mask.values()), "rank_digests": digests,
                  "per_tensor": {n: {"k": int(i.numel()), "numel": targets[n].numel()} for n, i in mask.items()}}
        run.save_json("mask/mask.json", report)
        return f"{report['total']:,} entries selected in {len(mask)} tensors ({self.cfg.selection}, {self.cfg.score})"

    @staticmethod
    def _global_counts(scores: dict[str, torch.Tensor], total: int) -> dict[str, int]:
        names = list(scores)
        flat = torch.cat([scores[n].reshape(-1) for n in names])
        owner = torch.repeat_interleave(torch.arange(len(names)), torch.tensor([scores[n].numel() for n in names]))
        per = torch.bincount(owner[flat.topk(total).indices], minlength=len(names))
        return dict(zip(names, per.tolist()))

    # --- training -----------------------------------------------------------------------------
    def prepare(self, loaded: LoadedModel, run: RunDir | None) -> nn.Module:
        if run is None or not (run.root / MASK_FILE).is_file():
            raise UserError("SIFT needs a mask: run `sparsetune select RECIPE` (train runs it when missing)")
        run.check_stage("select", self.stage_fingerprint("select"))
        mask = load_file(str(run.root / MASK_FILE))
        model = self.freeze_base(loaded)
        self._wrapped: dict[str, SiftLinear] = {}
        for module_name in sorted({n.rsplit(".", 1)[0] for n in mask}):
            wrapped = SiftLinear(model.get_submodule(module_name), mask.get(f"{module_name}.weight"),
                                 mask.get(f"{module_name}.bias"), grad_mode=self.cfg.grad)
            self.swap_module(model, module_name, wrapped)
            self._wrapped[module_name] = wrapped
        return model

    def increments(self, model: nn.Module) -> dict[str, SiftLinear]:
        """The wrapped modules by name, kept from `prepare` so the per-step write-back walks no module tree."""
        return self._wrapped

    def param_groups(self, model: nn.Module, weight_decay: float) -> list[dict]:
        """Weight decay acts on every increment (pulling it back toward W0), and on the head's matrices."""
        params = self.trainable_parameters(model)
        decayed = [p for n, p in params.items() if n.endswith("_inc.values") or p.ndim >= 2]
        plain = [p for n, p in params.items() if not n.endswith("_inc.values") and p.ndim < 2]
        return [{"params": decayed, "weight_decay": weight_decay}, {"params": plain, "weight_decay": 0.0}]

    def after_step(self, model: nn.Module) -> None:
        for module in self.increments(model).values():
            module.write_back()

    def load_trainable_state(self, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
        super().load_trainable_state(model, state)
        self.after_step(model)

    def scale_updates(self, module: nn.Module, factor: float) -> None:
        """Rewrite the selected entries as W0 + factor * increment (factor 1.0 restores the trained weight)."""
        for layer in module.modules():
            if isinstance(layer, SiftLinear):
                layer.write_back(factor)

    def merged(self, model: nn.Module) -> PreTrainedModel:
        """The weights already hold W0 + increments; unwrapping restores the original module tree."""
        for name, module in self.increments(model).items():
            self.swap_module(model, name, module.base_layer)
        return model

    def describe(self, loaded: LoadedModel) -> str:
        counts = self.plan(self.targets(loaded.model))
        head = sum(p.numel() for n, p in loaded.model.named_parameters() if n not in loaded.pretrained_names)
        total = sum(p.numel() for p in loaded.model.parameters())
        k = sum(counts.values())
        return (f"trainable entries: {k:,} in {sum(1 for c in counts.values() if c)} tensors "
                f"({100 * k / total:.3f}% of {total:,}); task head trained densely, not counted in the budget: {head:,}")

    # --- export -------------------------------------------------------------------------------
    def export(self, model: nn.Module, loaded_base: LoadedModel, out: Path, fmt: str, values: str = "fp32") -> Path:
        if fmt != "peft":
            return super().export(model, loaded_base, out, fmt, values)
        return save_adapter(self._shira_adapter(model, loaded_base), loaded_base, out, self.delta_meta())

    def _shira_adapter(self, model: nn.Module, loaded_base: LoadedModel) -> nn.Module:
        """The trained increments as a PEFT SHiRA adapter on a copy of the base (same indices, same values)."""
        wrapped = self.increments(model)
        if any(m.bias_inc is not None for m in wrapped.values()):
            raise UserError("export --format peft: SHiRA adapts weight matrices only and this mask has bias entries "
                            "(train with method.bias=false method.selection=shira_rank)")
        ranks = {name: m.weight_inc.idx.numel() / sum(m.base_layer.weight.shape) for name, m in wrapped.items()}
        rank = next(iter(ranks.values()))
        if not rank.is_integer() or any(r != rank for r in ranks.values()):
            worst = next(n for n, r in ranks.items() if r != rank or not r.is_integer())
            raise UserError(f"export --format peft: the mask does not fit SHiRA's r*(m+n) rule ('{worst}' has "
                            f"{ranks[worst]:.2f}*(m+n) entries); select with method.selection=shira_rank")
        base = copy.deepcopy(loaded_base.model)
        trained = dict(model.named_parameters())
        with torch.no_grad():  # the trained dense head rides along as PEFT's modules_to_save
            for name, param in base.named_parameters():
                if name not in loaded_base.pretrained_names:
                    param.copy_(trained[name])
        masks: dict[int, torch.Tensor] = {}
        modules = dict(base.named_modules())
        for name, m in wrapped.items():
            mask = torch.zeros(m.base_layer.weight.numel())
            mask[m.weight_inc.idx] = 1.0
            masks[id(modules[name])] = mask.view_as(m.base_layer.weight)
        causal = is_causal_lm(base)
        config = ShiraConfig(r=int(rank), target_modules=sorted(wrapped),
                             task_type=TaskType.CAUSAL_LM if causal else TaskType.SEQ_CLS)
        config.mask_fn = lambda base_layer, r, **_: masks[id(base_layer)]
        adapter = get_peft_model(base, config)
        inner = adapter.base_model.model
        with torch.no_grad():
            for name, m in wrapped.items():
                layer = inner.get_submodule(name)
                rows, cols = layer.shira_indices["default"].long()
                assert torch.equal(rows * layer.in_features + cols, m.weight_inc.idx)  # SHiRA keeps row-major order
                layer.shira_weight["default"].copy_(m.weight_inc.values)
        return adapter

    def delta_tensors(self, model: nn.Module, base: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        tensors: dict[str, torch.Tensor] = {}
        for name, module in self.increments(model).items():
            for kind, inc in (("weight", module.weight_inc), ("bias", module.bias_inc)):
                if inc is not None:
                    tensors[f"{name}.{kind}.idx"] = inc.idx.to(index_dtype(base[f"{name}.{kind}"].numel()))
                    tensors[f"{name}.{kind}.val"] = inc.values.detach()
        head = {n: p for n, p in self.trainable_parameters(model).items() if not n.endswith("_inc.values")}
        return tensors | {f"{n}.dense": p.detach() for n, p in head.items()}
