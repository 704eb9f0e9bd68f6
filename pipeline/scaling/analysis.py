"""From a sweep's results table to fitted laws with bootstrap intervals and an extrapolation check.

    rows (one per run) --cells()--> best-lr cells --analyze()--> {"frontier", "fits", "optimal", ...}

Only rows with status "ok" and a finite loss enter a fit; diverged and failed runs are counted and
listed in the report. Four approaches: the frontier (one point per budget) with a saturating and a
pure power law, isoFLOP parabolas (laws.py) and the L(N, D) surface (surface.py); 95% bootstrap
intervals and the extrapolation check are in intervals.py. Where two approaches estimate the same
quantity and their intervals do not overlap, `disagreements` says so; `same_rate` says whether
compute-optimal model size and training epochs grow at the same rate.
"""

from __future__ import annotations

import math
from collections import defaultdict

import numpy as np

from .intervals import extrapolation, intervals_of, overlaps, residual_curves, values, within_budgets
from .laws import Cell, OptimalFit, PowerFit, Refusal, compute_optimal, finetune_envelope, fit_error_vs_compute, fit_power, frontier
from .surface import SurfaceFit, fit_cells
from .table import device_hour_totals


def _f(x) -> float:
    try:
        return float(x)
    except (TypeError, ValueError):
        return math.nan


