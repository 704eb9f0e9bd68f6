"""The NFNet family as a table of data (spec section 1).

`NFNetConfig` describes one architecture completely; every named model is a row that says how
it differs from the F0 row. The small family for CPU sweeps is the same architecture scaled with
`scale_config(cfg, width_mult, depth_mult)`, which keeps the block structure (groups per conv,
bottleneck ratio, SE ratio) by scaling the group width together with the stage widths.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

BASE_WIDTHS = (256, 512, 1536, 1536)
PLUS_WIDTHS = (384, 768, 2048, 2048)
F0_DEPTHS = (1, 2, 6, 3)


@dataclass(frozen=True)
class NFNetConfig:
    """Everything that defines an NFNet. Defaults are F0 with DeepMind's semantics."""

    depths: tuple[int, ...] = F0_DEPTHS
    widths: tuple[int, ...] = BASE_WIDTHS
    stem_widths: tuple[int, ...] = (16, 32, 64, 128)  # four 3x3 convs, strides 2, 1, 1, 2
    group_width: int = 128  # channels per group in the 3x3 convs
    bottleneck_ratio: float = 0.5  # of the block's output width, rounded down to group_width
    se_ratio: float = 0.5
    final_conv_mult: int = 2  # final 1x1 conv to final_conv_mult * widths[-1]
    alpha: float = 0.2
    stochdepth_rate: float = 0.25  # block i of N drops with rate * i / N
    drop_rate: float = 0.2  # dropout before the classifier
    activation: str = "gelu"
    gelu_approximate: str = "tanh"  # DM uses jax.nn.gelu (tanh); timm uses erf ("none")
    ws_eps: float = 1e-4
    ws_eps_mode: str = "floor"  # DM floors N*var at eps; timm adds eps to var ("add")
    same_padding: bool = False  # TF SAME padding, for weights trained with it
    strides: tuple[int, ...] = (1, 2, 2, 2)
    # Recipe values that belong to the variant (spec table 1a); the trainer reads them.
    train_res: int = 192
    test_res: int = 256
    randaug_layers: int = 4
    randaug_magnitude: int = 5

    @property
    def final_width(self) -> int:
        return self.final_conv_mult * self.widths[-1]

    @property
    def num_blocks(self) -> int:
        return sum(self.depths)

    def mid_width(self, out_width: int) -> int:
        """Bottleneck width: group_width * floor(int(ratio * out) / group_width), at least one group."""
        return max(self.group_width, self.group_width * (int(out_width * self.bottleneck_ratio) // self.group_width))

    def se_width(self, out_width: int) -> int:
        return max(1, int(out_width * self.se_ratio))


# F-number -> (dropout, train res, test res, RandAugment magnitude). Depths are (n+1) * [1,2,6,3].
_F_ROWS = {
    0: (0.2, 192, 256, 5),
    1: (0.3, 224, 320, 10),
    2: (0.4, 256, 352, 10),
    3: (0.4, 320, 416, 15),
    4: (0.5, 384, 512, 15),
    5: (0.5, 416, 544, 15),
    6: (0.5, 448, 576, 15),
    7: (0.5, 480, 608, 15),
}


def _f_variant(n: int, plus: bool) -> NFNetConfig:
    drop, train_res, test_res, ra_mag = _F_ROWS[n]
    widths = PLUS_WIDTHS if plus else BASE_WIDTHS
    return NFNetConfig(
        depths=tuple((n + 1) * d for d in F0_DEPTHS),
        widths=widths,
        stem_widths=(16, 32, 64, widths[0] // 2),  # last is 128 for base widths, 192 for "+"
        drop_rate=drop,
        train_res=train_res,
        test_res=test_res,
        randaug_magnitude=ra_mag,
    )


@dataclass(frozen=True)
class ScaledPreset:
    """A named member of the small family: a base variant scaled in width and depth."""

    base: str
    width_mult: float = 1.0
    depth_mult: float = 1.0
    overrides: dict = field(default_factory=dict)


def scale_config(cfg: NFNetConfig, width_mult: float = 1.0, depth_mult: float = 1.0) -> NFNetConfig:
    """Scale an architecture while preserving its block structure.

    Widths are counted in units of the group width, and the group width is what scales:
    group_width' = round(128 * m); widths' = (w / 128) * group_width'. So F1 at m=1/8 has
    group width 16, stage widths (32, 64, 192, 192), bottlenecks (16, 32, 96, 96) with
    groups (1, 2, 6, 6) exactly like F1. Depths scale as max(1, round(d * depth_mult)).
    """
    if width_mult <= 0 or depth_mult <= 0:
        raise ValueError(f"width_mult and depth_mult must be > 0, got {width_mult}, {depth_mult}")
    if width_mult == 1.0 and depth_mult == 1.0:
        return cfg
    gw = max(1, round(cfg.group_width * width_mult))
    widths = []
    for w in cfg.widths:
        if w % cfg.group_width:
            raise ValueError(f"width {w} is not a multiple of group width {cfg.group_width}")
        widths.append(w // cfg.group_width * gw)
    stem = tuple(max(4, round(w * width_mult)) for w in cfg.stem_widths)
    depths = tuple(max(1, round(d * depth_mult)) for d in cfg.depths)
    return dataclasses.replace(cfg, widths=tuple(widths), group_width=gw, stem_widths=stem, depths=depths)


VARIANTS: dict[str, NFNetConfig] = {}
for _n in range(8):
    VARIANTS[f"nfnet_f{_n}"] = _f_variant(_n, plus=False)
    VARIANTS[f"nfnet_f{_n}plus"] = _f_variant(_n, plus=True)

# The small family used by tests, the demo and CPU sweeps. Each keeps F-series block structure.
SMALL_PRESETS: dict[str, ScaledPreset] = {
    # ~0.1M params: unit tests and the fastest demo.
    "nfnet_pico": ScaledPreset("nfnet_f0", width_mult=1 / 16, depth_mult=0.5, overrides=dict(train_res=32, test_res=32)),
    # ~0.3M params: the demo default.
    "nfnet_nano": ScaledPreset("nfnet_f0", width_mult=1 / 16, overrides=dict(train_res=32, test_res=32)),
    # ~1.1M params, F0 structure at width 1/8.
    "nfnet_micro": ScaledPreset("nfnet_f0", width_mult=1 / 8, overrides=dict(train_res=48, test_res=64)),
    # ~2M params, F1 depth at width 1/8.
    "nfnet_tiny": ScaledPreset("nfnet_f1", width_mult=1 / 8, overrides=dict(train_res=48, test_res=64)),
}


def resolve_config(name: str, width_mult: float = 1.0, depth_mult: float = 1.0, **overrides) -> NFNetConfig:
    """Look up a named variant, apply the small-family scaling and field overrides."""
    if name in VARIANTS:
        cfg = VARIANTS[name]
    elif name in SMALL_PRESETS:
        p = SMALL_PRESETS[name]
        cfg = dataclasses.replace(scale_config(VARIANTS[p.base], p.width_mult, p.depth_mult), **p.overrides)
    else:
        raise ValueError(f"unknown model {name!r}; valid names: {', '.join(list_model_names())}")
    cfg = scale_config(cfg, width_mult, depth_mult)
    valid = {f.name for f in dataclasses.fields(NFNetConfig)}
    unknown = set(overrides) - valid
    if unknown:
        raise ValueError(f"unknown NFNet config fields {sorted(unknown)}; valid: {sorted(valid)}")
    # Tuple fields may arrive as lists (JSON configs, CLI overrides).
    overrides = {k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items()}
    return dataclasses.replace(cfg, **overrides)


def list_model_names() -> list[str]:
    return list(VARIANTS) + list(SMALL_PRESETS)
