"""Data parallelism across processes, on PyTorch's own engine: torchrun, DistributedDataParallel, nccl on GPUs and
gloo on CPUs.

Every rank holds the whole model and its own strided shard of each global batch (`batch_size x world_size`
examples), so N ranks at batch B train on the examples one process sees at batch N*B, in the same order; each
rank's loss is weighted by its share of the batch's examples (target tokens for instruction data), so that DDP's
mean over ranks is the global batch's mean. DDP all-reduces only what requires a gradient: a sparse method's
trainable values, not the model. Rank 0 alone writes the run directory and prints; the first rank that fails
reports one error line and every other rank stops quietly.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

EXIT_PEER = 3  # a rank that stopped because another rank failed (that one reported the error)
_FAILURE_KEY = "sparsetune/failure"


@dataclass(frozen=True)
class World:
    """This process's place among the ranks; one process and rank 0 outside torchrun."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    launched: bool = False  # started by torchrun: a process group exists, even with one rank

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, indices: list[int]) -> tuple[list[int], bool]:
        """This rank's strided part of a global batch, and whether it counts: a rank left without examples (a
        batch smaller than the world) runs the first one weighted zero, since every rank must take part in DDP."""
        mine = indices[self.rank :: self.size]
        return (mine, True) if mine else (indices[:1], False)

    # --- collectives (identity on one process) -------------------------------------------------
    def all_reduce_(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum `tensor` over ranks in place."""
        if self.launched and self.size > 1:
            dist.all_reduce(tensor)
        return tensor

    def all_gather(self, obj):
        """Every rank's `obj`, in rank order."""
        if not (self.launched and self.size > 1):
            return [obj]
        gathered = [None] * self.size
        dist.all_gather_object(gathered, obj)
        return gathered

    def record(self) -> dict:
        """Manifest entries: how many ranks shared each batch."""
        return {"world_size": self.size, "backend": dist.get_backend() if self.launched else None}

    def barrier(self) -> None:
        if self.launched and self.size > 1:
            dist.barrier()


_world = World()
_store: dist.Store | None = None


def world() -> World:
    return _world


def launched_by_torchrun() -> bool:
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"))


def init() -> World:
    """Join the process group when torchrun started this process (nccl for CUDA tensors, gloo for CPU ones)."""
    global _world, _store
    if not launched_by_torchrun() or _world.launched:
        return _world
    rank, size, local = (int(os.environ[k]) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    backend = "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(local % torch.cuda.device_count())
        backend = "cpu:gloo,cuda:nccl"
    dist.init_process_group(backend, timeout=timedelta(minutes=30))
    # our own client of torchrun's store (held by the launcher, so it outlives a failed rank)
    _store = dist.PrefixStore(f"sparsetune/{os.environ.get('TORCHELASTIC_RUN_ID', '')}/"
                              f"{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}",
                              dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]),
                                            is_master=False, timeout=timedelta(seconds=30)))
    _world = World(rank, size, local, launched=True)
    return _world


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def claim_failure() -> bool:
    """True for the first rank to fail, which reports the error; the others stop quietly (always True outside
    torchrun). A rank whose peer died fails in its next collective and finds the peer's claim here."""
    if not _world.launched or _store is None:
        return True
    me = str(_world.rank)
    try:
        return _store.compare_set(_FAILURE_KEY, "", me).decode() == me
    except Exception:  # the store is gone with the launcher: report rather than stay silent
        return True


# --- DistributedDataParallel ------------------------------------------------------------------
@dataclass
class AllReduceCount:
    """State of `allreduce_hook` for one DDP model: whether it sends parameters that sit out a step, and the
    gradient bytes it has sent."""

    partial: bool
    bytes_sent: int = 0


def allreduce_hook(state, bucket):  # no annotations: DDP checks them against the real types, not strings
    """A DDP communication hook: averages a gradient bucket over the ranks and counts the bytes it sends.

    With `state.partial`, it sends only the slices of parameters that take part in this step (those that require a
    gradient now: IST's drawn blocks, the same on every rank); the others keep no gradient.
    """
    buffer, size = bucket.buffer(), dist.get_world_size()
    slices, start = [], 0
    for param in bucket.parameters() if state.partial else ():
        if param.requires_grad:
            slices.append((start, start + param.numel()))
        start += param.numel()
    if not state.partial or len(slices) == len(bucket.parameters()):  # the whole bucket
        sent = buffer
    elif slices:
        sent = torch.cat([buffer[a:b] for a, b in slices])
    else:
        done: torch.futures.Future[torch.Tensor] = torch.futures.Future()
        done.set_result(buffer)
        return done
    state.bytes_sent += sent.numel() * sent.element_size()
    sent.div_(size)

    def scatter_back(fut: torch.futures.Future) -> torch.Tensor:
        if sent is not buffer:
            offset = 0
            for a, b in slices:
                buffer[a:b].copy_(sent[offset : offset + b - a])
                offset += b - a
        return buffer

    return dist.all_reduce(sent, async_op=True).get_future().then(scatter_back)


def data_parallel(model: nn.Module, device: torch.device, partial: bool = False) -> nn.Module:
    """`model` in DDP under torchrun (its gradients averaged over ranks through `allreduce_hook`), else itself.

    `partial`: some trainable parameters get no gradient in a step (IST), so DDP looks for unused ones.
    Buffers are not broadcast each step: they are constants every rank already holds.
    """
    if not _world.launched:
        return model
    ddp = nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None, broadcast_buffers=False,
        find_unused_parameters=partial)
    ddp.allreduce_count = AllReduceCount(partial)
    ddp.register_comm_hook(ddp.allreduce_count, allreduce_hook)
    return ddp


def bytes_all_reduced(model: nn.Module) -> int | None:
    """Gradient bytes a `data_parallel` model has sent so far (None on one process)."""
    count = getattr(model, "allreduce_count", None)
    return None if count is None else count.bytes_sent


def no_sync(model: nn.Module, sync: bool) -> contextlib.AbstractContextManager:
    """Skip DDP's all-reduce on micro-batches that only accumulate (all but the last of an optimizer step)."""
    if sync or not isinstance(model, nn.parallel.DistributedDataParallel):
        return contextlib.nullcontext()
    return model.no_sync()


# --- the launcher behind `sparsetune train --nproc N` -------------------------------------------
def launch(nproc: int, argv: list[str]) -> int:
    """Run `sparsetune <argv>` on `nproc` local ranks, as `torchrun --standalone --nproc_per_node` does; returns
    the exit code of the first rank that failed (which printed the error) or 0."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)  # the ranks report for themselves
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=str(uuid.uuid4()),
                          rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0, monitor_interval=0.1)
    try:
        elastic_launch(config, sys.executable)("-m", "sparsetune", *argv)
    except ChildFailedError as exc:
        failures = list(exc.failures.values())
        first = min([f for f in failures if f.exitcode != EXIT_PEER] or failures, key=lambda f: f.timestamp)
        if first.exitcode < 0:  # killed by a signal: nothing was printed by the rank itself
            from sparsetune.console import log

            log.print(f"error: rank {first.global_rank} was killed by {first.signal_name()}", markup=False)
            return 1
        return first.exitcode
    return 0


@contextlib.contextmanager
def main_rank_prints(*consoles) -> Iterator[None]:
    """Silence `consoles` on every rank but 0 (one progress bar, one log)."""
    quiet = [c.quiet for c in consoles]
    for console in consoles:
        console.quiet = console.quiet or not _world.is_main
    try:
        yield
    finally:
        for console, q in zip(consoles, quiet):
            console.quiet = q
