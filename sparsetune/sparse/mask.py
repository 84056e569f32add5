"""Learned zero masks: a frozen Linear whose weight is used as W * m, m binary with exactly k zeros.

The k zeros are the k highest zeroing scores (top-k binarisation); the scores learn through the
straight-through estimator: dL/dscore = -dL/dm = -(dL/dW_used * W), i.e. a score rises when zeroing its
entry would lower the loss to first order. The pretrained weight itself never changes.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


def top_k_zeros(scores: torch.Tensor, k: int, excluded: torch.Tensor | None = None) -> torch.Tensor:
    """Flat indices of the k highest scores, sorted (the entries set to zero), never at `excluded` entries (those
    already zero in the base: zeroing them changes nothing, so they never count to the budget)."""
    flat = scores.detach().reshape(-1)
    if excluded is not None:
        flat = flat.masked_fill(excluded.reshape(-1), float("-inf"))
    return flat.topk(k).indices.sort().values


class _TopKZeroMask(torch.autograd.Function):
    """m = 1 except 0 at the k highest scores; backward passes -dL/dm straight through to the scores."""

    @staticmethod
    def forward(ctx, scores: torch.Tensor, k: int, excluded: torch.Tensor | None) -> torch.Tensor:
        mask = torch.ones_like(scores)
        if k:
            mask.view(-1)[top_k_zeros(scores, k, excluded)] = 0
        return mask

    @staticmethod
    def backward(ctx, grad_mask: torch.Tensor):
        return -grad_mask, None, None


class ZeroMaskLinear(nn.Module):
    """A Linear computed with W * m; `scores` (one per weight entry) are what trains."""

    def __init__(self, base_layer: nn.Linear, k: int, init: torch.Tensor):
        super().__init__()
        self.base_layer = base_layer
        base_layer.requires_grad_(False)
        base_zero = base_layer.weight.detach() == 0  # found once: the base never changes
        self.k = min(k, base_zero.numel() - int(base_zero.sum()))  # zeros the final mask adds to the base's own
        self.active_k = self.k  # zeros in the forward now (a ramp may start lower)
        self.scores = nn.Parameter(init.to(base_layer.weight).clone())
        # kept only when there are any (dequantized checkpoints); moves with the module, never saved
        self.register_buffer("base_zero", base_zero if base_zero.any() else None, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mask = _TopKZeroMask.apply(self.scores, self.active_k, self.base_zero)
        weight = self.base_layer.weight
        return F.linear(x, weight * mask.to(weight.dtype), self.base_layer.bias)  # a low-precision base stays so

    def zeroed(self) -> torch.Tensor:
        """The final mask's zeroed flat indices."""
        return top_k_zeros(self.scores, self.k, self.base_zero)
