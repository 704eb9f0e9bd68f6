"""Do the scaling fits recover a known law? Several laws (E, exponents, noise, FLOPs per image that
do or do not follow the 6ND rule), several seeds, tables made the way the sweep makes them (whole
steps per budget, pipeline.scaling.synthetic), with missing, diverged and failed runs.

Checked: true values inside the 95% bootstrap intervals and clearly wrong values (twice an
exponent, a tenth of E) outside, in most seeds; the one-point-per-budget frontier; refusals that
count budgets; unbounded intervals at a bound; the extrapolation verdict; whether model size and
epochs grow at the same rate; the CLI's exit status.
Draws are few (40) to keep the file fast; the tolerances below were measured, not tuned to one law.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from pipeline.scaling import Refusal, analyze, cells, fit_cells, fit_power, frontier
from pipeline.scaling.analysis import SAME_RATE, _fit_all, bootstrap, same_rate
from pipeline.scaling.intervals import intervals_of, within_budgets
from pipeline.scaling.surface import flops_law
from pipeline.scaling.synthetic import PICO, Law, proportional_models, synthetic_rows

BUDGETS = tuple(1e12 * 3**j for j in range(6))  # 1e12 .. 2.4e14 training FLOPs
PROPORTIONAL = proportional_models(10, 2e4)  # 2e4 .. 4.5e5 parameters, F = 6 N
LOST = dict(missing=0.04, diverged=0.03, failed=0.03)


def placed(E, alpha, beta, B, models, n_mid) -> Law:
    """A law whose compute-optimal N* at the middle budget is n_mid (inside the models), so every
    budget has an interior optimum: solve the N* formula (surface.py) for A."""
    phi, k = flops_law([m[1] for m in models], [m[2] for m in models])
    c_mid = math.sqrt(BUDGETS[0] * BUDGETS[-1])
    s = alpha + phi * beta
    return Law(E, n_mid**s * phi * beta * B / alpha / (c_mid / k) ** beta, B, alpha, beta)


# (name, law, models, noise): different E, exponents, noise and FLOPs-per-image laws.
LAWS = [
    ("chinchilla-exponents, pico FLOPs", placed(2.1, 0.34, 0.28, 30.0, PICO, 3e5), PICO, 0.005),
    ("steep N, 6ND", placed(0.8, 0.5, 0.25, 20.0, PROPORTIONAL, 8e4), PROPORTIONAL, 0.01),
    ("steep D, high E, pico FLOPs", placed(3.5, 0.2, 0.4, 60.0, PICO, 2e5), PICO, 0.003),
]
SEEDS = range(4)
DRAWS = 40


def _surface_intervals(cs, seed, draws=DRAWS):
    rng = np.random.default_rng(seed)
    return intervals_of([fit_cells(within_budgets(cs, rng)) for _ in range(draws)], draws)


def _inside(x, iv) -> bool:
    return iv[0] <= x <= iv[1]


@pytest.mark.parametrize("name,law,models,noise", LAWS, ids=[x[0] for x in LAWS])
def test_surface_intervals_hold_the_truth_and_exclude_wrong_values(name, law, models, noise):
    """Approach 3 with its within-budget bootstrap, 4 seeds per law: the truth inside, and twice an
    exponent / a tenth of E outside, in at least 3 of the 4 seeds each."""
    phi, _ = flops_law([m[1] for m in models], [m[2] for m in models])
    diff = (law.beta - law.alpha) / (law.alpha + phi * law.beta)  # a_N - a_D: do N* and epochs* grow alike?
    truth = {"E": law.E, "alpha": law.alpha, "beta": law.beta, "b": law.frontier_exponent(phi), "a_N-a_D": diff}
    wrong = {"E": law.E / 10, "alpha": 2 * law.alpha, "beta": 2 * law.beta, "b": 2 * truth["b"],
             "a_N-a_D": diff - 0.3 if diff > 0 else diff + 0.3}  # fmt: skip
    hits, rejected = dict.fromkeys(truth, 0), dict.fromkeys(truth, 0)
    for seed in SEEDS:
        rows = synthetic_rows(law, models, BUDGETS, noise=noise, rates=LOST, seed=seed)
        cs = cells(rows)
        fit = fit_cells(cs)
        iv = _surface_intervals(cs, seed)
        assert iv["_ok"] == 1.0 and not fit.at_bound
        for k in truth:
            hits[k] += _inside(truth[k], iv[k])
            rejected[k] += not _inside(wrong[k], iv[k])
    need = len(SEEDS) - 1
    assert min(hits.values()) >= need, f"{name}: seeds with the truth inside, of {len(SEEDS)}: {hits}"
    assert min(rejected.values()) >= need, f"{name}: seeds with the wrong value outside, of {len(SEEDS)}: {rejected}"


def _issue_table(noise=0.0, seed=0):
    """The issue's kind of table: E = 2.1, frontier exponent ~0.154, 6ND models, whole steps."""
    law = placed(2.1, 0.34, 0.28, 30.0, PROPORTIONAL, 1e5)
    return law, synthetic_rows(law, PROPORTIONAL, BUDGETS, noise=noise, seed=seed)


