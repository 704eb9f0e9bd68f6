"""AGC at ZeRO-1/2 on each rank's own gradient partition: one all-reduce of unit norms, not of gradients.

At the accumulation boundary ZeRO-1/2 hold the globally averaged gradient partitioned: rank r owns
the flat range [r*P, (r+1)*P) of each parameter group's flattened gradient (P = partition size), and
a parameter's flattened elements may lie on two or more ranks. DeepSpeed's public route to a full
gradient (safe_get_full_grad) all-reduces a zero-padded full-size tensor per parameter: for F7,
1,661 all-reduces moving ~1.5 GB of fp32 per step on every rank, as much as the gradient reduction
itself, plus the full gradient cloned in device memory. AGC only needs two numbers per unit.

Per parameter W of shape (O, ...) (a unit is a row of dim 0 with K = W.numel() / O elements;
vectors and scalars are one unit of K = numel), this rank owns a fragment: elements [s, s + n) of
W.flatten(), as a flat gradient view and a flat fp32 master view (DeepSpeed's `_hp_mapping`). The
fragment covers units s // K .. (s + n - 1) // K; the first and last may be partial:

    fragment   |--head--|--------- m full units (m, K) ---------|--tail--|
    unit       u0        u0+1                                    u0+m+1

We add the fragment's per-unit sums of squares into slots [offset + u0, ...) of two vectors of U
floats (U = units of all clipped parameters; F7: ~0.5M), all-reduce them once as one (2U,) tensor
(the only communication: 2U x 4 bytes, ~4 MB for F7), take the same scale per unit as
agc.clip_unitwise_ on every rank, and multiply the fragment by its units' scales in place.

DeepSpeed has no public API for the local gradient fragment at ZeRO-1/2 (its safe_get_local_grad is
ZeRO-3 only), so we read `param._hp_mapping` (lp_fragment_address, get_lp_grad_fragment,
get_hp_fragment) and `param._index_in_param_group`, the attributes that DeepSpeed 0.19's own
get_full_hp_grad / set_full_hp_grad use. tests/test_agc_zero.py checks this against full-gradient
AGC at ZeRO-1 and 2 with 2 and 3 ranks, where partition boundaries split units.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .agc import _GRAD_FLOOR, AGCStats


@dataclass
class Fragment:
    """The part of one parameter that this rank owns, as flat views into DeepSpeed's partitions."""

    name: str
    grad: torch.Tensor  # (n,) view of the averaged gradient partition: scaled in place
    weight: torch.Tensor  # (n,) view of the fp32 master partition
    start: int  # s: index of the fragment's first element in param.flatten()
    unit: int  # K: elements per unit
    offset: int  # index of the parameter's first unit in the (U,) unit vectors


def unit_layout(named_params, exclude: set[str]) -> tuple[list[tuple[str, torch.nn.Parameter, int, int]], int]:
    """[(name, param, K, offset)] for every clipped parameter in module order, and U (total units).
    The same on every rank: it depends only on the architecture."""
    layout, offset = [], 0
    for name, p in named_params:
        if name in exclude or not p.requires_grad:
            continue
        units = p.shape[0] if p.ndim > 1 else 1
        layout.append((name, p, p.numel() // units, offset))
        offset += units
    return layout, offset


def local_fragments(layout) -> list[Fragment]:
    out = []
    for name, p, k, offset in layout:
        m = getattr(p, "_hp_mapping", None)
        if m is None:  # no element of this parameter lies in this rank's partition
            continue
        g = m.get_lp_grad_fragment(p._index_in_param_group)
        addr = m.lp_fragment_address
        if g.numel() != addr.numel:  # DeepSpeed's bf16 optimizer keeps full-size buffers: never used here
            raise RuntimeError(f"AGC: gradient of {name} has {g.numel()} elements, its partition fragment {addr.numel}")
        out.append(Fragment(name, g.view(-1), m.get_hp_fragment().view(-1), addr.start, k, offset))
    return out


def _segments(n: int, start: int, k: int) -> tuple[int, int, int, int]:
    """Split a fragment of n elements starting at flat index `start` into (u0, head, m, tail):
    first unit u0, head elements in u0, m full units after it, tail elements in the last partial unit."""
    u0 = start // k
    head = min(n, (u0 + 1) * k - start)
    m = (n - head) // k
    return u0, head, m, n - head - m * k


def unit_sums_of_squares(x: torch.Tensor, start: int, k: int) -> tuple[int, torch.Tensor]:
    """(u0, per-unit sums of x**2 over the units the fragment touches), fp32."""
    u0, head, m, tail = _segments(x.numel(), start, k)
    x = x.float()
    parts = [x[:head].square().sum().reshape(1)]
    if m:
        parts.append(x[head : head + m * k].view(m, k).square().sum(1))
    if tail:
        parts.append(x[head + m * k :].square().sum().reshape(1))
    return u0, torch.cat(parts)


def scale_units_(x: torch.Tensor, start: int, k: int, scale: torch.Tensor) -> None:
    """x[unit j] *= scale[j - u0] for the units the fragment touches, in place."""
    u0, head, m, tail = _segments(x.numel(), start, k)
    s = scale.to(x.dtype)
    x[:head].mul_(s[0])
    if m:
        x[head : head + m * k].view(m, k).mul_(s[1 : 1 + m, None])
    if tail:
        x[head + m * k :].mul_(s[1 + m])


@torch.no_grad()
def partitioned_agc_(layout, total_units: int, clip: float, eps: float, device: torch.device, group=None) -> AGCStats:
    """AGC on this rank's partition of the averaged gradient; collective (every rank calls it)."""
    frags = local_fragments(layout)
    # sq[0] = sums of squares of gradient units, sq[1] = of weight units; slots of other ranks stay 0
    sq = torch.zeros(2, total_units, dtype=torch.float32, device=device)
    for f in frags:
        u0, g = unit_sums_of_squares(f.grad, f.start, f.unit)
        _, w = unit_sums_of_squares(f.weight, f.start, f.unit)
        sq[0, f.offset + u0 : f.offset + u0 + g.numel()] += g
        sq[1, f.offset + u0 : f.offset + u0 + w.numel()] += w
    torch.distributed.all_reduce(sq, group=group)  # the only communication: 2U floats
    g_norm, w_norm = sq.sqrt_()
    max_norm = w_norm.clamp_(min=eps).mul_(clip)  # clip * ||W_i||*, as agc.clip_unitwise_
    ratio = g_norm / max_norm
    scale = (max_norm / g_norm.clamp(min=_GRAD_FLOOR)).clamp_(max=1.0)
    for f in frags:
        u0, _, m, tail = _segments(f.grad.numel(), f.start, f.unit)
        touched = 1 + m + (1 if tail else 0)
        scale_units_(f.grad, f.start, f.unit, scale[f.offset + u0 : f.offset + u0 + touched])
    return AGCStats((ratio > 1).sum(), total_units, ratio.max() * clip)
