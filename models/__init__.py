"""NFNet F0-F7, the wider "+" variants, and a small family for CPU sweeps.

    >>> from models import create_model, list_models
    >>> m = create_model("nfnet_f1", width_mult=1/8, num_classes=10)

Pure torch modules: imports nothing else of ours, so a model can be used outside this project.
"""

from __future__ import annotations

import torch

from .nfnet import NFBlock, NFNet
from .variants import NFNetConfig, list_model_names, resolve_config

MAY_IMPORT: tuple[str, ...] = ()

__all__ = ["NFNet", "NFBlock", "NFNetConfig", "create_model", "list_models", "resolve_config"]


def create_model(
    name: str,
    num_classes: int = 1000,
    *,
    width_mult: float = 1.0,
    depth_mult: float = 1.0,
    device: torch.device | str | None = None,
    **overrides,
) -> NFNet:
    """Build a named NFNet. `overrides` are NFNetConfig fields (drop_rate, same_padding, ...).

    device="meta" builds without allocating memory (parameter counts, FLOP counting of F7).
    """
    cfg = resolve_config(name, width_mult=width_mult, depth_mult=depth_mult, **overrides)
    if device is None:
        return NFNet(cfg, num_classes=num_classes)
    with torch.device(device):
        return NFNet(cfg, num_classes=num_classes)


def list_models() -> list[str]:
    return list_model_names()
