"""Bootstrap intervals that respect the sweep's design, and the extrapolation check.

Every draw is refitted with the same multi-start as the main fit. Two resampling schemes:
  * within budget: each budget's cells are drawn with replacement from that budget's cells, so
    every draw keeps all budgets and (mostly) the models an isoFLOP parabola needs. Used for the
    isoFLOP fit (approach 2) and the loss surface (approach 3). Resampling all cells together could
    leave a budget with two models and no parabola.
  * residuals: the frontier has one point per budget. Resampling those points drops budgets, and
    the best cell of a resampled budget can only be worse than the best of the sample (a minimum is
    biased under case resampling). So the frontier fits and the fine-tuned envelope are refitted to
    fitted log L plus residuals drawn with replacement, scaled by sqrt(n / (n - p)) because a fit of
    p parameters to n points leaves residuals ~sqrt((n - p) / n) of the noise.
An interval is the 2.5 and 97.5 percentile of a parameter over *all* draws: a draw that ended on a
bound counts as -inf or +inf on that side, and a draw that could not be fitted counts as -inf for
the lower end and +inf for the upper (it could lie anywhere). So an interval that reaches a bound,
or rests on more than 2.5% failed draws, is reported as unbounded (an infinite end).
"""

from __future__ import annotations

import math
from collections import defaultdict

import numpy as np

from .laws import Cell, OptimalFit, PowerFit, Refusal, fit_power, frontier
from .surface import SurfaceFit, fit_cells

LEVEL = 0.95


def within_budgets(cs: list[Cell], rng: np.random.Generator) -> list[Cell]:
    """One bootstrap sample: each budget's cells resampled with replacement, budgets kept."""
    by: dict[str, list[Cell]] = defaultdict(list)
    for c in cs:
        by[c.budget].append(c)
    return [g[i] for g in by.values() for i in rng.integers(0, len(g), len(g))]


def scaled_residuals(y: np.ndarray, y_fit: np.ndarray, n_params: int) -> np.ndarray:
    n = len(y)
    return (y - y_fit) * math.sqrt(n / (n - n_params)) if n > n_params else y - y_fit


def residual_curves(compute, loss, fit: PowerFit, saturating: bool, rng: np.random.Generator, draws: int) -> list:
    """Refits of a frontier curve to fitted log L + resampled residuals (fits or Refusals)."""
    c, y = np.asarray(compute, float), np.log(np.asarray(loss, float))
    y_fit = np.log(fit(c))
    res = scaled_residuals(y, y_fit, 3 if saturating else 2)
    return [fit_power(c, np.exp(y_fit + rng.choice(res, len(c))), saturating=saturating) for _ in range(draws)]


def values(fit) -> dict[str, float]:
    """The scalars of a fit that get intervals: -inf / +inf where the fit ended on that side's bound,
    nan where the value is undetermined (an exponent of a term the fit dropped). a_N-a_D is taken
    within each fit, so its interval comes from the same draws as a_N's and a_D's (paired)."""
    if isinstance(fit, PowerFit):
        out = {"E": fit.E, "a": fit.a, "b": fit.b}
        for flag in fit.at_bound:  # "E-", "b+", ...
            out[flag[:-1]] = -math.inf if flag[-1] == "-" else math.inf
        return out
    if isinstance(fit, OptimalFit):
        return {"a_N": fit.a_n, "a_D": fit.a_d, "a_N-a_D": fit.a_n - fit.a_d, "k_N": fit.k_n, "k_D": fit.k_d}
    if isinstance(fit, SurfaceFit):
        return _surface_values(fit)
    return {}


def _surface_values(fit: SurfaceFit) -> dict[str, float]:
    out = {"E": fit.E, "A": fit.A, "B": fit.B, "alpha": fit.alpha, "beta": fit.beta, "b": fit.b, "a_N": fit.a_n, "a_D": fit.a_d,
           "a_N-a_D": fit.a_n - fit.a_d}  # fmt: skip
    flags = set(fit.at_bound)
    side = {"-": -math.inf, "+": math.inf}
    for flag in flags:
        name = {"e": "E", "alpha": "alpha", "beta": "beta"}.get(flag[:-1])
        if name:
            out[name] = side[flag[-1]]
    # A term at its lower bound has vanished: its exponent means nothing. Any exponent at a bound or
    # undetermined leaves the derived exponents undetermined.
    if "a-" in flags:
        out["alpha"] = math.nan
    if "b-" in flags:
        out["beta"] = math.nan
    if not (math.isfinite(out["alpha"]) and math.isfinite(out["beta"])):
        out.update({"b": math.nan, "a_N": math.nan, "a_D": math.nan, "a_N-a_D": math.nan})
    return out


