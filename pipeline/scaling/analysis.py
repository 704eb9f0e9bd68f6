"""From a sweep's results table to fitted laws with bootstrap intervals and an extrapolation check.

    rows (one per run) --cells()--> best-lr cells --analyze()--> {"frontier", "fits", "optimal", ...}

Only rows with status "ok" and a finite loss enter a fit; diverged and failed runs are counted and
listed in the report. Intervals: a nonparametric bootstrap over cells (resample the (model, budget)
cells with replacement, refit everything, 2.5/97.5 percentiles of each parameter over the draws
that could be fitted; the share of such draws is reported with the interval).
"""

from __future__ import annotations

import math
from collections import defaultdict

import numpy as np

from .laws import Cell, OptimalFit, PowerFit, Refusal, compute_optimal, fit_error_vs_compute, fit_power, frontier


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


def _fit_all(cs: list[Cell], train_size: float, warm: dict | None = None) -> dict:
    fr = frontier(cs)
    sat_warm = (warm or {}).get("saturating")
    return {
        "frontier": fr,
        "saturating": fit_power([c.compute for c in fr], [c.loss for c in fr], saturating=True,
                                warm=sat_warm if isinstance(sat_warm, PowerFit) else None),
        "power": fit_power([c.compute for c in fr], [c.loss for c in fr], saturating=False),
        "optimal": compute_optimal(cs, train_size),
        "finetune": fit_error_vs_compute(cs),
    }


def _params(fit) -> dict[str, float]:
    """The scalars of a fit that get intervals."""
    if isinstance(fit, PowerFit):
        return {"E": fit.E, "a": fit.a, "b": fit.b}
    if isinstance(fit, OptimalFit):
        return {"a_N": fit.a_n, "a_D": fit.a_d, "k_N": fit.k_n, "k_D": fit.k_d}
    return {}


def bootstrap(cs: list[Cell], train_size: float, draws: int, seed: int = 0, warm: dict | None = None) -> dict[str, dict]:
    """{fit name: {param: (lo, hi), "_ok": share of draws fitted}}."""
    rng = np.random.default_rng(seed)
    samples: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    ok: dict[str, int] = defaultdict(int)
    for _ in range(draws):
        pick = [cs[i] for i in rng.integers(0, len(cs), len(cs))]
        for name, fit in _fit_all(pick, train_size, warm).items():
            if name == "frontier" or isinstance(fit, Refusal):
                continue
            ok[name] += 1
            for k, v in _params(fit).items():
                samples[name][k].append(v)
    out = {}
    for name, params in samples.items():
        out[name] = {k: (float(np.percentile(v, 2.5)), float(np.percentile(v, 97.5))) for k, v in params.items()}
        out[name]["_ok"] = ok[name] / draws
    return out


def extrapolation(cs: list[Cell], rows: list[dict], train_size: float) -> dict | Refusal:
    """Fit without the largest budget, predict the best loss the largest budget reached."""
    what = "extrapolation check"
    by_budget: dict[str, list[Cell]] = defaultdict(list)
    for c in cs:
        by_budget[c.budget].append(c)
    if len(by_budget) < 2:
        return Refusal(what, "one budget only")
    largest = max(by_budget, key=lambda b: np.mean([c.compute for c in by_budget[b]]))
    held = min(by_budget[largest], key=lambda c: c.loss)
    rest = [c for c in cs if c.budget != largest and c.compute < held.compute]  # a true extrapolation in C
    out = {"held_out_budget": largest, "compute": held.compute, "actual_loss": held.loss, "model": held.model}
    fr = frontier(rest)
    for name, sat in (("saturating", True), ("power", False)):
        fit = fit_power([c.compute for c in fr], [c.loss for c in fr], saturating=sat)
        if isinstance(fit, Refusal):
            out[name] = {"refused": fit.reason}
        else:
            pred = float(fit(held.compute))
            out[name] = {"predicted_loss": pred, "relative_error": (pred - held.loss) / held.loss}
    return out


def analyze(rows: list[dict], *, train_size: float, metric: str = "heldout_loss", draws: int = 500, seed: int = 0) -> dict:
    cs = cells(rows, metric)
    status = defaultdict(int)
    for r in rows:
        status[r.get("status", "?")] += 1
    used = {c.point for c in cs} | {r["point"] for r in rows if r.get("status") == "ok" and (r["model"], r["budget"]) in {(c.model, c.budget) for c in cs}}
    excluded = [r if r.get("status") != "ok" else {**r, "status": "ok, not usable", "error": "missing or non-positive loss/params/FLOPs"}
                for r in rows if r["point"] not in used]  # fmt: skip
    result = {"cells": cs, "status": dict(status), "metric": metric, "train_size": train_size, "excluded": excluded}
    if len(cs) < 3:
        result["refusal"] = Refusal("all fits", f"{len(cs)} usable (model, budget) cells; at least 3 are needed")
        return result
    result.update(_fit_all(cs, train_size))
    result["intervals"] = bootstrap(cs, train_size, draws, seed, warm=result) if draws else {}
    result["extrapolation"] = extrapolation(cs, rows, train_size)
    result["lr_at_edge"] = [f"{c.model} @ {c.budget} (lr {c.lr:g} of {list(c.lrs_tried)})" for c in cs if c.lr_at_edge]
    return result
