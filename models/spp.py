"""Signal-propagation check: measured per-block variances next to the beta/alpha bookkeeping.

    python -m models.spp nfnet_f0 --width-mult 0.25 --res 64

For each block at initialisation on N(0, 1) inputs it prints the variance of the block input
(expected: the bookkeeping's expected_var), of the residual branch before alpha * skip_gain
(expected: 1, since beta = 1/expected_std whitens the input of a branch built from WS convs and
gamma-scaled activations), and of the skip path (expected: expected_var for an identity skip, 1 for a
transition's 1x1 WS conv on act(x)*beta).

The bookkeeping assumes a transition's shortcut (2x2 avg-pool then 1x1 WS conv) has unit variance.
That holds for spatially correlated inputs such as photographs; on white noise the 2x2 average of four
independent values has 1/4 of their variance, so strided transitions measure ~0.25 here.
`--no-downsample` (strides 1) checks the rest of the bookkeeping without that effect.

SkipInit sets every skip gain to 0, which makes each block an identity at initialisation and hides
the design the bookkeeping describes; by default the tool sets skip gains to 1 (--skip-gain) so the
residual branches add alpha^2 of variance per block as the NF-ResNet analysis assumes.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import torch

from . import create_model
from .nfnet import NFNet


@dataclass
class BlockSignal:
    index: int
    stage: int
    transition: bool
    expected_var: float  # bookkeeping: variance of the block input
    input_var: float
    branch_var: float  # residual branch output before alpha * skip_gain
    expected_skip_var: float
    skip_var: float


def _channel_var(x: torch.Tensor) -> float:
    """Average channel variance: variance over (batch, H, W) per channel, averaged over channels."""
    return x.var(dim=(0, 2, 3)).mean().item()


@torch.no_grad()
def measure(model: NFNet, batch: int = 16, resolution: int = 64, skip_gain: float = 1.0, seed: int = 0) -> list[BlockSignal]:
    """Run N(0,1) images through `model` in eval mode and record per-block variances."""
    torch.manual_seed(seed)
    model = model.eval()
    for block in model.blocks():
        block.skip_gain.fill_(skip_gain)
    x = model.stem(torch.randn(batch, 3, resolution, resolution))
    rows, index = [], 0
    for s, stage in enumerate(model.stages):
        for block in stage:
            out, branch, shortcut = block._forward(x)
            rows.append(
                BlockSignal(
                    index=index, stage=s, transition=block.is_transition,
                    expected_var=block.expected_var, input_var=_channel_var(x),
                    branch_var=_channel_var(branch),
                    expected_skip_var=1.0 if block.is_transition else block.expected_var,
                    skip_var=_channel_var(shortcut),
                )
            )  # fmt: skip
            x, index = out, index + 1
    return rows


def format_table(rows: list[BlockSignal]) -> str:
    lines = [f"{'block':>5} {'stage':>5} {'trans':>5} | {'E[var in]':>9} {'var in':>8} | {'var branch':>10} (exp 1) | {'E[var skip]':>11} {'var skip':>8}"]
    for r in rows:
        lines.append(
            f"{r.index:>5} {r.stage:>5} {'yes' if r.transition else '':>5} | {r.expected_var:>9.3f} {r.input_var:>8.3f} | "
            f"{r.branch_var:>10.3f}         | {r.expected_skip_var:>11.3f} {r.skip_var:>8.3f}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", help="model name, e.g. nfnet_f0 or nfnet_nano")
    ap.add_argument("--width-mult", type=float, default=1.0)
    ap.add_argument("--depth-mult", type=float, default=1.0)
    ap.add_argument("--res", type=int, default=64, help="input resolution")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--skip-gain", type=float, default=1.0, help="value for every skip gain (SkipInit would be 0)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-downsample", action="store_true",
                    help="strides 1 everywhere: isolates the bookkeeping from the avg-pool effect on white noise")
    args = ap.parse_args(argv)
    extra = {"strides": (1, 1, 1, 1)} if args.no_downsample else {}
    model = create_model(args.model, width_mult=args.width_mult, depth_mult=args.depth_mult, **extra)
    rows = measure(model, args.batch, args.res, args.skip_gain, args.seed)
    print(f"{args.model} width x{args.width_mult} depth x{args.depth_mult}, {args.res}px, batch {args.batch}, skip gains = {args.skip_gain}")
    print(format_table(rows))


if __name__ == "__main__":
    main()
