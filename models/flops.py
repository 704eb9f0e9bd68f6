"""Compute accounting with torch.utils.flop_counter.

FlopCounterMode counts conv/linear/matmul at 2 FLOPs per MAC and ignores elementwise ops and
pooling, which is the convention of the published NFNet "FLOPs" (those are MACs: spec 1a, 7).
Models are built on the meta device, so F7 at 608 px costs no memory.
"""

from __future__ import annotations

import functools
import math

import torch
from torch.utils.flop_counter import FlopCounterMode

from .variants import NFNetConfig


def _conv_backward_flops(grad_out_shape, x_shape, w_shape, bias, stride, padding, dilation, transposed,
                         output_padding, groups, output_mask, out_shape=None) -> int:  # fmt: skip
    """Backward of a (grouped) convolution: one forward's worth of FLOPs per gradient computed.

    torch's built-in formula counts the weight gradient of a grouped conv `groups` times over
    (measured on torch 2.14: backward/forward = 7.0 for groups=6 instead of 2.0), which would
    inflate NFNet training FLOPs by ~1.5x. Forward FLOPs = 2 * |grad_out| * (C_in/groups * kh * kw).
    """
    fwd = 2 * math.prod(grad_out_shape) * math.prod(w_shape[1:])
    return fwd * (int(bool(output_mask[0])) + int(bool(output_mask[1])))


_CUSTOM = {torch.ops.aten.convolution_backward: _conv_backward_flops}


def _meta_model(cfg: NFNetConfig, num_classes: int):
    from .nfnet import NFNet

    with torch.device("meta"):
        return NFNet(cfg, num_classes=num_classes)


@functools.lru_cache(maxsize=64)
def forward_flops(cfg: NFNetConfig, resolution: int, num_classes: int = 1000) -> int:
    """Forward FLOPs (2 per MAC) for one image at `resolution`."""
    model = _meta_model(cfg, num_classes).eval()
    x = torch.empty(1, 3, resolution, resolution, device="meta")
    with FlopCounterMode(display=False) as counter:
        model(x)
    return int(counter.get_total_flops())


def forward_macs(cfg: NFNetConfig, resolution: int, num_classes: int = 1000) -> int:
    return forward_flops(cfg, resolution, num_classes) // 2


@functools.lru_cache(maxsize=64)
def train_flops_per_image(cfg: NFNetConfig, resolution: int, num_classes: int = 1000) -> int:
    """Forward + backward FLOPs for one training image, measured (not the 3x rule of thumb).

    The backward of the first conv computes no input gradient, so this is slightly under 3x forward.
    """
    model = _meta_model(cfg, num_classes).train()
    batch = 2  # per-example stochastic depth needs a batch; FLOPs are linear in it
    x = torch.empty(batch, 3, resolution, resolution, device="meta")
    with FlopCounterMode(display=False, custom_mapping=_CUSTOM) as counter:
        model(x).sum().backward()
    return int(counter.get_total_flops()) // batch
