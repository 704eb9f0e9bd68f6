"""Scaling laws fitted to a sweep's cells (one best-lr run per model and budget).

Three fits, all in log space with a robust (soft-L1) loss, so one bad run bends nothing much:
  * frontier: the lower envelope of held-out loss L against training compute C (FLOPs), and on it
      saturating   L(C) = E + a * C^(-b)      (Scaling ViT; "ConvNets Match ViTs at Scale")
      pure power   L(C) = a * C^(-b)          (a straight line on log-log axes)
  * compute-optimal size, isoFLOP style (Chinchilla approach 2): at each compute level C, a parabola
    in log N through the models' losses; its vertex is N*(C). Epoch budgets give each model other
    computes, so each model's loss is interpolated (log-log, never extrapolated) to the level.
    Then N*(C) = k_N C^(a_N) and D*(C) = C / F(N*) = k_D C^(a_D), F = training FLOPs per image.
  * fine-tuned error (1 - top-1) against pretraining compute, as a power law.
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
def frontier(cells: list[Cell]) -> list[Cell]:
    """Lower envelope: cells whose loss beats every cell of smaller compute (ordered by compute)."""
    out, best = [], math.inf
    for c in sorted(cells, key=lambda c: (c.compute, c.loss)):
        if c.loss < best or (out and c is out[-1]):  # a cell drawn twice by the bootstrap counts twice
            out.append(c)
            best = c.loss
    return out


def _robust(fun, x0, bounds, f_scale):
    return least_squares(fun, x0, bounds=bounds, loss="soft_l1", f_scale=f_scale, max_nfev=4000)


def fit_power(compute, loss, *, saturating: bool, f_scale: float = 0.02, warm: PowerFit | None = None) -> PowerFit | Refusal:
    """Fit on log L. Compute is scaled by its geometric mean (C0) so the parameters are O(1).

    Saturating: parameters (E, log A, b) with L = E + A (C/C0)^-b, E < min(L); a = A C0^b.
    Several starts in E (0 .. 0.9 min L) and b avoid the flat valleys of this three-parameter fit;
    `warm` (the full-data fit, for bootstrap draws) adds its own solution as the first start.
    """
    c, l = np.asarray(compute, float), np.asarray(loss, float)
    need = 4 if saturating else 3
    what = "L(C) = E + a*C^-b" if saturating else "L(C) = a*C^-b"
    if len(c) < need:
        return Refusal(what, f"{len(c)} frontier points; the fit needs at least {need}")
    if len(np.unique(c)) < need:
        return Refusal(what, f"only {len(np.unique(c))} distinct compute values on the frontier")
    if not (np.all(np.isfinite(l)) and np.all(l > 0) and np.all(c > 0)):
        return Refusal(what, "non-positive or non-finite loss or compute on the frontier")
    c0 = float(np.exp(np.log(c).mean()))
    x, y = np.log(c / c0), np.log(l)
    if not saturating:
        slope, icpt = np.polyfit(x, y, 1)
        r = _robust(lambda p: p[0] - p[1] * x - y, [icpt, -slope], ([-np.inf, -np.inf], [np.inf, np.inf]), f_scale)
        ln_a, b = r.x
        if b <= 0:
            return Refusal(what, f"loss does not fall with compute on the frontier (fitted exponent b={b:.3g} <= 0)")
        res = r.fun
        return PowerFit(0.0, float(math.exp(ln_a) * c0**b), float(b), float(np.sqrt(np.mean(res**2))), len(c))
    lmin = float(l.min())

    def resid(p):
        e, ln_a, b = p
        return np.log(e + np.exp(ln_a) * np.exp(-b * x)) - y

    starts = [(e_frac * lmin, b0) for e_frac in (1e-3, 0.5, 0.9) for b0 in (0.05, 0.3)]
    if warm is not None:
        starts = [(min(warm.E, 0.99 * lmin), warm.b)]
    best = None
    for e0, b0 in starts:
        a0 = max(float(np.exp(y).mean()) - e0, 1e-6)
        try:
            r = _robust(resid, [e0, math.log(a0), b0], ([0.0, -30, 1e-4], [lmin * 0.999, 30, 5.0]), f_scale)
        except ValueError:
            continue
        if best is None or r.cost < best.cost:
            best = r
    if best is None or not best.success:
        return Refusal(what, "the optimiser did not converge")
    e, ln_a, b = best.x
    return PowerFit(float(e), float(math.exp(ln_a) * c0**b), float(b), float(np.sqrt(np.mean(best.fun**2))), len(c))


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


def fit_error_vs_compute(cells: list[Cell]) -> PowerFit | Refusal:
    """Fine-tuned top-1 error against pretraining compute: err = a * C^-b on its lower envelope
    (cells whose error beats every cell of less compute)."""
    ft = sorted((c for c in cells if np.isfinite(c.finetune_top1) and c.finetune_top1 < 1), key=lambda c: (c.compute, -c.finetune_top1))
    if not ft:
        return Refusal("fine-tuned error(C)", "no fine-tuned runs")
    pts, best = [], math.inf
    for c in ft:
        if 1 - c.finetune_top1 < best or (pts and c is pts[-1]):
            pts.append(c)
            best = 1 - c.finetune_top1
    return fit_power([c.compute for c in pts], [1 - c.finetune_top1 for c in pts], saturating=False)
