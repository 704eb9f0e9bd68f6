"""The NFNet optimizer: SGD with Nesterov momentum and coupled L2 weight decay, AGC before it.

torch.optim.SGD already implements DM's SGD_AGC order once AGC has edited `.grad`:
    g <- g + wd * theta            (coupled L2, never clipped because AGC ran first)
    m <- mu * m + g                (dampening 0; the first step sets m = g, same as m0 = 0)
    g <- g + mu * m                (Nesterov)
    theta <- theta - lr * g
so we use it rather than writing our own; tests check it against a float64 reference.
"""

from __future__ import annotations

import torch


def build_sgd(param_groups: list[dict], lr: float, momentum: float = 0.9, nesterov: bool = True) -> torch.optim.SGD:
    """param_groups: as returned by NFNet.param_groups(weight_decay) (extra keys such as `names` are kept)."""
    return torch.optim.SGD(param_groups, lr=lr, momentum=momentum, nesterov=nesterov, dampening=0.0)