def test_frontier_has_one_point_per_budget():
    """Whole steps make the models of one budget spend slightly different FLOPs: the frontier still
    takes one cell per budget, the best, and the surface recovers the exponent exactly."""
    law, rows = _issue_table()
    cs = cells(rows)
    fr = frontier(cs)
    assert len({c.compute for c in cs}) > 3 * len(BUDGETS)  # computes differ within a budget
    assert [c.budget_flops for c in fr] == list(BUDGETS)
    for c in fr:  # the best of its budget
        assert c.loss == min(x.loss for x in cs if x.budget == c.budget)
    b = law.frontier_exponent(1.0)
    assert abs(b - 0.154) < 0.001
    assert abs(fit_cells(cs).b - b) < 0.001 and abs(fit_cells(cs).E - law.E) < 0.001
    sat = fit_power([c.compute for c in fr], [c.loss for c in fr], saturating=True)
    assert abs(sat.b - b) < 0.03  # the best model of a grid sits above the true envelope


def test_frontier_exponent_within_a_hundredth_across_seeds():
    """The issue's bar: approach 3 recovers the frontier exponent within about +-0.01. Measured over
    10 seeds: at 0.25% noise the error stays under 0.008; at 0.5% it reaches 0.016 (the intervals
    above cover that)."""
    for seed in range(5):
        law, rows = _issue_table(noise=0.0025, seed=seed)
        assert abs(fit_cells(cells(rows)).b - law.frontier_exponent(1.0)) < 0.01


def test_refusals_count_budgets_not_cells():
    """Three budgets of ten models each: 30 cells, but three frontier points."""
    _, rows = _issue_table()
    three = [r for r in rows if r["budget_value"] <= BUDGETS[2]]
    r = analyze(three, train_size=60000, draws=0)
    assert len(r["cells"]) == 30 and len(r["frontier"]) == 3
    assert "3 frontier points (budgets); the fit needs at least 4" in r["saturating"].reason


def test_interval_reaching_a_bound_is_unbounded():
    """No irreducible loss (E = 0): the surface's E ends on its lower bound, its interval is unbounded below."""
    law = Law(0.0, 40.0, 60.0, 0.3, 0.3)
    rows = synthetic_rows(law, PROPORTIONAL, BUDGETS, noise=0.003, seed=1)
    cs = cells(rows)
    assert "e-" in fit_cells(cs).at_bound
    iv = _surface_intervals(cs, 1, draws=20)
    assert iv["E"][0] == -math.inf and math.isfinite(iv["E"][1])


def test_analyze_reports_approaches_side_by_side_and_extrapolates():
    """End to end on a lossy table: every approach fitted, the surface's extrapolation to the
    largest budget passes, and the pure power law (no E to bend with) predicts too low a loss."""
    law, models = LAWS[0][1], LAWS[0][2]
    rows = synthetic_rows(law, models, BUDGETS, noise=0.005, rates=LOST, seed=7)
    r = analyze(rows, train_size=60000, draws=20, seed=7)
    assert r["status"]["ok"] < len(rows) and all(r[k] for k in ("saturating", "power", "surface", "optimal"))
    assert set(r["intervals"]) >= {"saturating", "power", "surface", "optimal"}
    assert isinstance(r["disagreements"], list)
    ex = r["extrapolation"]
    assert ex["held_out_budget"] == f"{BUDGETS[-1]:.3g}flops"
    assert ex["surface"]["verdict"] == "pass" and abs(ex["surface"]["relative_error"]) < 0.01
    assert ex["power"]["relative_error"] < 0


# ---- do model size and epochs grow at the same rate? ---------------------------------------------
RATE_MODELS = proportional_models(14, 7e3)  # 7e3 .. 6.3e5 parameters, F = 6 N: N* moves 12x over the budgets at most
RATE_BUDGETS = BUDGETS[1:5]  # 3e12 .. 8.1e13
RATE_DRAWS = 30


