"""Chinchilla approach 3: one loss surface through every cell (Hoffmann et al. 2022, Appendix D.2;
Besiroglu et al. 2024, "Chinchilla Scaling: A replication attempt", on fitting it properly).

    L(N, D) = E + A N^-alpha + B D^-beta          N = parameters, D = training images

fitted as log L = LSE(a - alpha log N, b - beta log D, e) with E = e^e, A = e^a, B = e^b, under a
Huber loss (delta 1e-3) on log L, by L-BFGS-B from the best starts of a grid. Training FLOPs per
image grow as F(N) = k_F N^phi (log-log linear across the sweep's models; phi = 1 is the 6ND rule),
so C = F(N) D, and minimising L at fixed C gives (d/dN of A N^-a + B (C / k_F N^phi)^-b = 0):

    N* = [alpha A / (phi beta B)]^(1/(alpha + phi beta)) (C / k_F)^(beta / (alpha + phi beta))
    D* = C / F(N*)  ~  C^(alpha / (alpha + phi beta))
    L*(C) - E = A N*^-alpha (1 + alpha / (phi beta))  ~  C^-(alpha beta / (alpha + phi beta))

so the frontier exponent is b = alpha beta / (alpha + phi beta).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np
from scipy.optimize import minimize
from scipy.special import huber

from .laws import Cell, Refusal

HUBER_DELTA = 1e-3  # on log L: ~0.1% of the loss; larger residuals count linearly (Hoffmann et al.)
NAMES = ("e", "a", "b", "alpha", "beta")
# Bounds of (e, a, b, alpha, beta); a, b are the terms' logs at the geometric-mean N and D (see _fit_centered).
# A fit that ends on one (E -> 0, a term that vanishes, an exponent at 0.02 or 2.5) is flagged: its
# bootstrap interval on that side is reported as unbounded.
BOUNDS = ((-12.0, 5.0), (-25.0, 5.0), (-25.0, 5.0), (0.02, 2.5), (0.02, 2.5))
# The start grid: 4 x 4 exponents, 3 values of E as a share of min L, 3 x 3 term sizes as a share of mean L
# (432 starts). The objective is evaluated at all of them at once; L-BFGS-B runs from the best TOP_STARTS.
GRID_EXPONENTS = (0.1, 0.25, 0.5, 1.0)
GRID_E = (0.05, 0.5, 0.9)
GRID_TERMS = (0.02, 0.1, 0.5)
TOP_STARTS = 3


@dataclass
class SurfaceFit:
    """L(N, D) = E + A N^-alpha + B D^-beta, with F(N) = k_f N^phi FLOPs per image."""

    E: float
    A: float
    B: float
    alpha: float
    beta: float
    phi: float
    k_f: float
    objective: float  # mean Huber loss of the log residuals, in units of delta
    rmse: float  # of log L residuals
    n: int
    at_bound: tuple = ()  # parameters that ended on a bound, with the side: "e-" (E -> 0), "alpha+", "a-" (no N term)

    def __call__(self, n, d):
        return self.E + self.A * np.power(np.asarray(n, float), -self.alpha) + self.B * np.power(np.asarray(d, float), -self.beta)

    @property
    def b(self) -> float:
        """Exponent of L*(C) - E along the compute-optimal frontier."""
        return self.alpha * self.beta / (self.alpha + self.phi * self.beta)

    @property
    def a_n(self) -> float:
        return self.beta / (self.alpha + self.phi * self.beta)

    @property
    def a_d(self) -> float:
        return self.alpha / (self.alpha + self.phi * self.beta)

    def optimal(self, c):
        """(N*, D*, L*) at training compute c (see the module docstring)."""
        c = np.asarray(c, float)
        s = self.alpha + self.phi * self.beta
        n_opt = (self.alpha * self.A / (self.phi * self.beta * self.B)) ** (1 / s) * (c / self.k_f) ** (self.beta / s)
        d_opt = c / (self.k_f * n_opt**self.phi)
        return n_opt, d_opt, self(n_opt, d_opt)


def flops_law(params, flops_per_image) -> tuple[float, float]:
    """(phi, k_F) of F(N) = k_F N^phi, least squares in log-log over the distinct models."""
    pairs = np.unique(np.column_stack([params, flops_per_image]), axis=0)
    if len(pairs) < 2:
        return 1.0, float(pairs[0, 1] / pairs[0, 0])
    phi, ln_k = np.polyfit(np.log(pairs[:, 0]), np.log(pairs[:, 1]), 1)
    return float(phi), float(math.exp(ln_k))


def _lse(t: np.ndarray) -> np.ndarray:
    """log-sum-exp over axis 0 (scipy's logsumexp costs ~300 us a call here, this ~10 us)."""
    m = t.max(axis=0)
    return m + np.log(np.exp(t - m).sum(axis=0))


def _predict(p: np.ndarray, xn: np.ndarray, xd: np.ndarray) -> np.ndarray:
    """log L-hat for parameter rows p (k, 5) at centred log N, log D (n,): shape (k, n)."""
    e, a, b, al, be = (p[:, i : i + 1] for i in range(5))
    return _lse(np.stack([a - al * xn, b - be * xd, np.broadcast_to(e, (len(p), len(xn)))]))


def _objective(p: np.ndarray, xn, xd, y) -> tuple[float, np.ndarray]:
    """Mean Huber loss / delta and its gradient. d(LSE)/d(term) is that term's softmax weight w, so
    d/d(a, b, e) = (w_a, w_b, w_e) and d/d(alpha, beta) = (-w_a xN, -w_b xD), times psi(r) = clip(r, +-delta).
    Written out term by term: this runs ~100 times per start, and numpy's per-call cost dominates."""
    e, a, b, al, be = p
    tn, td = a - al * xn, b - be * xd
    m = np.maximum(np.maximum(tn, td), e)
    wn, wd, we = np.exp(tn - m), np.exp(td - m), np.exp(e - m)
    z = wn + wd + we
    r = m + np.log(z) - y
    clipped = np.clip(r, -HUBER_DELTA, HUBER_DELTA)  # psi(r), the Huber loss's derivative
    psi = clipped / (HUBER_DELTA * len(y) * z)
    grad = np.array([psi @ we, psi @ wn, psi @ wd, -psi @ (wn * xn), -psi @ (wd * xd)])
    # Huber(r) = psi (r - psi / 2): r^2 / 2 inside +-delta, delta (|r| - delta / 2) outside.
    return float(clipped @ (r - clipped / 2)) / (HUBER_DELTA * len(y)), grad


def _grid(y: np.ndarray) -> np.ndarray:
    lmin, lmean = float(np.exp(y.min())), float(np.exp(y.mean()))
    rows = itertools.product([math.log(f * lmin) for f in GRID_E], [math.log(f * lmean) for f in GRID_TERMS],
                             [math.log(f * lmean) for f in GRID_TERMS], GRID_EXPONENTS, GRID_EXPONENTS)  # fmt: skip
    return np.array(list(rows))


def _fit_centered(xn, xd, y) -> tuple[np.ndarray, float] | None:
    """Best (e, a, b, alpha, beta) over L-BFGS-B runs from the TOP_STARTS best grid points."""
    grid = _grid(y)
    losses = huber(HUBER_DELTA, _predict(grid, xn, xd) - y).mean(axis=1)
    best = None
    for x0 in grid[np.argsort(losses)[:TOP_STARTS]]:
        r = minimize(_objective, x0, args=(xn, xd, y), jac=True, method="L-BFGS-B", bounds=BOUNDS,
                     options={"maxiter": 2000, "ftol": 1e-13, "gtol": 1e-9})  # fmt: skip
        if np.all(np.isfinite(r.x)) and (best is None or r.fun < best[1]):
            best = (r.x, float(r.fun))
    return best


def fit_surface(params, samples, loss, flops_per_image) -> SurfaceFit | Refusal:
    """Approach 3 on arrays of the cells' N, D, L and F(N); see the module docstring."""
    what = "L(N, D) = E + A*N^-alpha + B*D^-beta"
    n, d, l = (np.asarray(v, float) for v in (params, samples, loss))
    if len(l) < 8:
        return Refusal(what, f"{len(l)} cells; five parameters need at least 8")
    if len(np.unique(n)) < 3 or len(np.unique(d)) < 3:
        return Refusal(what, f"{len(np.unique(n))} model sizes and {len(np.unique(d))} sample counts; each needs at least 3")
    if not (np.all(np.isfinite(l)) and np.all(l > 0) and np.all(n > 0) and np.all(d > 0)):
        return Refusal(what, "non-positive or non-finite loss, parameters or samples")
    # Centring log N and log D (a = log A - alpha mean log N) keeps the five parameters O(1) and the
    # grid meaningful: A' = e^a is the N term's size at the geometric-mean model.
    mn, md = float(np.log(n).mean()), float(np.log(d).mean())
    xn, xd, y = np.log(n) - mn, np.log(d) - md, np.log(l)
    best = _fit_centered(xn, xd, y)
    if best is None:
        return Refusal(what, "the optimiser did not converge from any start")
    p, obj = best
    e, a, b, al, be = (float(v) for v in p)
    at_bound = tuple(k + ("-" if v - lo < hi - v else "+") for k, v, (lo, hi) in zip(NAMES, p, BOUNDS)
                     if min(v - lo, hi - v) < 1e-6 * (1 + abs(v)))  # fmt: skip
    phi, k_f = flops_law(n, flops_per_image)
    rmse = float(np.sqrt(np.mean((_predict(p[None], xn, xd)[0] - y) ** 2)))
    return SurfaceFit(E=math.exp(e), A=math.exp(a + al * mn), B=math.exp(b + be * md), alpha=al, beta=be, phi=phi, k_f=k_f,
                      objective=obj, rmse=rmse, n=len(l), at_bound=at_bound)  # fmt: skip


def fit_cells(cells: list[Cell]) -> SurfaceFit | Refusal:
    return fit_surface([c.params for c in cells], [c.samples for c in cells], [c.loss for c in cells],
                       [c.flops_per_image for c in cells])  # fmt: skip
