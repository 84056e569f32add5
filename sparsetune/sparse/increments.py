"""Sparse increments: train k chosen entries of a frozen Linear without a dense gradient or optimizer state.

fp32 base: the base weight stays in place and is the one the forward uses; after every optimizer step the
selected entries are rewritten as W[idx] = W0[idx] + values, so the forward never clones W.

bf16/fp16 base: writing W0[idx] + v back into the low-precision weight would round away every increment below
half an ulp of its entry (0.2-0.4% of it), most increments early in training. So the base is never written:
the forward is y = x W0^T (in the base's dtype) + x ΔW^T with ΔW the fp32 sparse matrix of the increments,
summed in fp32, and the backward's grad_x carries ΔW's share too. No trained increment is lost.

Either way no weight ever holds a .grad: the gradient of `values` is computed per layer inside the backward,
either only at the selected entries (indexed: a sampled dense-dense product, SDDMM, dL/dW[r, c] =
sum over tokens of dy[:, r] * x[:, c], through torch.sparse.sampled_addmm on a CSR pattern) or from this
layer's dense dW gathered at idx and freed at once (dense). `grad: auto` picks per tensor and per backward by
the rule `use_indexed`, measured on each device (docs/BENCH.md).
"""

from __future__ import annotations

import warnings

import torch
from torch import nn
from torch.nn import functional as F

warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")

# grad: auto, per device type: rows (tokens up to, tensor entries at least, indexed below this density), read off
# `python scripts/bench.py --crossover` (docs/BENCH.md, "The crossover"): the first row whose token and size bounds
# hold decides; none holding means dense. The SDDMM's cost grows with tokens x (rows + cols) besides k x tokens, so
# small tensors at many tokens go dense; the GEMM's grows with rows x cols, so large tensors stay indexed longest.
# A device type without a measurement takes the dense GEMM, which never costs more than dense training does.
INDEXED_BELOW: dict[str, tuple[tuple[int, int, float], ...]] = {
    "cpu": (
        (256, 0, 0.02),
        (2048, 4_000_000, 0.03),
        (2048, 300_000, 0.01),
        (1 << 62, 16_000_000, 0.02),
        (1 << 62, 4_000_000, 0.003),
    ),
}


def use_indexed(mode: str, k: int, numel: int, tokens: int, device_type: str) -> bool:
    """Whether one backward computes the selected entries' gradient by SDDMM (else dense dW + gather)."""
    if mode != "auto":
        return mode == "indexed"
    for max_tokens, min_numel, density in INDEXED_BELOW.get(device_type, ()):
        if tokens <= max_tokens and numel >= min_numel:
            return k / numel < density
    return False


