"""Forward+backward throughput of our NFNet against timm's dm_nfnet, same configuration, one process.

    python bench/model_step.py [--model nfnet_f0] [--res 96] [--batch 8] [--iters 8]

Both models are the same architecture with the same numerics (erf GELU, WS eps added to var,
TF SAME padding: models.convert.TIMM_COMPAT), stochastic depth and dropout off. Runs alternate
ours/timm step by step so machine noise hits both alike; the ratio of medians is the figure.
Our default numerics (DM: tanh GELU, eps floor, symmetric padding) are reported as a second row.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models import create_model  # noqa: E402
from models.convert import TIMM_COMPAT  # noqa: E402


def step_time(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    t0 = time.perf_counter()
    loss = torch.nn.functional.cross_entropy(model(x), y)
    loss.backward()
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="nfnet_f0", help="nfnet_f0 .. nfnet_f6 (timm has dm_nfnet_f0..f6)")
    ap.add_argument("--res", type=int, default=96)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--iters", type=int, default=8)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = ap.parse_args()
    import timm

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    no_reg = dict(stochdepth_rate=0.0, drop_rate=0.0)
    contenders = {
        "timm dm_nfnet": timm.create_model(args.model.replace("nfnet_", "dm_nfnet_"), pretrained=False),
        "ours (timm numerics)": create_model(args.model, **TIMM_COMPAT, **no_reg),
        "ours (DM default)": create_model(args.model, **no_reg),
    }
    for m in contenders.values():
        m.train()
    x = torch.randn(args.batch, 3, args.res, args.res)
    y = torch.randint(0, 1000, (args.batch,))
    for m in contenders.values():  # warm-up: allocator, first-call overheads
        step_time(m, x, y)
    times: dict[str, list[float]] = {k: [] for k in contenders}
    for _ in range(args.iters):
        for name, m in contenders.items():
            times[name].append(step_time(m, x, y))

    med = {k: statistics.median(v) for k, v in times.items()}
    base = med["timm dm_nfnet"]
    print(f"{args.model} fwd+bwd, {args.res}px, batch {args.batch}, {args.threads} threads, {args.iters} alternating iters, CPU")
    for name, t in med.items():
        print(f"  {name:<22} {args.batch / t:8.2f} img/s   ratio vs timm {base / t:5.3f}")
    print(f"RATIO ours/timm (same numerics): {base / med['ours (timm numerics)']:.3f}  (goal >= 1.0)")


if __name__ == "__main__":
    main()
