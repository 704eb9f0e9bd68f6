"""python -m pipeline.scaling fit RESULTS [--out DIR] [--metric sweep|raw|ema] [--bootstrap N]

RESULTS is a sweep's results table (results.csv or .parquet, local or s3://). Writes report.md,
PNG plots, fit.json and TensorBoard events into DIR (default: `report/` beside the table) and
prints the headline numbers, the approaches side by side and the extrapolation verdicts. Exits 3
(after writing the report) when a fit was refused, saying which and why; 2 when the table is unusable.
"""

from __future__ import annotations

import argparse
import math
import sys

from .fit import fit_table
from .laws import OptimalFit, PowerFit, Refusal
from .report import approach_rows
from .surface import SurfaceFit


REFUSED = 3  # exit status when a fit was refused: the report is written, the numbers are missing


def refusals(result: dict) -> list[str]:
    """The fits that were refused, with why (fine-tuning is optional: its absence is not a refusal)."""
    if "refusal" in result:
        return [f"all fits: {result['refusal'].reason}"]
    return [f"{r.what}: {r.reason}" for k in ("saturating", "power", "surface", "optimal") if isinstance(r := result.get(k), Refusal)]


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
    refused = refusals(result)
    for r in refused:
        print(f"refused: {r}", file=sys.stderr)
    return REFUSED if refused else 0


def _interval(iv: dict, fit: str, k: str) -> str:
    lo, hi = iv.get(fit, {}).get(k, (math.nan, math.nan))
    end = lambda x: f"{x:.4f}" if math.isfinite(x) else ("unbounded" if math.isinf(x) else "n/a")  # noqa: E731
    return f"[{end(lo)}, {end(hi)}]"


def _cost(result: dict) -> str:
    dh = result.get("device_hours") or {}
    if not math.isfinite(dh.get("total", math.nan)):
        return "device-hours: not recorded in this table"
    return (f"device-hours: pretraining {dh['pretraining']:.4g}, fine-tuning {dh['finetuning']:.4g}, failed attempts "
            f"{dh['failed']:.4g}; total {dh['total']:.4g}")  # fmt: skip


def _same_rate(result: dict) -> list[str]:
    out = []
    for name, v in result.get("same_rate", {}).items():
        label = {"optimal": "isoFLOP", "surface": "surface"}[name]
        if "refused" in v:
            out.append(f"same rate? ({label}): refused: {v['refused']}")
            continue
        out.append(f"same rate? ({label}): N* ~ C^{v['a_N']:.3f}, epochs* ~ C^{v['epochs_exponent']:.3f}, a_N - a_D = "
                   f"{v['difference']:+.3f} {_interval(result.get('intervals', {}), name, 'a_N-a_D')}: {v['line']}")  # fmt: skip
    return out


def summarize(result: dict) -> str:
    if "refusal" in result:
        return f"no fit: {result['refusal'].reason}\n{_cost(result)}"
    iv = result.get("intervals", {})
    out = []
    for name in ("saturating", "power"):
        fit = result[name]
        if isinstance(fit, PowerFit):
            out.append(f"{name}: L(C) = {fit.E:.4g} + {fit.a:.4g} C^-{fit.b:.4f} (b 95% CI {_interval(iv, name, 'b')})")
        else:
            out.append(f"{name}: not fitted: {fit.reason}")
    sf = result.get("surface")
    if isinstance(sf, SurfaceFit):
        out.append(f"surface: L(N, D) = {sf.E:.4g} + {sf.A:.4g} N^-{sf.alpha:.4f} + {sf.B:.4g} D^-{sf.beta:.4f}; frontier b = {sf.b:.4f} "
                   f"{_interval(iv, 'surface', 'b')}, N* ~ C^{sf.a_n:.3f} {_interval(iv, 'surface', 'a_N')}")  # fmt: skip
    elif isinstance(sf, Refusal):
        out.append(f"surface: not fitted: {sf.reason}")
    opt = result["optimal"]
    if isinstance(opt, OptimalFit):
        out.append(f"compute-optimal: N* ~ C^{opt.a_n:.3f} {_interval(iv, 'optimal', 'a_N')}, D* ~ C^{opt.a_d:.3f} {_interval(iv, 'optimal', 'a_D')}")
    else:
        out.append(f"compute-optimal: not fitted: {opt.reason}")
    out += _same_rate(result)
    out.append("side by side: " + " | ".join(f"{title}: " + (", ".join(f"{k} {v}" for k, v in q.items()) or "-")
                                             for title, q in approach_rows(result)))  # fmt: skip
    flags = result.get("disagreements", [])
    out.append("DISAGREE beyond intervals: " + "; ".join(flags) if flags else "approaches agree within their intervals")
    ex = result.get("extrapolation")
    if isinstance(ex, dict):
        for name in ("saturating", "power", "surface"):
            e = ex[name]
            if "relative_error" in e:
                out.append(f"extrapolation to budget {ex['held_out_budget']} ({name}): {e['relative_error']:+.1%}, {e['verdict']}")
    out.append(_cost(result))
    return "\n".join(out)


if __name__ == "__main__":
    sys.exit(main())
