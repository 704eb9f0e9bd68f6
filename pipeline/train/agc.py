"""Adaptive Gradient Clipping (Brock et al. 2021, spec section 4), as a function of (param, grad) pairs.

For each unit i of a parameter W with gradient G:
    ||W_i||* = max(||W_i||_F, eps)                  eps = 1e-3 keeps zero-initialised params trainable
    if ||G_i|| / ||W_i||* > clip:  G_i <- clip * ||W_i||* / max(||G_i||, 1e-6) * G_i

Units (PyTorch layouts): conv (O, I, kh, kw) -> each output channel, norm over dims (1, 2, 3);
linear (out, in) -> each output unit, norm over dim 1; vectors and scalars -> the whole tensor.

The function takes explicit pairs rather than a model or optimizer so the trainer can call it on
the full, globally averaged gradient at the accumulation boundary at any ZeRO stage (gathered
through deepspeed.utils.safe_get_full_grad), then write the result back. It must run before
weight decay and momentum (DM's SGD_AGC order), on unscaled fp32 gradients.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch

_GRAD_FLOOR = 1e-6  # only guards the division


@dataclass
class AGCStats:
    """Statistics of one clipping pass, as tensors (no host sync until the trainer logs them)."""

    clipped_units: torch.Tensor  # number of units whose gradient was rescaled
    total_units: int
    max_ratio: torch.Tensor  # max over units of ||G_i|| / ||W_i||*

    @property
    def clip_fraction(self) -> float:
        return float(self.clipped_units) / max(1, self.total_units)


def unitwise_norm(x: torch.Tensor) -> torch.Tensor:
    """Frobenius norm per unit, shaped to broadcast against x (scalar for ndim <= 1)."""
    if x.ndim <= 1:
        return torch.linalg.vector_norm(x)
    return torch.linalg.vector_norm(x, dim=tuple(range(1, x.ndim)), keepdim=True)


@torch.no_grad()
def clip_unitwise_(param: torch.Tensor, grad: torch.Tensor, clip: float, eps: float = 1e-3) -> tuple[torch.Tensor, int, torch.Tensor]:
    """Clip `grad` in place for one tensor; returns (clipped units, units, max ratio).

    scale = min(1, clip * ||W_i||* / max(||G_i||, 1e-6)) equals DM's
    where(||G_i|| > clip * ||W_i||*, clip * ||W_i||* / max(||G_i||, 1e-6), 1), with fewer kernels.
    """
    max_norm = unitwise_norm(param.float()).clamp_(min=eps).mul_(clip)  # clip * ||W_i||*
    g_norm = unitwise_norm(grad.float())
    ratio = g_norm / max_norm  # > 1 exactly for the units that clip
    grad.mul_((max_norm / g_norm.clamp(min=_GRAD_FLOOR)).clamp_(max=1.0).to(grad.dtype))
    return (ratio > 1).sum(), ratio.numel(), ratio.max() * clip


@torch.no_grad()
def adaptive_grad_clip_(
    pairs: Iterable[tuple[torch.Tensor, torch.Tensor | None]], clip: float = 0.01, eps: float = 1e-3
) -> AGCStats:
    """Apply AGC in place to every (param, grad) pair; grads that are None are skipped."""
    clipped, units, ratios = [], 0, []
    for param, grad in pairs:
        if grad is None:
            continue
        if param.shape != grad.shape:
            raise ValueError(f"AGC: parameter shape {tuple(param.shape)} != gradient shape {tuple(grad.shape)}")
        c, n, r = clip_unitwise_(param, grad, clip, eps)
        clipped.append(c)
        ratios.append(r)
        units += n
    if not clipped:
        zero = torch.zeros(())
        return AGCStats(zero, 0, zero)
    return AGCStats(torch.stack(clipped).sum(), units, torch.stack(ratios).max())


def agc_pairs(named_params: Iterable[tuple[str, torch.nn.Parameter]], exclude: set[str]):
    """(param, param.grad) for every parameter not excluded by name (the classifier weight)."""
    return ((p, p.grad) for n, p in named_params if n not in exclude)
