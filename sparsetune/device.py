"""Where and in what precision a run computes: one device per process, chosen once from the recipe.

The frozen base is stored in `train.dtype` (half the memory in bf16/fp16) and every forward runs under
autocast in that dtype; everything that trains (increments, adapters, scores, the head, full fine-tuning's
weights) stays fp32, so the optimizer's state is fp32 too. Files never hold device tensors: whatever is
written goes through `to_cpu` first, so a run trained on a GPU is read back on a CPU.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import gc
import platform
import resource
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel

from sparsetune.distributed import world
from sparsetune.errors import UserError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DEVICE_CHOICES = "auto, cpu, cuda, cuda:N or mps"


def resolve_device(name: str) -> torch.device:
    """`auto`: CUDA when available, else MPS, else the CPU; an explicit device must exist. Under torchrun,
    `auto` and `cuda` mean this rank's own GPU (cuda:LOCAL_RANK)."""
    ranks = world()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"train.device: '{name}' is not a device; expected {DEVICE_CHOICES}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
            raise UserError(f"train.device: '{name}' asked for, but torch {torch.__version__} ({build}) sees no "
                            "CUDA device; use train.device=cpu or auto")
        if device.index is not None and ranks.size > 1:
            raise UserError(f"train.device: '{name}' would put all {ranks.size} ranks on one GPU; use cuda or auto, "
                            "which give each rank its own (cuda:LOCAL_RANK)")
        index = device.index if device.index is not None else torch.cuda.current_device()
        if index >= torch.cuda.device_count():
            raise UserError(f"train.device: '{name}' asked for, but only {torch.cuda.device_count()} CUDA "
                            f"device(s) are visible (cuda:0 to cuda:{torch.cuda.device_count() - 1})")
        return torch.device("cuda", index)
    if device.type == "mps":
        if not torch.backends.mps.is_available():
            raise UserError("train.device: 'mps' asked for, but this torch sees no Apple GPU; use cpu or auto")
        return device
    if device.type != "cpu":
        raise UserError(f"train.device: '{name}' is not supported; expected {DEVICE_CHOICES}")
    return device


def check_dtype(device: torch.device, dtype_name: str) -> torch.dtype:
    """The dtype, once the device is known to compute in it."""
    dtype = DTYPES[dtype_name]
    if device.type == "cuda" and dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        name = torch.cuda.get_device_name(device)
        raise UserError(f"train.dtype: bf16 asked for, but {name} does not support bfloat16; use fp16 or fp32")
    if device.type == "mps" and dtype == torch.bfloat16 and not torch.backends.mps.is_macos_or_newer(14, 0):
        raise UserError("train.dtype: bf16 on mps needs macOS 14 or newer; use fp16 or fp32")
    return dtype


