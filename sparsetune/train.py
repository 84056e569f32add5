"""The one training loop every method uses: AdamW, linear warm-up/decay, accumulation, clipping,
periodic evaluation, atomic checkpoints and exact resume, on one process or data-parallel under torchrun
(global batch = batch_size x grad_accum x world size; the schedule counts optimizer steps of that batch)."""

from __future__ import annotations

import json
import math
import re
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from safetensors.torch import load_file, save_file
from torch import nn

from sparsetune.data import TaskData, load_task, task_spec
from sparsetune.data.loader import train_batches
from sparsetune.data.stream import StreamSplit
from sparsetune.device import Placement, lean_host_allocator, peak_rss_bytes, to_cpu, trim_host_memory
from sparsetune.distributed import bytes_all_reduced, data_parallel, no_sync, world
from sparsetune.errors import UserError
from sparsetune.evaluate import evaluate
from sparsetune.methods import method_class
from sparsetune.methods.base import Method
from sparsetune.models import HeadSpec, LoadedModel, keeps_packed_sequences_apart, load_model
from sparsetune.recipe import Recipe
from sparsetune.rundir import RunDir, atomic_path, read_json, write_json

TRAINABLE_FILE = "trainable.safetensors"
METHOD_STATE_FILE = "method.safetensors"  # a method's own step-to-step state (IST: scores, sampler)


@dataclass
class Session:
    """Everything built from a recipe: the method, the base model (wrapped) and, when needed, the data."""

    recipe: Recipe
    method: Method
    loaded: LoadedModel
    model: nn.Module
    data: TaskData | None

    @property
    def placement(self) -> Placement:
        return self.method.placement


def build(recipe: Recipe, run: RunDir | None, with_data: bool = True, prepare: bool = True) -> Session:
    """Load model and data; `prepare` hands the model to the method (stages before training skip it); the
    result sits on the recipe's device with the frozen base in its dtype."""
    torch.manual_seed(recipe.seed)  # a fresh task head is initialised from the recipe's seed
    if recipe.train.host_memory == "lean":
        lean_host_allocator()
    method = method_class(recipe.method.name)(recipe)  # resolves train.device first: a bad one fails before loading
    loaded = load_model(recipe.model.name, HeadSpec.for_task(task_spec(recipe.task.name)), recipe.model.trust_remote_code)
    if recipe.task.streaming and method.random_access:
        raise UserError(f"task.streaming: method '{recipe.method.name}' draws training examples at random, which a "
                        "stream cannot give; set task.streaming: false")
    causal = task_spec(recipe.task.name).kind == "instruct"  # load_task refuses packing for other tasks
    if recipe.task.packing and causal and not keeps_packed_sequences_apart(loaded.model):
        raise UserError(f"task.packing: {type(loaded.model).__name__} lets packed examples attend to one another "
                        "(it does not restart its attention at position-id boundaries); set task.packing: false")
    data = load_task(recipe.task, loaded.tokenizer, recipe.model.max_length) if with_data else None
    if data is not None and data.spec.kind == "regression":
        start_at_label_mean(loaded, data)
    # a stage marks what it differentiates itself; until then the whole base is frozen, so it is stored in dtype
    model = method.prepare(loaded, run) if prepare else loaded.model.requires_grad_(False)
    return Session(recipe, method, loaded, method.placement.place(model), data)


@torch.no_grad()
def start_at_label_mean(loaded: LoadedModel, data: TaskData) -> None:
    """A fresh regression head outputs about 0 while STS-B's labels average 2.7: at a sparse method's learning rate
    most of training would go to learning that offset. Its output bias starts at the mean training label instead
    (the best constant predictor), for every method alike, so training learns the relation, not the offset."""
    mean = float(np.mean(data.train.dataset["labels"]))
    for name, param in loaded.model.named_parameters():
        if name not in loaded.pretrained_names and name.endswith("bias") and param.numel() == 1:
            param.fill_(mean)


def with_placement(recipe: Recipe, device: str | None = None, dtype: str | None = None) -> Recipe:
    """`recipe` computing elsewhere: eval or export of a run on another machine, an fp32 merge for export."""
    updates = {k: v for k, v in (("device", device), ("dtype", dtype)) if v is not None}
    return recipe.model_copy(update={"train": recipe.train.model_copy(update=updates)}) if updates else recipe