def rate_law(alpha, beta) -> Law:
    """E = 1.5; at the middle budget N* is the models' geometric centre and the D term is 0.5 (with
    6ND, alpha A N*^-alpha = beta B D*^-beta there), so every budget has an interior optimum."""
    c_mid = math.sqrt(RATE_BUDGETS[0] * RATE_BUDGETS[-1])
    n_mid = math.sqrt(RATE_MODELS[0][1] * RATE_MODELS[-1][1])
    d_mid = c_mid / (6 * n_mid)
    B = 0.5 * d_mid**beta
    return Law(1.5, beta * 0.5 / alpha * n_mid**alpha, B, alpha, beta)


@pytest.mark.parametrize("alpha,beta,expected", [(0.3, 0.3, "same rate"), (0.2, 0.6, "model size faster")])
def test_same_rate_verdict_follows_the_law(alpha, beta, expected):
    """N* ~ C^(beta / (alpha + beta)) and epochs* ~ C^(alpha / (alpha + beta)): alpha = beta grows
    both at the same rate, alpha = 0.2, beta = 0.6 model size three times as fast (0.75 vs 0.25).
    Both approaches, 4 seeds, 30 design-respecting draws (the paired interval of a_N - a_D): the
    right verdict in at least 3 seeds of 4, the opposite one in none. Measured over 8 seeds at 0.3%
    noise: the surface 8 of 8 for both laws; the isoFLOP parabolas 7 of 8 (one "epochs faster")
    and 8 of 8."""
    law = rate_law(alpha, beta)
    truth = (beta - alpha) / (alpha + beta)
    verdicts: dict[str, list] = {name: [] for name in SAME_RATE}
    for seed in SEEDS:
        cs = cells(synthetic_rows(law, RATE_MODELS, RATE_BUDGETS, noise=0.003, seed=seed))
        main = _fit_all(cs, 60000)
        iv = bootstrap(cs, 60000, RATE_DRAWS, seed, main=main)
        for name in SAME_RATE:
            v = same_rate(main[name], iv[name])
            verdicts[name].append(v["verdict"])
            lo, hi = v["interval"]
            assert (lo <= 0 <= hi) == (v["verdict"] == "same rate") or v["verdict"] == "no verdict"
            assert v["a_N"] - v["epochs_exponent"] == pytest.approx(v["difference"])
        assert abs(main["surface"].a_n - main["surface"].a_d - truth) < 0.05
    for name, vs in verdicts.items():
        assert vs.count(expected) >= len(SEEDS) - 1, f"{name}: {vs}"
        assert expected != "model size faster" or "epochs faster" not in vs, f"{name}: {vs}"


def test_same_rate_refuses_without_a_compute_optimal_fit():
    """The three smallest models only: the largest is best at every budget, so the isoFLOP fit is
    refused and the same-rate report says why; without bootstrap draws there is no verdict."""
    rows = synthetic_rows(rate_law(0.3, 0.3), RATE_MODELS[:3], RATE_BUDGETS, noise=0.003, seed=0)
    r = analyze(rows, train_size=60000, draws=0)
    assert isinstance(r["optimal"], Refusal)
    assert "compute-optimal N*(C), D*(C) was not fitted" in r["same_rate"]["optimal"]["refused"]
    assert "no interior minimum: the largest model is best" in r["same_rate"]["optimal"]["refused"]
    sf = r["same_rate"]["surface"]
    assert sf.get("verdict") == "no verdict" or "refused" in sf
    assert same_rate(Refusal("x", "too few cells"), {}) == {"refused": "x was not fitted: too few cells"}


def test_cli_exits_nonzero_when_it_refuses(tmp_path, capsys, monkeypatch):
    import pipeline.scaling.fit as fit_module
    from pipeline.scaling.__main__ import REFUSED, main, refusals
    from pipeline.scaling.table import write_table

    # The report itself (plots, TensorBoard: a torch import) is test_scaling.py's; here only the exit status.
    monkeypatch.setattr(fit_module, "write_report", lambda result, out, title: f"{out}/report.md")

    _, rows = _issue_table()
    url = str(tmp_path / "results.csv")
    write_table(url, [r for r in rows if r["budget_value"] <= BUDGETS[2]])
    assert main(["fit", url, "--bootstrap", "0"]) == REFUSED
    err = capsys.readouterr().err
    assert "refused: L(C) = E + a*C^-b: 3 frontier points (budgets)" in err
    assert refusals(analyze(rows[:4], train_size=60000, draws=0)) == ["all fits: 2 usable (model, budget) cells; at least 3 are needed"]
    assert refusals(analyze(rows, train_size=60000, draws=0)) == []