def csr_pattern(rows: torch.Tensor, cols: torch.Tensor, n_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(crow, col) of the CSR pattern holding entries (rows[j], cols[j]), given in row-major order."""
    crow = torch.zeros(n_rows + 1, dtype=torch.long, device=rows.device)
    crow[1:] = torch.bincount(rows, minlength=n_rows).cumsum(0)
    index = torch.int32 if rows.numel() < 2**31 else torch.long
    return crow.to(index), cols.to(index)


def _csr(crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    return torch.sparse_csr_tensor(crow, col, values, size=shape, check_invariants=False)


def sampled_weight_grad(dy: torch.Tensor, x: torch.Tensor, crow: torch.Tensor, col: torch.Tensor) -> torch.Tensor:
    """(dy^T x) at the CSR pattern's entries, in its (row-major) order, without forming dy^T x: an SDDMM."""
    pattern = _csr(crow, col, torch.zeros(col.numel(), dtype=torch.float32, device=dy.device),
                   (dy.shape[1], x.shape[1]))
    return torch.sparse.sampled_addmm(pattern, dy.float().t(), x.float(), beta=0.0).values()


class _SparseGradLinear(torch.autograd.Function):
    """y = x W^T + b (+ x ΔW^T + Δb in fp32 for a low-precision base), with gradients for x and for the selected
    entries of W and b only."""

    @staticmethod
    def forward(ctx, x, weight, bias, w_values, b_values, layer: SiftLinear):
        exact = weight.dtype == torch.float32  # the weight already holds W0 + increments
        with torch.autocast(x.device.type, enabled=False):
            x_in = x.to(weight.dtype)
            if exact:
                y = F.linear(x_in, weight, bias)
            else:  # the bias (1-D) is kept in fp32
                y = F.linear(x_in, weight).float()
                if bias is not None:
                    y += bias
                if w_values is not None:
                    delta = _csr(layer.w_crow, layer.w_col, layer.scale * w_values, tuple(weight.shape))
                    y += torch.sparse.mm(delta, x_in.reshape(-1, x_in.shape[-1]).float().t()).t().view_as(y)
                if b_values is not None:
                    y += torch.zeros(y.shape[-1], device=y.device).index_put((layer.bias_inc.idx,),
                                                                             layer.scale * b_values)
        ctx.save_for_backward(x_in, weight, w_values)
        ctx.layer, ctx.exact, ctx.x_dtype = layer, exact, x.dtype
        ctx.has_w, ctx.has_b = w_values is not None, b_values is not None
        return y

    @staticmethod
    def backward(ctx, dy):
        x_in, weight, w_values = ctx.saved_tensors
        layer = ctx.layer
        dy2 = dy.reshape(-1, dy.shape[-1])
        x2 = x_in.reshape(-1, x_in.shape[-1])
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = dy2.to(weight.dtype) @ weight
            if not ctx.exact and ctx.has_w:  # ΔW's share: dy ΔW = (ΔW^T dy^T)^T, a CSR product as in the forward
                t_crow, t_col, order = layer.transposed_pattern()
                delta_t = _csr(t_crow, t_col, layer.scale * w_values.detach()[order], (weight.shape[1], weight.shape[0]))
                grad_x = grad_x.float() + torch.sparse.mm(delta_t, dy2.float().t()).t()
            grad_x = grad_x.to(ctx.x_dtype).view(*dy.shape[:-1], weight.shape[1])
        if ctx.has_w and ctx.needs_input_grad[3]:  # IST leaves undrawn blocks' increments without gradient
            inc = layer.weight_inc
            if use_indexed(layer.grad_mode, inc.idx.numel(), weight.numel(), x2.shape[0], x2.device.type):
                grad_w = sampled_weight_grad(dy2, x2, layer.w_crow, layer.w_col)
            else:
                grad_w = (dy2.to(x2.dtype).t() @ x2).view(-1)[inc.idx].float()
            if layer.scale != 1.0:
                grad_w = grad_w * layer.scale
        if ctx.has_b and ctx.needs_input_grad[4]:
            grad_b = dy2.float().sum(0)[layer.bias_inc.idx] * layer.scale
        return grad_x, None, None, grad_w, grad_b, None


class SparseIncrement(nn.Module):
    """k trainable entries of one frozen tensor: flat indices, the base values there, and fp32 increments."""

    def __init__(self, base: nn.Parameter, idx: torch.Tensor):
        super().__init__()
        idx = idx.to(device=base.device, dtype=torch.long).sort().values
        self.register_buffer("idx", idx, persistent=False)
        self.register_buffer("base_values", base.detach().reshape(-1)[idx].clone(), persistent=False)
        self.values = nn.Parameter(torch.zeros(idx.numel(), dtype=torch.float32, device=base.device))

    @torch.no_grad()
    def write_back(self, target: torch.Tensor, scale: float = 1.0) -> None:
        """target[idx] = W0[idx] + scale * values: the only place an fp32 base tensor ever changes."""
        target.view(-1)[self.idx] = self.base_values + (self.values if scale == 1.0 else scale * self.values)


class SiftLinear(nn.Module):
    """A Linear whose weight (and bias) train only at selected entries; `base_layer` is the original module."""

    def __init__(self, base_layer: nn.Linear, weight_idx: torch.Tensor | None, bias_idx: torch.Tensor | None,
                 grad_mode: str):
        super().__init__()
        self.base_layer = base_layer
        base_layer.requires_grad_(False)
        self.weight_inc = SparseIncrement(base_layer.weight, weight_idx) if weight_idx is not None else None
        self.bias_inc = SparseIncrement(base_layer.bias, bias_idx) if bias_idx is not None else None
        self.grad_mode = grad_mode
        self.scale = 1.0  # IST scales a block's increments; 1.0 is the trained model
        device = base_layer.weight.device
        w_idx = self.weight_inc.idx if self.weight_inc is not None else torch.empty(0, dtype=torch.long, device=device)
        rows_, in_features = base_layer.weight.shape
        crow, col = csr_pattern(w_idx // in_features, w_idx % in_features, rows_)  # the selected entries, as CSR
        self.register_buffer("w_crow", crow, persistent=False)
        self.register_buffer("w_col", col, persistent=False)

    def transposed_pattern(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """CSR pattern of ΔW^T and the order of `values` in it; built on first use (low-precision bases only)."""
        if getattr(self, "_transposed", None) is None or self._transposed[0].device != self.w_col.device:
            rows_, cols_ = self.base_layer.weight.shape
            idx = self.weight_inc.idx
            order = torch.argsort((idx % cols_) * rows_ + idx // cols_)  # column-major: ΔW^T's row-major order
            self._transposed = (*csr_pattern((idx % cols_)[order], (idx // cols_)[order], cols_), order)
        return self._transposed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        layer, w, b = self.base_layer, self.weight_inc, self.bias_inc
        return _SparseGradLinear.apply(x, layer.weight, layer.bias, w.values if w is not None else None,
                                       b.values if b is not None else None, self)

    def write_back(self, scale: float = 1.0) -> None:
        """After a step (or for IST's suppression): an fp32 base gets W0 + scale * increments at the selected
        entries; a low-precision base is never written, its forward adds scale * increments itself."""
        self.scale = scale
        if self.base_layer.weight.dtype != torch.float32:
            return
        if self.weight_inc is not None:
            self.weight_inc.write_back(self.base_layer.weight.data, scale)
        if self.bias_inc is not None:
            self.bias_inc.write_back(self.base_layer.bias.data, scale)