def cells(rows: list[dict], metric: str = "heldout_loss") -> list[Cell]:
    """Best lr per (model, budget): the lr whose loss, averaged over its ok seeds, is lowest."""
    groups: dict[tuple, dict[float, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        usable = all(math.isfinite(_f(r.get(k))) and _f(r.get(k)) > 0 for k in (metric, "params", "flops_per_image", "train_flops", "samples_seen"))
        if r.get("status") == "ok" and usable:
            groups[(r["model"], r["budget"])][_f(r["lr_base"])].append(r)
    out = []
    for (model, budget), by_lr in groups.items():
        lr, runs = min(by_lr.items(), key=lambda kv: np.mean([_f(r[metric]) for r in kv[1]]))
        rep = min(runs, key=lambda r: _f(r.get("seed")) if math.isfinite(_f(r.get("seed"))) else 0.0)
        ft = [_f(r.get("finetune_top1")) for r in runs if math.isfinite(_f(r.get("finetune_top1")))]
        out.append(Cell(
            model=model, params=_f(rep["params"]), flops_per_image=_f(rep["flops_per_image"]), budget=budget,
            compute=float(np.mean([_f(r["train_flops"]) for r in runs])), samples=float(np.mean([_f(r["samples_seen"]) for r in runs])),
            epochs=float(np.mean([_f(r["epochs"]) for r in runs])), loss=float(np.mean([_f(r[metric]) for r in runs])),
            lr=lr, finetune_top1=float(np.mean(ft)) if ft else math.nan, lrs_tried=tuple(sorted(by_lr)), point=rep["point"],
            budget_flops=_f(rep.get("budget_value")) if rep.get("budget_kind") == "train_flops" else math.nan,
        ))  # fmt: skip
    return sorted(out, key=lambda c: (c.params, c.compute))


def _fit_all(cs: list[Cell], train_size: float) -> dict:
    fr = frontier(cs)
    c, l = [x.compute for x in fr], [x.loss for x in fr]
    return {
        "frontier": fr,
        "saturating": fit_power(c, l, saturating=True),
        "power": fit_power(c, l, saturating=False),
        "surface": fit_cells(cs),
        "optimal": compute_optimal(cs, train_size),
        "finetune": fit_error_vs_compute(cs),
    }


def bootstrap(cs: list[Cell], train_size: float, draws: int, seed: int = 0, main: dict | None = None) -> dict[str, dict]:
    """{fit name: {param: (lo, hi), "_ok": share of draws fitted}}; the schemes are in intervals.py:
    the surface and isoFLOP fits on within-budget resamples, the frontier curves on residuals."""
    rng = np.random.default_rng(seed)
    main = main or _fit_all(cs, train_size)
    refits: dict[str, list] = {"surface": [], "optimal": []}
    for _ in range(draws):
        pick = within_budgets(cs, rng)
        refits["surface"].append(fit_cells(pick))
        refits["optimal"].append(compute_optimal(pick, train_size))
    fr = main["frontier"]
    for name, sat in (("saturating", True), ("power", False)):
        if isinstance(main[name], PowerFit):
            refits[name] = residual_curves([c.compute for c in fr], [c.loss for c in fr], main[name], sat, rng, draws)
    if isinstance(main["finetune"], PowerFit):
        ft = finetune_envelope(cs)
        refits["finetune"] = residual_curves([c.compute for c in ft], [1 - c.finetune_top1 for c in ft], main["finetune"], False, rng, draws)
    return {name: intervals_of(fits, draws) for name, fits in refits.items() if not isinstance(main.get(name), Refusal)}


# The approaches side by side: which fit gives which quantity. The pure power law's b is the slope of
# L itself, not of L - E, so it is shown but never compared (it is smaller whenever E > 0).
APPROACHES = (("saturating", "frontier L = E + a C^-b"), ("power", "frontier L = a C^-b"),
              ("optimal", "isoFLOP parabolas (approach 2)"), ("surface", "L(N, D) surface (approach 3)"))  # fmt: skip
COMPARED = {"b": ("saturating", "surface"), "E": ("saturating", "surface"), "a_N": ("optimal", "surface"),
            "a_D": ("optimal", "surface")}  # fmt: skip


def disagreements(result: dict) -> list[str]:
    """Quantities two approaches estimate whose 95% intervals do not overlap."""
    iv = result.get("intervals", {})
    out = []
    for k, (x, y) in COMPARED.items():
        a, b = iv.get(x, {}).get(k), iv.get(y, {}).get(k)
        if a and b and not overlaps(a, b):
            vx, vy = values(result.get(x)).get(k), values(result.get(y)).get(k)
            out.append(f"{k}: {x} {vx:.4g} [{a[0]:.4g}, {a[1]:.4g}] vs {y} {vy:.4g} [{b[0]:.4g}, {b[1]:.4g}]")
    return out


SAME_RATE = ("optimal", "surface")  # the approaches that give N*(C) and D*(C)


def same_rate(fit, iv: dict) -> dict:
    """Do compute-optimal model size and training epochs grow at the same rate with compute ("ConvNets
    Match Vision Transformers at Scale", Smith et al. 2023)? N* ~ C^a_N and, on a fixed corpus,
    epochs* = D* / (images per epoch) ~ C^a_D. The verdict rests on the 95% bootstrap interval of
    a_N - a_D (`iv`: the fit's intervals; each draw's own difference, so the interval is paired):
    consistent with the same rate when it holds 0 (the line gives its width), else the larger
    exponent grows faster. No verdict from an interval with an unbounded end (a bound of the fit, or
    draws that could not be fitted), nor without bootstrap draws."""
    if not isinstance(fit, (OptimalFit, SurfaceFit)):
        why = f"{fit.what} was not fitted: {fit.reason}" if isinstance(fit, Refusal) else "not fitted"
        return {"refused": why}
    v = values(fit)
    if not all(math.isfinite(v[k]) for k in ("a_N", "a_D")):
        return {"refused": "the exponents are undetermined (a term of the surface ended on a bound)"}
    lo, hi = iv.get("a_N-a_D", (math.nan, math.nan))
    out = {"a_N": v["a_N"], "epochs_exponent": v["a_D"], "difference": v["a_N-a_D"], "interval": (lo, hi)}
    if (math.isnan(lo) or math.isnan(hi)) and iv.get("_ok", 1.0) > 0:
        out.update(verdict="no verdict", line="no verdict: no bootstrap interval (--bootstrap 0)")
    elif not (math.isfinite(lo) and math.isfinite(hi)):  # unbounded, or no draw could be fitted
        out.update(verdict="no verdict", line="no verdict: the interval of a_N - a_D is unbounded")
    elif lo <= 0 <= hi:
        # an interval holding 0 fails to tell the rates apart; its width says how much that means
        out.update(verdict="same rate", line=f"consistent with the same rate (a_N - a_D within [{lo:.3g}, {hi:.3g}])")
    elif hi < 0:
        out.update(verdict="epochs faster", line="epochs grow faster than model size")
    else:
        out.update(verdict="model size faster", line="model size grows faster than epochs")
    return out


def analyze(rows: list[dict], *, train_size: float, metric: str = "heldout_loss", draws: int = 500, seed: int = 0) -> dict:
    cs = cells(rows, metric)
    status = defaultdict(int)
    for r in rows:
        status[r.get("status", "?")] += 1
    used = {c.point for c in cs} | {r["point"] for r in rows if r.get("status") == "ok" and (r["model"], r["budget"]) in {(c.model, c.budget) for c in cs}}
    excluded = [r if r.get("status") != "ok" else {**r, "status": "ok, not usable", "error": "missing or non-positive loss/params/FLOPs"}
                for r in rows if r["point"] not in used]  # fmt: skip
    result = {"cells": cs, "status": dict(status), "metric": metric, "train_size": train_size, "excluded": excluded,
              "device_hours": device_hour_totals(rows)}  # fmt: skip
    if len(cs) < 3:
        result["refusal"] = Refusal("all fits", f"{len(cs)} usable (model, budget) cells; at least 3 are needed")
        return result
    result.update(_fit_all(cs, train_size))
    result["intervals"] = bootstrap(cs, train_size, draws, seed, main=result) if draws else {}
    result["disagreements"] = disagreements(result)
    result["same_rate"] = {name: same_rate(result[name], result["intervals"].get(name, {})) for name in SAME_RATE}
    result["extrapolation"] = extrapolation(cs, draws, seed + 1)
    result["lr_at_edge"] = [f"{c.model} @ {c.budget} (lr {c.lr:g} of {list(c.lrs_tried)})" for c in cs if c.lr_at_edge]
    return result