def restore(run: RunDir, checkpoint: str = "final", with_data: bool = True, device: str | None = None,
            dtype: str | None = None) -> Session:
    """Rebuild a run's trained model from `final/` or `checkpoints/step-N/` (on its recipe's device unless told)."""
    recipe = with_placement(run.load_recipe(), device, dtype)
    folder = run.final if checkpoint == "final" else run.checkpoints / checkpoint
    if checkpoint != "final" and not re.fullmatch(r"step-\d+", checkpoint):
        raise UserError(f"--checkpoint: expected 'final' or a checkpoint folder such as step-100, got '{checkpoint}'")
    if not (folder / TRAINABLE_FILE).is_file():
        raise UserError(f"{run.root}: no trained state in '{folder.name}' (has `sparsetune train` finished?)")
    if problem := run.damage(folder):
        raise UserError(f"{folder}: damaged ({problem}); evaluate another checkpoint or retrain")
    session = build(recipe, run, with_data)
    session.method.load_trainable_state(session.model, load_file(str(folder / TRAINABLE_FILE)))
    return session


def _lr_lambda(warmup: int, total: int):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total - step) / max(1, total - warmup))

    return factor


class Trainer:
    def __init__(self, session: Session, run: RunDir, console: Console):
        self.s, self.run, self.console = session, run, console
        cfg = session.recipe.train
        self.cfg = cfg
        self.placement = session.placement
        self.world = world()
        self.module = data_parallel(session.model, self.placement.device, session.method.partial_gradients)
        self.scaler = self.placement.grad_scaler()  # fp16 only; a no-op otherwise
        self.groups = session.method.optimizer_groups(session.model, session.loaded)
        self.params = [p for g in self.groups for p in g["params"]]
        if not self.params:
            raise UserError(f"method '{session.method.name}' left nothing to train")
        self.optimizer = torch.optim.AdamW(self.groups, lr=cfg.lr)
        self.micro_batch = cfg.batch_size * self.world.size  # examples per micro-batch over all ranks
        if isinstance(session.data.train, StreamSplit):  # no length: max_steps is required, "each epoch" is the end
            if not cfg.max_steps:
                raise UserError("train.max_steps: required with task.streaming (a stream has no length to count "
                                "epochs in)")
            self.micro_per_epoch, self.steps_per_epoch = None, cfg.max_steps
        else:
            self.micro_per_epoch = math.ceil(len(session.data.train) / self.micro_batch)
            self.steps_per_epoch = math.ceil(self.micro_per_epoch / cfg.grad_accum)
        self.total_steps = cfg.max_steps or cfg.epochs * self.steps_per_epoch
        warmup = round(cfg.warmup_ratio * self.total_steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, _lr_lambda(warmup, self.total_steps))
        self.step, self.consumed = 0, 0
        # Training seconds up to the loaded checkpoint, so a resumed run reports the whole time it took to get
        # here (an interrupted attempt's work past its last checkpoint is redone, and only counted once).
        self.seconds_before, self._started = 0.0, time.perf_counter()

    def seconds(self) -> float:
        """Training time to the current step, over every attempt."""
        return self.seconds_before + time.perf_counter() - self._started

    # --- checkpoints --------------------------------------------------------------------------
    def save_checkpoint(self) -> None:
        """Rank 0 writes; the random states of every rank (dropout draws differ with their shards) go with it."""
        rng = self.world.all_gather(torch.get_rng_state())
        cuda = self.placement.device.type == "cuda"
        cuda_rng = self.world.all_gather(torch.cuda.get_rng_state(self.placement.device)) if cuda else None
        if not self.run.writer:
            return
        with atomic_path(self.run.checkpoint(self.step)) as tmp:
            tmp.mkdir()
            save_file(self.s.method.trainable_state(self.s.model), str(tmp / TRAINABLE_FILE))
            if method_state := self.s.method.method_state():
                save_file(method_state, str(tmp / METHOD_STATE_FILE))
            state = {"optimizer": to_cpu(self.optimizer.state_dict()), "scheduler": self.scheduler.state_dict(),
                     "rng": rng, "scaler": self.scaler.state_dict()}
            if cuda:
                state["cuda_rng"] = cuda_rng
            torch.save(state, tmp / "state.pt")
            write_json(tmp / "trainer.json", {"step": self.step, "micro_batches": self.consumed,
                                              "world_size": self.world.size, "train_seconds": round(self.seconds(), 2),
                                              "recipe_fingerprint": self.s.recipe.fingerprint()})
            self.run.seal(tmp)
        self.run.prune_checkpoints(self.cfg.keep_checkpoints)

    def load_checkpoint(self, folder: Path) -> None:
        info = read_json(folder / "trainer.json")
        if (saved := info.get("world_size", 1)) != self.world.size:
            launch = "one process" if saved == 1 else f"--nproc {saved} (or torchrun --nproc_per_node {saved})"
            raise UserError(f"{folder}: written by a run on {saved} process(es), resumed on {self.world.size}; the "
                            f"global batch would change: resume with {launch}, or train --force to start over")
        self.s.method.load_trainable_state(self.s.model, load_file(str(folder / TRAINABLE_FILE)))
        if (folder / METHOD_STATE_FILE).is_file():
            self.s.method.load_method_state(load_file(str(folder / METHOD_STATE_FILE)))
        state = torch.load(folder / "state.pt", weights_only=True, map_location="cpu")
        self.optimizer.load_state_dict(state["optimizer"])  # moves the moments to the parameters' device
        self.scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(_rank_state(state["rng"], self.world.rank))
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        if "cuda_rng" in state and self.placement.device.type == "cuda":
            torch.cuda.set_rng_state(_rank_state(state["cuda_rng"], self.world.rank), self.placement.device)
        self.step, self.consumed = info["step"], info["micro_batches"]
        self.seconds_before = info.get("train_seconds", 0.0)

    # --- the loop -----------------------------------------------------------------------------
    def train(self, stop_at_step: int | None = None) -> bool:
        """Train to the end (returns True) or until `stop_at_step` (checkpointed; returns False)."""
        s, cfg, run, placement, ranks = self.s, self.cfg, self.run, self.placement, self.world
        pad_id = s.loaded.tokenizer.pad_token_id
        train = s.data.train
        batches = train_batches(train, pad_id, self.micro_batch, cfg.grad_accum, s.recipe.seed, self.consumed,
                                *placement.loader_settings(cfg.loader_workers))
        s.model.train()
        window_loss = torch.zeros((), device=placement.device)  # read at log time: no device sync per micro-batch
        window_steps, window_examples, window_tokens = 0, 0, 0
        self._started = window_start = time.perf_counter()
        with self._progress() as progress:
            task = progress.add_task("train", total=self.total_steps, completed=self.step, status="")
            while self.step < self.total_steps:
                if info := s.method.before_step(s.model, self.step, train, pad_id):
                    run.append_metrics({"step": self.step + 1, **info})
                for i in range(cfg.grad_accum):
                    batch, plan, tokens = next(batches)
                    with no_sync(self.module, i == cfg.grad_accum - 1):  # all-reduce once per optimizer step
                        with placement.autocast():
                            loss = self.module(**placement.batch(batch)).loss * plan.share
                        self.scaler.scale(loss * ranks.size).backward()  # DDP averages over the ranks
                    window_loss += loss.detach()
                    window_examples += plan.examples
                    window_tokens += tokens
                self.consumed += cfg.grad_accum
                grad_norm = None
                if cfg.max_grad_norm:
                    self.scaler.unscale_(self.optimizer)
                    grad_norm = torch.nn.utils.clip_grad_norm_(self.params, cfg.max_grad_norm)
                lr = self.scheduler.get_last_lr()[0]
                self.scaler.step(self.optimizer)
                self.scaler.update()
                self.scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
                s.method.after_step(s.model)
                self.step += 1
                window_steps += 1
                last = self.step == self.total_steps
                if self.step % cfg.log_every == 0 or last:
                    now = time.perf_counter()
                    epoch = round(self.consumed / self.micro_per_epoch, 4) if self.micro_per_epoch else None
                    row = {"step": self.step, "epoch": epoch,
                           "loss": float(ranks.all_reduce_(window_loss)) / window_steps, "lr": lr,
                           "grad_norm": None if grad_norm is None else float(grad_norm),
                           "examples_per_s": window_examples / (now - window_start),
                           "tokens_per_s": float(ranks.all_reduce_(torch.tensor(window_tokens, dtype=torch.float64)))
                           / (now - window_start), "elapsed_s": self.seconds()}
                    run.append_metrics(row)
                    status = (f"loss {row['loss']:.4f} lr {lr:.2e} {row['examples_per_s']:.1f} ex/s"
                              f"{placement.memory_status()}")
                    progress.update(task, status=status)
                    if not self.console.is_terminal:
                        self.console.print(f"step {self.step}/{self.total_steps} {status}")
                    trim_host_memory()
                    window_loss, window_steps, window_start = torch.zeros_like(window_loss), 0, now
                    window_examples = window_tokens = 0
                progress.update(task, completed=self.step)
                if self._due(cfg.eval_every) and not last:
                    metrics, _ = evaluate(s.model, s.data, s.loaded.tokenizer, cfg.eval_batch_size, placement, splits=1)
                    run.append_metrics({"step": self.step, "eval": metrics})
                    self.console.print(f"step {self.step} dev {_fmt(metrics)}")
                if not last and (self._due(cfg.save_every) or self.step == stop_at_step):
                    self.save_checkpoint()
                if self.step == stop_at_step and not last:
                    return False
        return True

    def _due(self, every: int | None) -> bool:
        return self.step % (every or self.steps_per_epoch) == 0

    def _progress(self) -> Progress:
        return Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
            TextColumn("{task.fields[status]}"), console=self.console,
            disable=not self.console.is_terminal or self.console.quiet,  # one bar: rank 0's
        )

    def save_final(self) -> None:
        if not self.run.writer:
            return
        with atomic_path(self.run.final) as tmp:
            tmp.mkdir()
            save_file(self.s.method.trainable_state(self.s.model), str(tmp / TRAINABLE_FILE))
            write_json(tmp / "final.json", {"step": self.step, "method": self.s.method.name,
                                            "recipe_fingerprint": self.s.recipe.fingerprint()})
            self.run.seal(tmp)


