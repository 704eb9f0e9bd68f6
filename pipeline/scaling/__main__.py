"""python -m pipeline.scaling fit RESULTS [--out DIR] [--metric sweep|raw|ema] [--bootstrap N]

RESULTS is a sweep's results table (results.csv or .parquet, local or s3://). Writes report.md,
PNG plots, fit.json and TensorBoard events into DIR (default: `report/` beside the table) and
prints the headline numbers, or why a fit was refused.
"""

from __future__ import annotations

import argparse
import sys

from .fit import fit_table
from .laws import OptimalFit, PowerFit


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pipeline.scaling", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("fit", help="fit scaling laws to a results table and write the report")
    f.add_argument("results")
    f.add_argument("--out", default=None)
    f.add_argument("--metric", default="sweep", choices=["sweep", "raw", "ema"],
                   help="held-out loss column: the sweep's choice (heldout_loss), raw or EMA weights")  # fmt: skip
    f.add_argument("--bootstrap", type=int, default=500, help="bootstrap draws for the intervals (0: none)")
    f.add_argument("--s3-endpoint", default=None)
    args = ap.parse_args(argv)
    try:
        result, report = fit_table(args.results, args.out, metric=args.metric, draws=args.bootstrap, endpoint=args.s3_endpoint)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(summarize(result))
    print(f"report: {report}")
    return 0


def summarize(result: dict) -> str:
    if "refusal" in result:
        return f"no fit: {result['refusal'].reason}"
    iv = result.get("intervals", {})
    out = []
    for name in ("saturating", "power"):
        fit = result[name]
        if isinstance(fit, PowerFit):
            lo, hi = iv.get(name, {}).get("b", (float("nan"),) * 2)
            out.append(f"{name}: L(C) = {fit.E:.4g} + {fit.a:.4g} C^-{fit.b:.4f} (b 95% CI [{lo:.4f}, {hi:.4f}])")
        else:
            out.append(f"{name}: not fitted: {fit.reason}")
    opt = result["optimal"]
    if isinstance(opt, OptimalFit):
        out.append(f"compute-optimal: N* ~ C^{opt.a_n:.3f}, D* ~ C^{opt.a_d:.3f}")
    else:
        out.append(f"compute-optimal: not fitted: {opt.reason}")
    ex = result.get("extrapolation")
    if isinstance(ex, dict):
        for name in ("saturating", "power"):
            if "relative_error" in ex[name]:
                out.append(f"extrapolation to budget {ex['held_out_budget']} ({name}): {ex[name]['relative_error']:+.1%}")
    return "\n".join(out)


if __name__ == "__main__":
    sys.exit(main())
