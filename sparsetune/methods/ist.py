"""IST — Importance-aware Sparse Tuning (Yao et al., arXiv 2410.11772), over LoRA or SIFT, on any model.

Each optimizer step updates only `update_fraction` of the transformer blocks, drawn by importance. Every
`score_every` steps a round of response suppression re-scores the blocks: each of `trials` trials scales the
base method's updates in a sampled set of `suppress_fraction` of the blocks by `suppression`, measures the loss
on one scoring batch without gradients, and the centred rewards exp(-loss) - mean move the sigmoid scores of
the suppressed blocks: s_i += r_k * p_i (1 - p_i) * score_lr, p = sigmoid(s) taken before the round.

Orientation, as in the official code: the raw score s is a *suppression* score. A trial whose suppressed blocks
barely raise the loss earns a positive reward, so high s means "safe to suppress", i.e. less important. Trials
suppress blocks with weights sigmoid(s); updates draw blocks with weights sigmoid(-s), which this toolkit logs
as each block's `importance` (the paper's sense: higher = more important).

Unlike the official code: blocks are found from the module tree (any architecture, no vendored peft); every
block's parameters are in the optimizer from the start; undrawn blocks get no gradient, and AdamW skips
parameters without .grad, so neither their weights nor their moments move; scores and sampler state are
checkpointed, so a resumed run draws the same blocks.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, ClassVar, Literal

import torch
from pydantic import Field, field_validator
from safetensors.torch import load_file
from torch import nn
from transformers import PreTrainedModel

from sparsetune.console import progress
from sparsetune.data import Split, TaskData
from sparsetune.data.loader import shard
from sparsetune.distributed import data_parallel, world
from sparsetune.errors import UserError
from sparsetune.methods import method_class, register
from sparsetune.methods.base import Method
from sparsetune.methods.lora import LoraConfig
from sparsetune.methods.sift import SiftConfig
from sparsetune.models import LoadedModel, find_blocks
from sparsetune.recipe import MethodConfig, Recipe
from sparsetune.rundir import RunDir

SCORES_FILE = "warmup/ist_scores.safetensors"


class IstConfig(MethodConfig):
    name: Literal["ist"] = "ist"
    base: Annotated[LoraConfig | SiftConfig, Field(discriminator="name")] = Field(
        default_factory=LoraConfig, description="the layer-wise method IST samples over: lora or sift (a name, or "
        "its settings as a mapping with name)")
    update_fraction: float = Field(0.25, gt=0, le=1, description="share of blocks updated per step (official 0.25)")
    suppress_fraction: float = Field(0.5, gt=0, lt=1, description="share of blocks suppressed per trial (official 0.5)")
    trials: int = Field(3, ge=2, description="suppression trials per scoring round (official 3)")
    score_lr: float = Field(10.0, gt=0, description="step size of the score update (official 10)")
    score_every: int = Field(10, gt=0, description="optimizer steps between scoring rounds (official 10)")
    suppression: float = Field(0.25, ge=0, lt=1, description="factor on a suppressed block's updates (official 0.25)")
    score_batch_size: int = Field(16, gt=0, description="training examples in a round's scoring batch (official 16)")
    warmup_steps: int = Field(10, ge=0, description="all-block training steps before the warm-up rounds, then "
                              "discarded: updates start at zero, so suppressing them changes nothing until they train")
    warmup_rounds: int = Field(3, ge=0, description="scoring rounds in `sparsetune warmup` that set the initial scores")

    @field_validator("base", mode="before")
    @classmethod
    def _name_alone(cls, value):
        return {"name": value} if isinstance(value, str) else value


@register
class Ist(Method):
    name: ClassVar[str] = "ist"
    Config = IstConfig
    stages: ClassVar[tuple[str, ...]] = ("warmup",)
    random_access: ClassVar[bool] = True  # scoring rounds draw their examples
    partial_gradients: ClassVar[bool] = True  # undrawn blocks get no gradient

    def __init__(self, recipe: Recipe, reported_as: Recipe | None = None):
        super().__init__(recipe, reported_as)
        self.base = method_class(self.cfg.base.name)(recipe.with_method(self.cfg.base), reported_as=self.reported_as)
        self.scores = torch.zeros(0, dtype=torch.float64)
        self.generator = torch.Generator().manual_seed(recipe.seed)

    # --- blocks and scores --------------------------------------------------------------------
    def _wrap(self, loaded: LoadedModel, run: RunDir | None) -> nn.Module:
        """The base method's model, with each block's trainable parameters gathered for sampling."""
        _, blocks = find_blocks(loaded.model)
        model = self.base.prepare(loaded, run)
        self.blocks = list(blocks)
        self.block_params = [[p for p in block.parameters() if p.requires_grad] for block in blocks]
        if not any(self.block_params):
            raise UserError(f"method.base: {self.cfg.base.name} trains nothing inside the blocks, so IST has nothing "
                            "to sample")
        self.n_update = max(1, int(len(blocks) * self.cfg.update_fraction))
        self.n_suppress = max(1, int(len(blocks) * self.cfg.suppress_fraction))
        self.scores = torch.zeros(len(blocks), dtype=torch.float64)
        return model

    def importance(self) -> torch.Tensor:
        """Per block, the weight with which it is drawn for update: sigmoid(-s) (higher = more important)."""
        return torch.sigmoid(-self.scores)

    def _draw_suppressed(self) -> list[torch.Tensor]:
        """`trials` sets of blocks drawn with weights sigmoid(s), distinct while distinct sets remain."""
        probs, sets = torch.sigmoid(self.scores), []
        distinct = math.comb(len(self.scores), self.n_suppress)
        while len(sets) < self.cfg.trials:
            chosen = torch.multinomial(probs, self.n_suppress, generator=self.generator).sort().values
            if len(sets) >= distinct or not any(torch.equal(chosen, s) for s in sets):
                sets.append(chosen)
        return sets

    def _draw(self, count: int, size: int) -> list[int]:
        """`size` example indices from IST's own sampler (the same on every rank)."""
        return torch.randperm(count, generator=self.generator)[:size].tolist()

    def score_round(self, model: nn.Module, train: Split, indices: list[int], pad_id: int) -> dict:
        """One round of response suppression on the examples `indices`; updates the scores and returns what it
        measured."""
        probs = torch.sigmoid(self.scores)
        sets, losses = self._draw_suppressed(), []
        was_training = model.training
        model.eval()
        for chosen in sets:
            for i in chosen.tolist():
                self.base.scale_updates(self.blocks[i], self.cfg.suppression)
            losses.append(self._loss(model, train, indices, pad_id))
            for i in chosen.tolist():
                self.base.scale_updates(self.blocks[i], 1.0)
        model.train(was_training)
        rewards = torch.tensor([math.exp(-loss) for loss in losses], dtype=torch.float64)
        rewards -= rewards.mean()
        step = probs * (1 - probs) * self.cfg.score_lr
        for chosen, reward in zip(sets, rewards):
            self.scores[chosen] += reward * step[chosen]
        return {"suppressed": [s.tolist() for s in sets], "losses": losses}

    @torch.inference_mode()
    def _loss(self, model: nn.Module, train: Split, indices: list[int], pad_id: int) -> float:
        """The examples' mean loss, computed in chunks of the training micro-batch so a round never needs more
        memory than a training step; chunks are weighted by their examples (their target tokens for causal LMs).
        Under torchrun each rank computes its shard and the sums are all-reduced: every rank gets the same loss."""
        mine, counts = world().shard(indices)
        size, sums = self.recipe.train.batch_size, torch.zeros(2, dtype=torch.float64)
        for start in range(0, len(mine) if counts else 0, size):
            chunk = mine[start : start + size]
            count = train.loss_items(chunk)
            with self.placement.autocast():
                sums[0] += float(model(**self.placement.batch(train.batch(chunk, pad_id))).loss) * count
            sums[1] += count
        total, weight = world().all_reduce_(sums).tolist()
        return total / weight

    # --- warm-up: initial scores --------------------------------------------------------------
    def stage_fingerprint(self, stage: str) -> str:
        return self.recipe.fingerprint("seed", "model", "task.name", "task.data_dir", "task.data_file",
                                       "task.train_limit", "train.batch_size", "train.lr", "train.head_lr",
                                       "train.weight_decay",
                                       "train.max_grad_norm", "method.base", "method.suppress_fraction",
                                       "method.trials", "method.score_lr", "method.suppression",
                                       "method.score_batch_size", "method.warmup_steps", "method.warmup_rounds")

    def warmup(self, loaded: LoadedModel, data: TaskData, run: RunDir) -> str:
        """The base method's own stages (SIFT: scores and mask), a short all-block warm-up, then scoring rounds."""
        for stage in self.base.stages:
            getattr(self.base, stage)(loaded, data, run)
            world().barrier()  # the other ranks read what rank 0 wrote (SIFT's scores, then its mask)
        model = self.placement.place(self._wrap(loaded, run))  # the base's trainable state, fp32 on the device
        self.generator = torch.Generator().manual_seed(self.recipe.seed + 1)  # not the training draws
        train, pad_id = data.train, loaded.tokenizer.pad_token_id
        self._train_all_blocks(model, loaded, train, pad_id)
        rounds = [self.score_round(model, train, self._draw(len(train), self.cfg.score_batch_size), pad_id)
                  for _ in progress(range(self.cfg.warmup_rounds), "IST warm-up: scoring rounds")]
        run.save_tensors(SCORES_FILE, {"scores": self.scores})
        importance = [round(v, 4) for v in self.importance().tolist()]
        run.save_json("warmup/ist.json", {"blocks": len(self.blocks), "update_per_step": self.n_update,
                                                  "scores": self.scores.tolist(), "importance": importance,
                                                  "rounds": rounds})
        return (f"IST initial importance of {len(self.blocks)} blocks ({self.cfg.warmup_steps} warm-up steps, "
                f"{len(rounds)} rounds): {importance}")

    def _train_all_blocks(self, model: nn.Module, loaded: LoadedModel, data: Split, pad_id: int) -> None:
        """A few plain steps of the base method on every block, so that suppressing its updates means something
        (data-parallel under torchrun, on global batches of `batch_size x world size`)."""
        settings = self.recipe.train
        groups = self.base.optimizer_groups(model, loaded)
        params = [p for group in groups for p in group["params"]]
        optimizer = torch.optim.AdamW(groups, lr=settings.lr)
        parallel = data_parallel(model, self.placement.device)
        model.train()
        for _ in progress(range(self.cfg.warmup_steps), "IST warm-up: all-block steps"):
            plan = shard(data, self._draw(len(data), settings.batch_size * world().size))
            with self.placement.autocast():
                loss = parallel(**self.placement.batch(data.batch(plan.indices, pad_id))).loss
            (loss * plan.share * world().size).backward()
            if settings.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(params, settings.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            self.base.after_step(model)

    # --- training -----------------------------------------------------------------------------
    def prepare(self, loaded: LoadedModel, run: RunDir | None) -> nn.Module:
        model = self._wrap(loaded, run)
        if run is not None:
            path = run.root / SCORES_FILE
            if not path.is_file():
                raise UserError("IST needs initial scores: run `sparsetune warmup RECIPE` (train runs it when missing)")
            run.check_stage("warmup", self.stage_fingerprint("warmup"))
            self.load_method_state(load_file(str(path)))
        return model

    def before_step(self, model: nn.Module, step: int, train: Split, pad_id: int) -> dict:
        """Rescore every `score_every` steps, then draw the blocks this step updates; the others get no gradient."""
        info: dict = {}
        if step > 0 and step % self.cfg.score_every == 0:
            indices = self._draw(len(train), self.cfg.score_batch_size)
            info["losses"] = self.score_round(model, train, indices, pad_id)["losses"]
        if step == 0 or info:
            info["importance"] = self.importance().tolist()
        drawn = torch.multinomial(self.importance(), self.n_update, generator=self.generator).sort().values.tolist()
        for i, params in enumerate(self.block_params):
            for p in params:
                p.requires_grad_(i in drawn)
        return {"ist": {"drawn": drawn, **info}}

    def after_step(self, model: nn.Module) -> None:
        self.base.after_step(model)
        for params in self.block_params:  # between steps everything trainable is marked so (checkpoints, export)
            for p in params:
                p.requires_grad_(True)

    def method_state(self) -> dict[str, torch.Tensor]:
        return {"scores": self.scores.clone(), "generator": self.generator.get_state()}

    def load_method_state(self, state: dict[str, torch.Tensor]) -> None:
        if state["scores"].shape != self.scores.shape:
            raise UserError(f"IST scores are for {state['scores'].numel()} blocks; this model has {self.scores.numel()}")
        self.scores = state["scores"].clone()
        if "generator" in state:
            self.generator.set_state(state["generator"])

    # --- everything else is the base method's -------------------------------------------------
    @property
    def native_format(self) -> str:  # type: ignore[override]
        return self.base.native_format

    def trainable_parameters(self, model: nn.Module) -> dict[str, nn.Parameter]:
        return self.base.trainable_parameters(model)

    def trainable_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        return self.base.trainable_state(model)

    def load_trainable_state(self, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
        self.base.load_trainable_state(model, state)

    def param_groups(self, model: nn.Module, weight_decay: float) -> list[dict]:
        return self.base.param_groups(model, weight_decay)

    def merged(self, model: nn.Module) -> PreTrainedModel:
        return self.base.merged(model)

    def delta_tensors(self, model: nn.Module, base: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return self.base.delta_tensors(model, base)

    def export(self, model: nn.Module, loaded_base: LoadedModel, out: Path, fmt: str, values: str = "fp32") -> Path:
        return self.base.export(model, loaded_base, out, fmt, values)

    def describe(self, loaded: LoadedModel) -> str:
        _, blocks = find_blocks(loaded.model)
        n_update = max(1, int(len(blocks) * self.cfg.update_fraction))
        return (f"{self.base.describe(loaded)}; IST updates {n_update} of {len(blocks)} blocks per step, "
                f"rescored every {self.cfg.score_every} steps")
