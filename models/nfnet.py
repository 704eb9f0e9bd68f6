"""NFNet (Brock et al. 2021) with DeepMind's semantics: see ../shared/docs/nfnet-spec.md section 2.

Shapes for an input of (B, 3, R, R): stem -> (B, stem_widths[-1], R/4, R/4); stage s -> (B, widths[s],
R/4/prod(strides[:s+1]), ...) i.e. R/4, R/8, R/16, R/32; final conv -> (B, 2*widths[-1], R/32, R/32);
head -> (B, num_classes).
"""

from __future__ import annotations

import math
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from .layers import GammaAct, SqueezeExcite, WSConv2d, stochastic_depth
from .variants import NFNetConfig

# Parameter leaf names that get no weight decay (spec 5: gains, biases, skip gains).
_NO_DECAY_LEAVES = ("gain", "bias", "skip_gain")


class NFBlock(nn.Module):
    """Pre-activation NF bottleneck block with the extra grouped 3x3 conv (spec 2b).

    out = shortcut + alpha * skip_gain * stochdepth(2*sigmoid(SE) * branch(act(x) * beta))
    """

    def __init__(self, cfg: NFNetConfig, in_ch: int, out_ch: int, stride: int, beta: float, sd_rate: float, expected_var: float):
        super().__init__()
        conv = lambda i, o, k=1, s=1, g=1: WSConv2d(  # noqa: E731
            i, o, k, s, g, eps=cfg.ws_eps, eps_mode=cfg.ws_eps_mode, same_padding=cfg.same_padding
        )
        mid = cfg.mid_width(out_ch)
        groups = mid // cfg.group_width
        self.beta, self.alpha, self.sd_rate = beta, cfg.alpha, sd_rate
        self.expected_var = expected_var  # variance of the input by the beta/alpha bookkeeping
        self.act = GammaAct(cfg.activation, cfg.gelu_approximate)
        self.is_transition = stride > 1 or in_ch != out_ch
        # Transition: avg-pool 2x2 (SAME, padded cells not counted) + 1x1 WS conv on act(x)*beta.
        self.pool = nn.AvgPool2d(2, stride, ceil_mode=True, count_include_pad=False) if stride > 1 else None
        self.shortcut = conv(in_ch, out_ch) if self.is_transition else None
        self.conv1 = conv(in_ch, mid)
        self.conv2 = conv(mid, mid, 3, stride, groups)
        self.conv2b = conv(mid, mid, 3, 1, groups)  # NFNet's second 3x3
        self.conv3 = conv(mid, out_ch)
        self.se = SqueezeExcite(out_ch, cfg.se_width(out_ch))
        # SkipInit: the block starts as identity. One element of shape (1,), not a 0-dim tensor:
        # DeepSpeed's initial parameter broadcast views every parameter as bytes, which fails for 0-dim.
        self.skip_gain = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._forward(x)[0]

    def _forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns (output, residual branch before alpha*skip_gain, shortcut); the last two feed models.spp."""
        h = self.act(x) * self.beta
        shortcut = x
        if self.shortcut is not None:
            shortcut = self.shortcut(self.pool(h) if self.pool is not None else h)
        b = self.conv1(h)
        b = self.conv2(self.act(b))
        b = self.conv2b(self.act(b))
        b = self.conv3(self.act(b))
        b = self.se(b)
        b = stochastic_depth(b, self.sd_rate, self.training)
        return shortcut + b * (self.skip_gain * self.alpha), b, shortcut


class ClassifierHead(nn.Module):
    """Global mean pool -> dropout -> Linear. The Linear is named `fc`: AGC excludes `head.fc.weight`."""

    def __init__(self, in_features: int, num_classes: int, drop_rate: float, zero_init: bool = False):
        super().__init__()
        self.drop_rate = drop_rate
        self.fc = nn.Linear(in_features, num_classes) if num_classes > 0 else nn.Identity()
        if isinstance(self.fc, nn.Linear):
            # Pretraining: N(0, 0.01^2) as DM; fine-tuning: a zero head (scaling paper).
            if zero_init:
                nn.init.zeros_(self.fc.weight)
            else:
                nn.init.normal_(self.fc.weight, std=0.01)
            nn.init.zeros_(self.fc.bias)

    def forward(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:  # x: (B, C, h, w)
        x = x.mean(dim=(2, 3))
        if pre_logits:
            return x
        x = F.dropout(x, self.drop_rate, self.training)
        return self.fc(x)


class NFNet(nn.Module):
    classifier_name = "head.fc"

    def __init__(self, cfg: NFNetConfig, num_classes: int = 1000):
        super().__init__()
        self.cfg, self.num_classes = cfg, num_classes
        conv = lambda i, o, k=1, s=1, g=1: WSConv2d(  # noqa: E731
            i, o, k, s, g, eps=cfg.ws_eps, eps_mode=cfg.ws_eps_mode, same_padding=cfg.same_padding
        )
        act = lambda: GammaAct(cfg.activation, cfg.gelu_approximate)  # noqa: E731
        s = cfg.stem_widths
        # No activation after the last stem conv: blocks are pre-activation.
        self.stem = nn.Sequential(OrderedDict(
            conv1=conv(3, s[0], 3, 2), act1=act(),
            conv2=conv(s[0], s[1], 3, 1), act2=act(),
            conv3=conv(s[1], s[2], 3, 1), act3=act(),
            conv4=conv(s[2], s[3], 3, 2),
        ))  # fmt: skip

        # beta = 1/expected_std before each block; reset to 1 after a transition block,
        # then var += alpha^2 after every block (spec 2c).
        blocks_total, index, expected_std = cfg.num_blocks, 0, 1.0
        in_ch, stages = s[-1], []
        for depth, width, stride in zip(cfg.depths, cfg.widths, cfg.strides):
            blocks = []
            for j in range(depth):
                blocks.append(
                    NFBlock(
                        cfg, in_ch, width, stride if j == 0 else 1,
                        beta=1.0 / expected_std,
                        sd_rate=cfg.stochdepth_rate * index / blocks_total,
                        expected_var=expected_std**2,
                    )
                )  # fmt: skip
                in_ch, index = width, index + 1
                # DM resets at every stage's first block; for every variant (strides 2 or a width
                # change) that block is exactly the transition, whose 1x1-conv shortcut restarts at
                # unit variance. Keying on the transition keeps custom strides (models.spp) correct.
                if blocks[-1].is_transition:
                    expected_std = 1.0
                expected_std = math.sqrt(expected_std**2 + cfg.alpha**2)
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.final_conv = conv(in_ch, cfg.final_width)
        self.final_act = act()
        self.num_features = cfg.final_width
        self.head = ClassifierHead(cfg.final_width, num_classes, cfg.drop_rate)

    # ---- forward ---------------------------------------------------------------------------
    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, R, R) -> (B, final_width, R/32, R/32)."""
        x = self.stages(self.stem(x))
        return self.final_act(self.final_conv(x))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.head(x, pre_logits=pre_logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    # ---- the API the trainer and fine-tuning use ---------------------------------------------
    def reset_classifier(self, num_classes: int, zero_init: bool = True) -> None:
        """Replace the head for a new label set (fine-tuning starts from a zero head)."""
        ref = next(self.parameters())
        self.num_classes = num_classes
        self.head = ClassifierHead(self.num_features, num_classes, self.cfg.drop_rate, zero_init=zero_init)
        self.head.to(device=ref.device, dtype=ref.dtype)

    def blocks(self) -> list[NFBlock]:
        return [b for stage in self.stages for b in stage]

    def no_weight_decay_names(self) -> set[str]:
        """Gains, biases and skip gains: no weight decay (DM experiment_nfnets.py)."""
        return {n for n, _ in self.named_parameters() if n.rsplit(".", 1)[-1] in _NO_DECAY_LEAVES}

    def agc_exclude_names(self) -> set[str]:
        """AGC clips everything but the classifier weight, selected by name (spec 4)."""
        name = f"{self.classifier_name}.weight"
        return {name} if name in dict(self.named_parameters()) else set()

    def param_groups(self, weight_decay: float) -> list[dict]:
        """Two optimizer groups; each carries `names` so AGC and logging can address tensors."""
        no_wd = self.no_weight_decay_names()
        decay = [(n, p) for n, p in self.named_parameters() if p.requires_grad and n not in no_wd]
        other = [(n, p) for n, p in self.named_parameters() if p.requires_grad and n in no_wd]
        return [
            {"params": [p for _, p in decay], "names": [n for n, _ in decay], "weight_decay": weight_decay},
            {"params": [p for _, p in other], "names": [n for n, _ in other], "weight_decay": 0.0},
        ]