def interval(samples, draws: int, level: float = LEVEL) -> tuple[float, float]:
    """Percentile interval over `draws`; nan samples and missing draws count as unknown (see module doc)."""
    if draws == 0:
        return -math.inf, math.inf
    v = np.full(draws, np.nan)
    v[: len(samples)] = samples
    tail = 100 * (1 - level) / 2
    lo = float(np.percentile(np.where(np.isnan(v), -np.inf, v), tail, method="lower"))
    hi = float(np.percentile(np.where(np.isnan(v), np.inf, v), 100 - tail, method="higher"))
    return lo, hi


def intervals_of(fits: list, draws: int) -> dict:
    """{param: (lo, hi), "_ok": share of draws fitted} for a list of refits (fits or Refusals)."""
    ok = [f for f in fits if not isinstance(f, Refusal)]
    out: dict = {}
    for k in values(ok[0]) if ok else ():
        out[k] = interval([values(f)[k] for f in ok], draws)
    out["_ok"] = len(ok) / draws if draws else 0.0
    return out


def overlaps(a: tuple[float, float], b: tuple[float, float]) -> bool:
    return a[0] <= b[1] and b[0] <= a[1]


# ---- extrapolation -------------------------------------------------------------------------------
def _largest_budget(cs: list[Cell]) -> tuple[str, list[Cell], list[Cell]] | Refusal:
    """(largest budget, its cells, the cells of the other budgets with less compute than its best)."""
    by: dict[str, list[Cell]] = defaultdict(list)
    for c in cs:
        by[c.budget].append(c)
    if len(by) < 2:
        return Refusal("extrapolation check", "one budget only")
    largest = max(by, key=lambda b: np.mean([c.compute for c in by[b]]))
    best = min(by[largest], key=lambda c: c.loss)
    rest = [c for c in cs if c.budget != largest and c.compute < best.compute]  # a true extrapolation in C
    return largest, by[largest], rest


def _verdict(pred: float, preds: list[float], draws: int, actual: float) -> dict:
    lo, hi = interval(preds, draws)
    verdict = "pass" if lo <= actual <= hi else "fail"
    if not (math.isfinite(lo) and math.isfinite(hi)):
        verdict += " (unbounded interval: no test)"
    return {"predicted_loss": pred, "relative_error": (pred - actual) / actual, "interval": (lo, hi),
            "verdict": verdict}  # fmt: skip


def _predict_curve(rest: list[Cell], saturating: bool, at: float, actual: float, draws: int, rng) -> dict:
    """The frontier curve fitted without the largest budget, at its best cell's compute. Prediction
    interval: each residual refit's value there times one more resampled residual (the noise of
    one frontier point)."""
    fr = frontier(rest)
    c, l = [x.compute for x in fr], [x.loss for x in fr]
    fit = fit_power(c, l, saturating=saturating)
    if isinstance(fit, Refusal):
        return {"refused": fit.reason}
    res = scaled_residuals(np.log(l), np.log(fit(np.asarray(c))), 3 if saturating else 2)
    preds = [float(f(at)) * math.exp(rng.choice(res)) for f in residual_curves(c, l, fit, saturating, rng, draws) if isinstance(f, PowerFit)]
    return _verdict(float(fit(at)), preds, draws, actual)


def _predict_surface(rest: list[Cell], held: list[Cell], actual: float, draws: int, rng) -> dict:
    """The best loss of the held-out budget: the lowest of the surface's losses at its cells' (N, D).
    Prediction interval: refits on within-budget draws of `rest`, each cell's prediction times a
    resampled residual, then the lowest (the best of several noisy runs is biased low: so is this)."""
    fit = fit_cells(rest)
    if isinstance(fit, Refusal):
        return {"refused": fit.reason}
    n, d = np.array([c.params for c in held]), np.array([c.samples for c in held])
    y = np.log([c.loss for c in rest])
    res = scaled_residuals(y, np.log(fit([c.params for c in rest], [c.samples for c in rest])), 5)
    preds = []
    for _ in range(draws):
        f = fit_cells(within_budgets(rest, rng))
        if isinstance(f, SurfaceFit):
            preds.append(float(np.min(f(n, d) * np.exp(rng.choice(res, len(held))))))
    return _verdict(float(np.min(fit(n, d))), preds, draws, actual)


def extrapolation(cs: list[Cell], draws: int = 100, seed: int = 0) -> dict | Refusal:
    """Fit without the largest budget, predict the best loss it reached, with a prediction interval
    (95%, `draws` bootstrap draws); "pass" if the actual loss lies inside."""
    split = _largest_budget(cs)
    if isinstance(split, Refusal):
        return split
    largest, held, rest = split
    best = min(held, key=lambda c: c.loss)
    rng = np.random.default_rng(seed)
    out = {"held_out_budget": largest, "compute": best.compute, "actual_loss": best.loss, "model": best.model, "draws": draws}
    for name, sat in (("saturating", True), ("power", False)):
        out[name] = _predict_curve(rest, sat, best.compute, best.loss, draws, rng)
    out["surface"] = _predict_surface(rest, held, best.loss, draws, rng)
    return out
