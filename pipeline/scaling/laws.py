"""Scaling laws fitted to a sweep's cells (one best-lr run per model and budget).

Three fits, all in log space with a robust (soft-L1) loss, so one bad run bends nothing much:
  * frontier: the lower envelope of held-out loss L against training compute C (FLOPs), one point
    per budget (the best cell of each; see `budget_key`), and on it
      saturating   L(C) = E + a * C^(-b)      (Scaling ViT; "ConvNets Match ViTs at Scale")
      pure power   L(C) = a * C^(-b)          (a straight line on log-log axes)
  * compute-optimal size, isoFLOP style (Chinchilla approach 2): at each compute level C, a parabola
    in log N through the models' losses; its vertex is N*(C). Epoch budgets give each model other
    computes, so each model's loss is interpolated (log-log, never extrapolated) to the level.
    Then N*(C) = k_N C^(a_N) and D*(C) = C / F(N*) = k_D C^(a_D), F = training FLOPs per image.
  * fine-tuned error (1 - top-1) against pretraining compute, as a power law.
Chinchilla's approach 3 (one surface L(N, D) through every cell) is in surface.py.
Where the data cannot carry a fit, the result is a `Refusal` with the reason, never a number.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from scipy.optimize import least_squares


@dataclass
class Cell:
    """The best learning rate of one (model, budget): loss averaged over seeds, compute of that lr."""

    model: str
    params: float
    flops_per_image: float
    budget: str
    compute: float  # total training FLOPs
    samples: float
    epochs: float
    loss: float
    lr: float
    finetune_top1: float = math.nan
    lrs_tried: tuple = ()
    point: str = ""  # the run (seed) that represents the cell, e.g. for fine-tuning
    budget_flops: float = math.nan  # the nominal budget when it was set in FLOPs (an isoFLOP slice)

    @property
    def lr_at_edge(self) -> bool:
        return len(self.lrs_tried) > 1 and self.lr in (min(self.lrs_tried), max(self.lrs_tried))


@dataclass
class Refusal:
    what: str
    reason: str

    def __bool__(self) -> bool:  # `if fit:` reads naturally for a fit-or-refusal value
        return False


@dataclass
class PowerFit:
    """log L = log(E + a * C^-b), or with E = 0 the pure power law. rmse is of log L residuals."""

    E: float
    a: float
    b: float
    rmse: float
    n: int
    at_bound: tuple = ()  # "E-", "E+", "b+", ...: parameters that ended on a bound of the fit (side)

    def __call__(self, c):
        return self.E + self.a * np.power(np.asarray(c, dtype=float), -self.b)


@dataclass
class OptimalFit:
    """Compute-optimal allocation: levels (C, N*, D*, L*) and N* = kN C^aN, D* = kD C^aD."""

    levels: list = field(default_factory=list)  # dicts: compute, n_opt, d_opt, epochs_opt, loss_opt, models
    skipped: list = field(default_factory=list)  # Refusals for levels without an interior minimum
    a_n: float = math.nan
    k_n: float = math.nan
    a_d: float = math.nan
    k_d: float = math.nan


# ---- the frontier --------------------------------------------------------------------------------
def budget_key(c: Cell) -> float:
    """The compute a cell's budget stands for. A budget in FLOPs is spent in whole steps, so its
    models train budget .. budget + one step's FLOPs: they are one point, at the nominal budget. A
    budget below one step of a big model runs one whole step (compute > 1.5 x budget): that cell is
    not on the level and stands at its own compute, as do cells of epoch and sample budgets (there
    each model's compute differs by its FLOPs per image)."""
    if math.isfinite(c.budget_flops) and c.compute <= 1.5 * c.budget_flops:
        return float(c.budget_flops)
    return float(c.compute)


def best_per_budget(cells: list[Cell], value=lambda c: c.loss) -> list[Cell]:
    """The cell of lowest `value` at each budget_key, ordered by that key."""
    best: dict[float, Cell] = {}
    for c in cells:
        k = budget_key(c)
        if k not in best or value(c) < value(best[k]):
            best[k] = c
    return [best[k] for k in sorted(best)]


def envelope(cells: list[Cell], value=lambda c: c.loss) -> list[Cell]:
    """Lower envelope with one point per budget: the best cell of each budget, kept if it beats the
    best of every smaller budget. Without the per-budget step, a worse model whose whole steps
    happened to spend a few FLOPs less than its budget's best joined the envelope and bent the fit
    (the issue's noise-free table: saturating b = 0.106 with it, 0.139 without, truth 0.154)."""
    out, lowest = [], math.inf
    for c in best_per_budget(cells, value):
        if value(c) < lowest:
            out.append(c)
            lowest = value(c)
    return out


def frontier(cells: list[Cell]) -> list[Cell]:
    """Compute-optimal frontier of held-out loss: `envelope` of the cells (ordered by compute)."""
    return envelope(cells)


def _robust(fun, x0, bounds, f_scale, jac="2-point"):
    return least_squares(fun, x0, jac=jac, bounds=bounds, loss="soft_l1", f_scale=f_scale, max_nfev=4000)


SATURATING_STARTS = 2  # least_squares runs from the best points of the start grid


def _saturating_starts(x, y, lmin: float, f_scale: float, warm) -> list[list[float]]:
    """The best starts (E, ln A, b) of a 5 x 4 grid in E (0 .. 0.9 min L) and b, where the flat
    valleys of this three-parameter fit lie; ln A by least squares given E and b (log(L - E) + b x
    averaged). Ranked by the soft-L1 cost, which numpy evaluates at all 20 at once."""
    grid = np.array([(f * lmin, b0) for f in (1e-3, 0.25, 0.5, 0.75, 0.9) for b0 in (0.03, 0.1, 0.3, 1.0)])
    if warm is not None:
        grid = np.vstack([grid, [min(warm.E, 0.99 * lmin), warm.b]])
    e, b = grid[:, :1], grid[:, 1:]
    ln_a = np.clip((np.log(np.exp(y) - e) + b * x).mean(axis=1, keepdims=True), -29, 29)
    z = ((np.log(e + np.exp(ln_a - b * x)) - y) / f_scale) ** 2
    cost = (2 * (np.sqrt(1 + z) - 1)).sum(axis=1)
    order = np.argsort(cost)[:SATURATING_STARTS]
    return [[float(e[i, 0]), float(ln_a[i, 0]), float(b[i, 0])] for i in order]


def fit_power(compute, loss, *, saturating: bool, f_scale: float = 0.02, warm: PowerFit | None = None) -> PowerFit | Refusal:
    """Fit on log L. Compute is scaled by its geometric mean (C0) so the parameters are O(1).

    Saturating: parameters (E, log A, b) with L = E + A (C/C0)^-b, E < min(L); a = A C0^b.
    Starts from a grid in E and b (`_saturating_starts`) avoid the flat valleys of this fit;
    `warm` (an earlier fit) adds its solution to the grid.
    """
    c, l = np.asarray(compute, float), np.asarray(loss, float)
    need = 4 if saturating else 3
    what = "L(C) = E + a*C^-b" if saturating else "L(C) = a*C^-b"
    if len(c) < need:
        return Refusal(what, f"{len(c)} frontier points (budgets); the fit needs at least {need}")
    if len(np.unique(c)) < need:
        return Refusal(what, f"only {len(np.unique(c))} distinct budgets on the frontier; the fit needs at least {need}")
    if not (np.all(np.isfinite(l)) and np.all(l > 0) and np.all(c > 0)):
        return Refusal(what, "non-positive or non-finite loss or compute on the frontier")
    c0 = float(np.exp(np.log(c).mean()))
    x, y = np.log(c / c0), np.log(l)
    if not saturating:
        slope, icpt = np.polyfit(x, y, 1)
        jac = np.column_stack([np.ones_like(x), -x])  # the residual is linear in (log a, b)
        r = _robust(lambda p: p[0] - p[1] * x - y, [icpt, -slope], ([-np.inf, -np.inf], [np.inf, np.inf]), f_scale, lambda p: jac)
        ln_a, b = r.x
        if b <= 0:
            return Refusal(what, f"loss does not fall with compute on the frontier (fitted exponent b={b:.3g} <= 0)")
        res = r.fun
        return PowerFit(0.0, float(math.exp(ln_a) * c0**b), float(b), float(np.sqrt(np.mean(res**2))), len(c))
    lmin = float(l.min())

    def resid(p):
        e, ln_a, b = p
        return np.log(e + np.exp(ln_a - b * x)) - y

    def jac(p):  # r = log(E + t) - y, t = e^(ln A - b x): dr/d(E, ln A, b) = (1, t, -x t) / (E + t)
        e, ln_a, b = p
        t = np.exp(ln_a - b * x)
        return np.column_stack([np.ones_like(x), t, -x * t]) / (e + t)[:, None]

    best = None
    for x0 in _saturating_starts(x, y, lmin, f_scale, warm):
        try:
            r = _robust(resid, x0, ([0.0, -30, 1e-4], [lmin * 0.999, 30, 5.0]), f_scale, jac)
        except ValueError:
            continue
        if best is None or r.cost < best.cost:
            best = r
    if best is None or not best.success:
        return Refusal(what, "the optimiser did not converge")
    e, ln_a, b = best.x
    # E at 0 or at min L, b at 1e-4 or 5: the data do not pin that side (its interval is unbounded).
    at_bound = tuple(name + side for name, v, lo, hi in (("E", e, 0.0, lmin * 0.999), ("b", b, 1e-4, 5.0))
                     for side, hit in (("-", v - lo < 1e-6 * (1 + abs(lo))), ("+", hi - v < 1e-6 * (1 + abs(hi)))) if hit)  # fmt: skip
    return PowerFit(float(e), float(math.exp(ln_a) * c0**b), float(b), float(np.sqrt(np.mean(best.fun**2))), len(c), at_bound)


# ---- compute-optimal model size and data ---------------------------------------------------------
def _per_model(cells: list[Cell]) -> dict[str, list[Cell]]:
    by: dict[str, list[Cell]] = {}
    for c in cells:
        by.setdefault(c.model, []).append(c)
    return {m: sorted(v, key=lambda c: c.compute) for m, v in by.items()}


def _slices(cells: list[Cell], per_model: dict[str, list[Cell]], n_levels: int) -> list[tuple[float, dict[str, float]]]:
    """isoFLOP slices (compute level, {model: loss}). Budgets set in FLOPs are slices as they are
    (each model ran that budget, to within one step); otherwise each model's loss is interpolated
    to log-spaced levels across the range that at least 3 models cover."""
    by_budget: dict[float, list[tuple[str, float]]] = {}
    for c in cells:
        # A budget below one step of a big model runs one whole step: that cell is not on the level.
        if math.isfinite(c.budget_flops) and c.compute <= 1.5 * c.budget_flops:
            by_budget.setdefault(c.budget_flops, []).append((c.model, c.loss))
    shared = sorted((lvl, ms) for lvl, ms in by_budget.items() if len({m for m, _ in ms}) >= 3)
    if len(shared) >= 2:
        return shared
    spans = [(v[0].compute, v[-1].compute) for v in per_model.values() if len(v) >= 2]
    if len(spans) < 3:
        return []
    lo, hi = min(s[0] for s in spans), max(s[1] for s in spans)
    out = []
    for g in np.exp(np.linspace(math.log(lo), math.log(hi), n_levels)):
        losses = [(m, l) for m, v in per_model.items() if (l := _loss_at(v, float(g))) is not None]
        if len(losses) >= 3:
            out.append((float(g), losses))
    return out


def _loss_at(model_cells: list[Cell], c: float) -> float | None:
    """Log-log interpolation of one model's loss at compute c; None outside its range."""
    model_cells = list({id(x): x for x in model_cells}.values())  # bootstrap duplicates: one curve
    cs = np.array([x.compute for x in model_cells])
    if c < cs[0] * (1 - 1e-9) or c > cs[-1] * (1 + 1e-9):
        return None
    if len(cs) == 1:
        return model_cells[0].loss
    return float(np.exp(np.interp(math.log(c), np.log(cs), np.log([x.loss for x in model_cells]))))


def compute_optimal(cells: list[Cell], train_size: float, n_levels: int = 7) -> OptimalFit | Refusal:
    """Chinchilla approach 2 on whatever grid the sweep ran (see the module docstring)."""
    what = "compute-optimal N*(C), D*(C)"
    per = _per_model(cells)
    if len(per) < 3:
        return Refusal(what, f"{len(per)} model sizes; an isoFLOP parabola needs at least 3")
    # F(N): training FLOPs per image against parameters, log-log linear across the models.
    logn = np.log([v[0].params for v in per.values()])
    logf = np.log([v[0].flops_per_image for v in per.values()])
    f_slope, f_icpt = np.polyfit(logn, logf, 1)
    out = OptimalFit()
    for level, losses in _slices(cells, per, n_levels):
        pts = [(math.log(per[m][0].params), math.log(l)) for m, l in losses]
        if len({x for x, _ in pts}) < 3:
            continue
        xs, ys = np.array(pts).T
        c2, c1, c0 = np.polyfit(xs, ys, 2)
        best = int(np.argmin(ys))
        if xs[best] in (xs.min(), xs.max()):
            side = "largest" if xs[best] == xs.max() else "smallest"
            out.skipped.append(Refusal(f"C={level:.3g}", f"no interior minimum: the {side} model is best "
                                       f"(N={math.exp(xs[best]):.3g}); add models beyond it"))  # fmt: skip
            continue
        x_star = -c1 / (2 * c2) if c2 > 0 else math.nan
        if not (xs.min() < x_star < xs.max()):
            out.skipped.append(Refusal(f"C={level:.3g}", "the parabola in log N has no minimum inside the sizes (noisy losses?)"))
            continue
        n_opt = math.exp(x_star)
        d_opt = level / math.exp(f_icpt + f_slope * x_star)
        out.levels.append({"compute": level, "n_opt": n_opt, "d_opt": d_opt, "epochs_opt": d_opt / train_size,
                           "loss_opt": float(math.exp(c0 + c1 * x_star + c2 * x_star**2)), "models": len(pts)})  # fmt: skip
    if len(out.levels) < 2:
        reasons = "; ".join(f"{r.what}: {r.reason}" for r in out.skipped) or "no compute level is covered by 3 models"
        return Refusal(what, f"{len(out.levels)} compute levels with an interior minimum (need >= 2): {reasons}")
    lc = np.log([lv["compute"] for lv in out.levels])
    out.a_n, ln_kn = np.polyfit(lc, np.log([lv["n_opt"] for lv in out.levels]), 1)
    out.a_d, ln_kd = np.polyfit(lc, np.log([lv["d_opt"] for lv in out.levels]), 1)
    out.k_n, out.k_d = float(math.exp(ln_kn)), float(math.exp(ln_kd))
    out.a_n, out.a_d = float(out.a_n), float(out.a_d)
    return out


def finetune_envelope(cells: list[Cell]) -> list[Cell]:
    """The fine-tuned cells' lower envelope of error (1 - top-1), one point per budget."""
    ft = [c for c in cells if np.isfinite(c.finetune_top1) and c.finetune_top1 < 1]
    return envelope(ft, value=lambda c: 1 - c.finetune_top1)


def fit_error_vs_compute(cells: list[Cell]) -> PowerFit | Refusal:
    """Fine-tuned top-1 error against pretraining compute: err = a * C^-b on `finetune_envelope`."""
    pts = finetune_envelope(cells)
    if not pts:
        return Refusal("fine-tuned error(C)", "no fine-tuned runs")
    return fit_power([c.compute for c in pts], [1 - c.finetune_top1 for c in pts], saturating=False)
