"""Sharpness-Aware Minimisation (Foret et al. 2021) for the data-parallel trainer.

One SAM step at weights w, on the global batch (all micro-batches of all ranks):
    g   = mean gradient of the loss at w              (an extra forward/backward per micro-batch)
    e   = rho * g / ||g||_2                           (one global norm over every parameter)
    g'  = gradient at w + e                           (the trainer's normal DeepSpeed pass)
    w  <- optimizer step with g' applied at w         (the perturbation is undone before AGC and the step)
The ascent gradient is averaged over the whole global batch (all-reduced), not per device as in
DM's m-sharpness variant: the result then does not depend on the worker count.

It runs on the plain module, outside DeepSpeed's engine, with torch.autograd.grad (nothing is
accumulated into p.grad). That is exact at ZeRO-0, where every rank holds the full parameters and
the engine reduces gradients only at the boundary; config.validate() refuses SAM at ZeRO-1/2.
Cost: about 2x the forward/backward compute of a step.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch


@torch.no_grad()
def _perturb(params: list[torch.nn.Parameter], grads: list[torch.Tensor], rho: float) -> tuple[list[torch.Tensor], float]:
    norm = torch.sqrt(sum((g.double() ** 2).sum() for g in grads)).item()
    scale = rho / (norm + 1e-12)
    originals = [p.detach().clone() for p in params]
    for p, g in zip(params, grads):
        p.add_(g.to(p.dtype), alpha=scale)
    return originals, norm


def sam_ascend(module: torch.nn.Module, micro_batches: Sequence, loss_fn: Callable, rho: float) -> tuple[list[torch.Tensor], float]:
    """Move the module's parameters to w + e in place; returns (copies of w, ||g||).

    `loss_fn(module, a, batch)` gives micro-batch a's mean loss (it seeds dropout/stochastic depth
    the way the main pass does). Every rank must call this (one all-reduce per parameter)."""
    params = [p for p in module.parameters() if p.requires_grad]
    grads = [torch.zeros_like(p, dtype=torch.float32) for p in params]
    n = len(micro_batches)
    for a, batch in enumerate(micro_batches):
        loss = loss_fn(module, a, batch) / n
        for acc, g in zip(grads, torch.autograd.grad(loss, params, allow_unused=True)):
            if g is not None:
                acc.add_(g.float())
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        world = torch.distributed.get_world_size()
        flat = torch.cat([g.flatten() for g in grads])  # one collective for the whole model
        torch.distributed.all_reduce(flat)
        flat /= world
        grads = list(torch.split(flat, [g.numel() for g in grads]))
        grads = [g.view_as(p) for g, p in zip(grads, params)]
    return _perturb(params, grads, rho)


@torch.no_grad()
def sam_restore(module: torch.nn.Module, originals: list[torch.Tensor]) -> None:
    for p, w in zip((p for p in module.parameters() if p.requires_grad), originals):
        p.copy_(w)
