"""Synthetic sweep results from a known law, made the way the sweep makes them, to test the fits.

A run of budget C (training FLOPs) trains ceil(C / (F * batch)) whole steps of `batch` images
(pipeline.config.TrainConfig.total_steps), so it sees D = steps * batch images and spends D * F
FLOPs, F = the model's training FLOPs per image: slightly more than C, by less than one step. Its
held-out loss is L(N, D) = E + A N^-alpha + B D^-beta times log-normal noise; each lr of the grid
but the best is worse by `lr_penalty`. Runs can be missing, diverged or failed, as in a real table.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

# nfnet_pico at width multipliers 2^(k/2), k = -4..5: (label, parameters, training FLOPs per image at
# 32 px and 10 classes), measured with models.create_model(device="meta") and
# models.flops.train_flops_per_image. F/N falls from 65 to 22 with width (phi ~ 0.85, not the 6ND rule).
PICO = (("pico-w0.25", 12175, 795936), ("pico-w0.354", 25528, 1035288), ("pico-w0.5", 43873, 1359360),
        ("pico-w0.707", 95723, 2321568), ("pico-w1", 167661, 3656448), ("pico-w1.41", 313857, 7041816),
        ("pico-w2", 657865, 14381568), ("pico-w2.83", 1351071, 29199960), ("pico-w4", 2605953, 57037824),
        ("pico-w5.66", 5139443, 113236056))  # fmt: skip


@dataclass(frozen=True)
class Law:
    E: float
    A: float
    B: float
    alpha: float
    beta: float

    def __call__(self, n, d):
        return self.E + self.A * np.power(n, -self.alpha) + self.B * np.power(d, -self.beta)

    def frontier_exponent(self, phi: float = 1.0) -> float:
        """b of L*(C) - E ~ C^-b when F(N) ~ N^phi (surface.py's docstring)."""
        return self.alpha * self.beta / (self.alpha + phi * self.beta)

    def n_opt(self, c, k_f: float, phi: float = 1.0):
        """Compute-optimal parameters at compute c with F(N) = k_f N^phi."""
        s = self.alpha + phi * self.beta
        return (self.alpha * self.A / (phi * self.beta * self.B)) ** (1 / s) * (np.asarray(c, float) / k_f) ** (self.beta / s)


def proportional_models(count: int, n0: float, ratio: float = 2**0.5, flops_per_param: float = 6.0) -> tuple:
    """Models n0 * ratio^i with F = flops_per_param * N (phi = 1)."""
    return tuple((f"m{i}", n0 * ratio**i, flops_per_param * n0 * ratio**i) for i in range(count))


def _fate(rng, rates: dict[str, float]) -> str:
    u, acc = rng.random(), 0.0
    for status in ("missing", "diverged", "failed"):
        acc += rates.get(status, 0.0)
        if u < acc:
            return status
    return "ok"


def synthetic_rows(law: Law, models=PICO, budgets=(1e11, 3e11, 1e12, 3e12, 1e13, 3e13), *, batch: int = 256,
                   train_size: float = 60000, noise: float = 0.005, lrs=(0.4, 0.8), lr_penalty: float = 0.02,
                   rates: dict | None = None, seed: int = 0) -> list[dict]:  # fmt: skip
    """Rows as the sweep writes them (table.COLUMNS). `rates`: chance of each run being "missing"
    (never ran), "diverged" or "failed"; the first lr of `lrs` is the best."""
    rng = np.random.default_rng(seed)
    rows = []
    for label, n, fpi in models:
        for c in budgets:
            steps = max(1, math.ceil(c / (fpi * batch)))
            d = steps * batch
            for i, lr in enumerate(lrs):
                fate = _fate(rng, rates or {})
                loss = float(law(n, d)) * (1 + lr_penalty * i) * math.exp(rng.normal(0, noise))
                if fate == "missing":
                    continue
                ok = fate == "ok"
                budget = f"{c:.3g}flops"
                rows.append(dict(
                    point=f"{label}_{budget}_lr{lr:g}_s0", model=label, params=float(n), flops_per_image=float(fpi),
                    budget=budget, budget_kind="train_flops", budget_value=float(c), lr_base=lr, seed=0.0,
                    samples_seen=float(d) if fate != "failed" else math.nan, epochs=d / train_size if fate != "failed" else math.nan,
                    train_flops=float(d * fpi) if fate != "failed" else math.nan, heldout_loss=loss if ok else math.nan,
                    status=fate, error="" if ok else f"synthetic: {fate}",
                ))  # fmt: skip
    return rows