def _newest_intact(run: RunDir, steps: list[int], console: Console) -> Path:
    """The newest checkpoint whose files match their checksums; a damaged one is skipped with a warning."""
    damaged = []
    for step in reversed(steps):
        folder = run.checkpoint(step)
        if (problem := run.damage(folder)) is None:
            return folder
        console.print(f"warning: {folder} is damaged ({problem}); falling back to an earlier checkpoint",
                      markup=False, highlight=False)
        damaged.append(folder.name)
    raise UserError(f"{run.checkpoints}: no intact checkpoint to resume from (damaged: {', '.join(damaged)}); "
                    "train --force to start over")


def _rank_state(saved: torch.Tensor | list[torch.Tensor], rank: int) -> torch.Tensor:
    """This rank's random state from a checkpoint (one per rank; a single tensor from before there were ranks)."""
    return saved if isinstance(saved, torch.Tensor) else saved[rank]


def _count(train) -> str:
    return "streamed" if isinstance(train, StreamSplit) else f"{len(train):,}"


def _fmt(metrics: dict) -> str:
    return " ".join(f"{k}={v:.4f}" for k, v in metrics.items())


def write_eval(run: RunDir, session: Session, checkpoint: str) -> dict:
    """Score `session` on every dev split; write eval/results.json and eval/predictions.jsonl."""
    r = session.recipe
    metrics, rows = evaluate(session.model, session.data, session.loaded.tokenizer, r.train.eval_batch_size,
                             session.placement, r.task.generations, r.task.max_new_tokens)
    results = {"task": r.task.name, "splits": [s.name for s in session.data.evals], "metrics": metrics,
               "checkpoint": checkpoint, "method": r.method.name, "model": r.model.name,
               "recipe_fingerprint": r.fingerprint(), "examples": {s.name: len(s) for s in session.data.evals}}
    if run.writer:
        with atomic_path(run.eval_dir / "predictions.jsonl") as tmp:
            tmp.write_text("".join(json.dumps(row) + "\n" for row in rows))
        write_json(run.eval_dir / "results.json", results)
    return results