def to_cpu(obj: Any) -> Any:
    """Tensors (nested in dicts, lists, tuples) moved to the CPU, for files that any machine reads back."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_cpu(v) for v in obj)
    return obj


@dataclass(frozen=True)
class Placement:
    """The device, the base's dtype and activation checkpointing of one run."""

    device: torch.device
    dtype: torch.dtype
    gradient_checkpointing: bool = False

    @classmethod
    def from_config(cls, train: Any) -> Placement:
        """From a recipe's `train` section (device, dtype, gradient_checkpointing)."""
        device = resolve_device(train.device)
        return cls(device, check_dtype(device, train.dtype), train.gradient_checkpointing)

    @property
    def dtype_name(self) -> str:
        return next(k for k, v in DTYPES.items() if v == self.dtype)

    @property
    def low_precision(self) -> bool:
        return self.dtype != torch.float32

    def place(self, model: nn.Module) -> nn.Module:
        """Move to the device; frozen matrices (and embeddings) to the run's dtype; trainable tensors and 1-D ones
        (biases, norms: about 0.1% of the weights, and what mixed-dtype norm kernels expect) to fp32.

        Called again after a method wraps an already placed model (IST's warm-up), it only fixes what changed.
        """
        model.to(self.device)
        for param in model.parameters():
            if param.is_floating_point():
                wanted = self.storage_dtype(param, param.requires_grad)
                if param.dtype != wanted:
                    param.data = param.data.to(wanted)
        if self.gradient_checkpointing:
            hf_model = next((m for m in model.modules() if isinstance(m, PreTrainedModel)), None)
            if hf_model is None or not hf_model.supports_gradient_checkpointing:
                raise UserError(f"train.gradient_checkpointing: {type(model).__name__} does not support it")
            # non-reentrant: works with frozen inputs, custom autograd Functions and per-step freezing alike
            kwargs = {"use_reentrant": False}
            if hasattr(hf_model, "activation_checkpointing_enable"):  # transformers 5's name
                hf_model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
            else:
                hf_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        return model

    def storage_dtype(self, tensor: torch.Tensor, trainable: bool = False) -> torch.dtype:
        """What `place` stores a floating-point tensor in: fp32 if it trains or is 1-D, else the run's dtype."""
        return torch.float32 if trainable or tensor.ndim < 2 else self.dtype

    def autocast(self) -> contextlib.AbstractContextManager:
        """The context every forward runs in: autocast to the run's dtype, or nothing in fp32."""
        if not self.low_precision:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def batch(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.to(self.device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}

    def loader_settings(self, workers: int | str) -> tuple[int, bool]:
        """(DataLoader workers, pin_memory): `auto` collates ahead in 2 workers into pinned memory when a GPU is
        fed; on the CPU the cores that would collate are the ones computing, so it collates in the loop."""
        cuda = self.device.type == "cuda"
        return (2 if cuda else 0) if workers == "auto" else int(workers), cuda

    def grad_scaler(self) -> torch.amp.GradScaler:
        """A loss scaler, enabled for fp16 only (bf16 has fp32's range)."""
        return torch.amp.GradScaler(self.device.type, enabled=self.dtype == torch.float16)

    # --- what the manifest and the progress bar report -----------------------------------------
    def device_name(self) -> str:
        if self.device.type == "cuda":
            return torch.cuda.get_device_name(self.device)
        if self.device.type == "mps":
            return "Apple GPU (mps)"
        return _cpu_name()

    def reset_peak_memory(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

    def peak_memory_bytes(self) -> int | None:
        """Peak memory allocated on the device (None on the CPU, whose figure is the process's peak RSS)."""
        if self.device.type == "cuda":
            return int(torch.cuda.max_memory_allocated(self.device))
        if self.device.type == "mps":
            return int(torch.mps.driver_allocated_memory())
        return None

    def memory_status(self) -> str:
        """A short figure for the progress bar: device memory on a GPU, nothing on the CPU."""
        peak = self.peak_memory_bytes()
        return "" if peak is None else f" {peak / 2**30:.2f} GiB peak"

    def record(self) -> dict[str, Any]:
        """Manifest entries: where the run computed."""
        return {"device": str(self.device), "device_name": self.device_name(), "dtype": self.dtype_name,
                "gradient_checkpointing": self.gradient_checkpointing}


def _cpu_name() -> str:
    """The processor's model name (Linux), else the machine type."""
    try:
        with open("/proc/cpuinfo") as handle:
            return next(line.split(":", 1)[1].strip() for line in handle if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.machine() or "cpu"


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@functools.cache
def _glibc():
    """The C library when it is glibc (Linux), for its allocator controls; None elsewhere."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim  # noqa: B018  (musl and macOS have none)
    except (OSError, AttributeError):
        return None
    return libc


def trim_host_memory() -> None:
    """Hand memory freed on the host back to the system. glibc keeps freed blocks for reuse, and with tensors whose
    sizes change every batch (padding to the longest row) its heap only grows: a training run's RSS rose by a
    quarter from step 10 to step 200. Called between stages and at every log step; a no-op off glibc."""
    gc.collect()
    if (libc := _glibc()) is not None:
        libc.malloc_trim(0)


def lean_host_allocator() -> None:
    """train.host_memory: lean. glibc serves large blocks from its heap once a freed mmap raised its threshold,
    and keeps them; a fixed 64 KiB threshold maps every large tensor afresh and unmaps it when freed, so RSS stays
    at the working set (SST-2 SIFT at 32 x 64: 1.0 GB flat instead of 1.4 GB peaks) for a quarter of the CPU
    throughput spent in page faults. What MALLOC_MMAP_THRESHOLD_=65536 does, set from the recipe."""
    if (libc := _glibc()) is not None:
        libc.mallopt(-3, 65536)  # M_MMAP_THRESHOLD