def train_run(recipe: Recipe, run: RunDir, console: Console, resume: bool, stop_at_step: int | None) -> dict | None:
    """Train (resuming from the newest complete checkpoint when asked), save final/, evaluate."""
    if resume and run.final.is_dir():
        console.print(f"{run.root}: training already finished; evaluating final/")
        session = restore(run)
        return write_eval(run, session, "final")
    session = build(recipe, run)
    placement, ranks = session.placement, world()
    trainer = Trainer(session, run, console)
    scale = {**ranks.record(), "global_batch_size": trainer.micro_batch * recipe.train.grad_accum}
    run.update_manifest(**placement.record(), **scale)
    if resume and (steps := run.checkpoint_steps()):
        trainer.load_checkpoint(_newest_intact(run, steps, console))
        console.print(f"resumed from checkpoints/step-{trainer.step}")
    run.truncate_metrics(trainer.step)  # rows an interrupted attempt logged past the checkpoint (or before any)
    console.print(
        f"training {recipe.method.name} on {recipe.task.name}: {session.method.trainable_count(session.model):,} "
        f"trainable, {_count(session.data.train)} {session.data.train.unit}, {trainer.total_steps} steps, on "
        f"{placement.device} ({placement.device_name()}), base in {placement.dtype_name}"
        + (f"; {ranks.size} ranks, global batch {scale['global_batch_size']}" if ranks.launched else "")
    )
    trim_host_memory()  # what loading and tokenizing freed
    placement.reset_peak_memory()
    first_step = trainer.step
    finished = trainer.train(stop_at_step)
    elapsed = trainer.seconds()
    if (sent := bytes_all_reduced(trainer.module)) is not None and trainer.step > first_step:
        scale["allreduce_bytes_per_step"] = round(sent / (trainer.step - first_step))
    if not finished:
        run.record_stage("train", recipe.fingerprint(), completed=False, step=trainer.step, wall_time_s=round(elapsed, 2))
        console.print(f"stopped at step {trainer.step}; continue with --resume")
        return None
    trainer.save_final()
    peaks = {"peak_rss_bytes": peak_rss_bytes(), "peak_device_memory_bytes": placement.peak_memory_bytes()}
    run.record_stage("train", recipe.fingerprint(), completed=True, step=trainer.step, wall_time_s=round(elapsed, 2),
                     trainable=session.method.trainable_count(session.model), **placement.record(), **scale, **peaks)
    run.update_manifest(**placement.record(), **scale, **peaks)
    return write_eval(run, session, "final")


def export_run(run: RunDir, output: Path, fmt: str, checkpoint: str = "final", device: str | None = None,
               values: str = "fp32") -> int:
    """Write a run's trained task in `fmt` (auto: the method's own); returns the bytes written.

    Export merges into the base as distributed (fp32), whatever dtype the run stored its base in: a delta
    holds the trained fp32 increments, and a merged model is base + increments, not a rounded bf16 copy.
    The size of the method's own export of final/ is kept in the manifest, for reports.
    """
    session = restore(run, checkpoint, with_data=False, device=device, dtype="fp32")
    written = session.method.native_format if fmt == "auto" else fmt
    if values != "fp32" and written != "delta":
        raise UserError(f"--values {values}: only a delta file stores sparse values; this export writes {written} "
                        "(use --format delta)")
    base = load_model(session.recipe.model.name, HeadSpec.for_task(task_spec(session.recipe.task.name)), session.recipe.model.trust_remote_code)
    session.placement.place(base.model)
    path = session.method.export(session.model, base, output, fmt, values)
    size = path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    if checkpoint == "final" and fmt in ("auto", session.method.native_format) and values == "fp32":
        run.update_manifest(delta={"format": session.method.native_format, "bytes": size,
                                   "recipe_fingerprint": session.recipe.fingerprint()})
    return size
