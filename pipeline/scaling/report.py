"""The fit's outputs: report.md (tables), PNG plots (matplotlib), fit.json, and the same plots and
scalars as TensorBoard events in report/tensorboard.
"""

from __future__ import annotations

import json
import math
import os

import numpy as np

from .analysis import APPROACHES
from .intervals import values
from .laws import Cell, OptimalFit, PowerFit, Refusal
from .surface import SurfaceFit

QUANTITIES = ("b", "E", "a_N", "a_D")  # frontier exponent, irreducible loss, N* and D* exponents


def _g(x, digits=4) -> str:
    return "" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:.{digits}g}"


def _end(x: float) -> str:
    return _g(x) if math.isfinite(x) else "unbounded"


def _ci(intervals: dict, fit: str, k: str) -> str:
    iv = intervals.get(fit, {}).get(k)
    return f"[{_end(iv[0])}, {_end(iv[1])}]" if iv else "n/a"


def approach_rows(result: dict) -> list[tuple[str, dict[str, str]]]:
    """(approach, {quantity: "value [95% interval]"}) for the side-by-side table; "" where an approach
    does not estimate a quantity, the reason where it refused."""
    iv = result.get("intervals", {})
    rows = []
    for name, title in APPROACHES:
        fit = result.get(name)
        if isinstance(fit, Refusal) or fit is None:
            rows.append((title, {"refused": fit.reason if fit else "not run"}))
            continue
        vals = values(fit)
        rows.append((title, {k: f"{_g(vals[k])} {_ci(iv, name, k)}" for k in QUANTITIES if k in vals and not (name == "power" and k == "E")}))
    return rows


def to_json(result: dict) -> dict:
    def enc(v):
        if isinstance(v, SurfaceFit):
            return {**{k: enc(x) for k, x in vars(v).items()}, "b": v.b, "a_N": v.a_n, "a_D": v.a_d}
        if isinstance(v, (PowerFit, OptimalFit, Cell)):
            return {k: enc(x) for k, x in vars(v).items()}
        if isinstance(v, Refusal):
            return {"refused": v.reason, "what": v.what}
        if isinstance(v, dict):
            return {k: enc(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [enc(x) for x in v]
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, (np.floating, np.integer)):
            return enc(v.item())
        return v

    keep = ("status", "metric", "train_size", "device_hours", "saturating", "power", "surface", "optimal", "finetune", "intervals",
            "same_rate", "extrapolation", "disagreements", "lr_at_edge", "refusal")  # fmt: skip
    out = {k: enc(result[k]) for k in keep if k in result}
    out["frontier"] = [c.point for c in result.get("frontier", [])]
    out["cells"] = enc(result["cells"])
    return out


# ---- plots ---------------------------------------------------------------------------------------
def _plots(result: dict, out: str) -> dict[str, object]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figs = {}
    cs: list[Cell] = result["cells"]
    models = sorted({c.model for c in cs}, key=lambda m: min(c.params for c in cs if c.model == m))
    colors = {m: plt.cm.viridis(i / max(1, len(models) - 1)) for i, m in enumerate(models)}

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for m in models:
        pts = sorted((c for c in cs if c.model == m), key=lambda c: c.compute)
        ax.plot([c.compute for c in pts], [c.loss for c in pts], "o-", color=colors[m], alpha=0.8, label=m)
    fr = result.get("frontier", [])
    if fr:
        ax.plot([c.compute for c in fr], [c.loss for c in fr], "k*", ms=11, label="frontier")
        grid = np.geomspace(min(c.compute for c in cs), max(c.compute for c in cs) * 1.5, 100)
        for name, style in (("saturating", "r--"), ("power", "b:")):
            f = result.get(name)
            if isinstance(f, PowerFit):
                lab = f"E+aC^-b, b={f.b:.3f}" if name == "saturating" else f"aC^-b, b={f.b:.3f}"
                ax.plot(grid, f(grid), style, label=lab)
        sf = result.get("surface")
        if isinstance(sf, SurfaceFit):
            ax.plot(grid, sf.optimal(grid)[2], "g-.", label=f"L*(C) of L(N, D), b={sf.b:.3f}")
    ax.set(xscale="log", yscale="log", xlabel="training compute C (FLOPs)", ylabel=f"held-out loss ({result['metric']})",
           title="held-out loss vs compute (best lr per cell)")  # fmt: skip
    ax.legend(fontsize=7)
    figs["loss_vs_compute"] = fig

    opt = result.get("optimal")
    if isinstance(opt, OptimalFit):
        fig, axes = plt.subplots(1, 2, figsize=(9, 3.8))
        lc = np.array([lv["compute"] for lv in opt.levels])
        axes[0].plot(lc, [lv["n_opt"] for lv in opt.levels], "o", color="C0")
        axes[0].plot(lc, opt.k_n * lc**opt.a_n, "C0-", label=f"N* ~ C^{opt.a_n:.2f}")
        axes[0].set(xscale="log", yscale="log", xlabel="compute (FLOPs)", ylabel="optimal parameters N*")
        axes[1].plot(lc, [lv["d_opt"] for lv in opt.levels], "o", color="C1")
        axes[1].plot(lc, opt.k_d * lc**opt.a_d, "C1-", label=f"D* ~ C^{opt.a_d:.2f}")
        axes[1].set(xscale="log", yscale="log", xlabel="compute (FLOPs)", ylabel="optimal samples D*")
        for a in axes:
            a.legend(fontsize=8)
        fig.tight_layout()
        figs["compute_optimal"] = fig

    ft = [c for c in cs if math.isfinite(c.finetune_top1)]
    if ft:
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        for m in models:
            pts = sorted((c for c in ft if c.model == m), key=lambda c: c.compute)
            if pts:
                ax.plot([c.compute for c in pts], [c.finetune_top1 for c in pts], "o-", color=colors[m], label=m)
        ax.set(xscale="log", xlabel="pretraining compute (FLOPs)", ylabel="fine-tuned top-1", title="fine-tuned accuracy vs pretraining compute")
        ax.legend(fontsize=7)
        figs["finetune_vs_compute"] = fig
    for name, fig in figs.items():
        fig.savefig(os.path.join(out, f"{name}.png"), dpi=120, bbox_inches="tight")
    return figs


def _tensorboard(result: dict, figs: dict, out: str) -> None:
    from torch.utils.tensorboard import SummaryWriter

    w = SummaryWriter(os.path.join(out, "tensorboard"))
    for name, fig in figs.items():
        w.add_figure(f"scaling/{name}", fig, close=False)
    for i, c in enumerate(result.get("frontier", [])):  # step = position along the frontier (by compute)
        w.add_scalar("frontier/loss", c.loss, i)
        w.add_scalar("frontier/log10_compute", math.log10(c.compute), i)
    for name in ("saturating", "power"):
        f = result.get(name)
        if isinstance(f, PowerFit):
            w.add_scalar(f"fit/{name}_b", f.b, 0)
            w.add_scalar(f"fit/{name}_E", f.E, 0)
    opt = result.get("optimal")
    if isinstance(opt, OptimalFit):
        w.add_scalar("fit/optimal_a_N", opt.a_n, 0)
        w.add_scalar("fit/optimal_a_D", opt.a_d, 0)
    w.close()


# ---- markdown ------------------------------------------------------------------------------------
def _side_by_side(result: dict) -> list[str]:
    lines = ["## The approaches side by side (95% bootstrap intervals)", "",
             "| approach | frontier exponent b | E | N* exponent a_N | D* exponent a_D |", "|---|---|---|---|---|"]  # fmt: skip
    for title, q in approach_rows(result):
        cols = [q.get(k, "") for k in QUANTITIES] if "refused" not in q else [f"refused: {q['refused']}", "", "", ""]
        lines.append(f"| {title} | " + " | ".join(cols) + " |")
    lines += ["", "b is the exponent of L - E along the frontier; the pure power law's b is the slope of L itself "
              "(smaller whenever E > 0), so it is not compared. \"unbounded\": the interval reaches a bound of the fit "
              "or rests on draws that could not be fitted.", ""]  # fmt: skip
    flags = result.get("disagreements", [])
    lines.append("**Approaches disagree beyond their intervals**: " + "; ".join(flags) if flags
                 else "No two approaches disagree beyond their intervals.")  # fmt: skip
    return lines + [""]


def _curve_lines(result: dict, iv: dict) -> list[str]:
    lines = ["## Fits (held-out loss on the compute-optimal frontier, one point per budget)", ""]
    for name, title in (("saturating", "L(C) = E + a*C^-b"), ("power", "L(C) = a*C^-b")):
        f = result.get(name)
        if isinstance(f, PowerFit):
            share = iv.get(name, {}).get("_ok")
            lines.append(f"- **{title}**: b = {_g(f.b)} {_ci(iv, name, 'b')}, E = {_g(f.E)} {_ci(iv, name, 'E')}, "
                         f"a = {_g(f.a)} {_ci(iv, name, 'a')}; rmse(log L) {_g(f.rmse, 3)} on {f.n} points"
                         + (f" (residual bootstrap; {share:.0%} of draws fitted)" if share is not None else ""))  # fmt: skip
        elif isinstance(f, Refusal):
            lines.append(f"- **{title}**: not fitted: {f.reason}")
    sf = result.get("surface")
    lines += ["", "## Loss surface L(N, D) = E + A*N^-alpha + B*D^-beta (Chinchilla approach 3)", ""]
    if isinstance(sf, SurfaceFit):
        lines += [f"- E = {_g(sf.E)} {_ci(iv, 'surface', 'E')}, A = {_g(sf.A)}, B = {_g(sf.B)}, alpha = {_g(sf.alpha)} "
                  f"{_ci(iv, 'surface', 'alpha')}, beta = {_g(sf.beta)} {_ci(iv, 'surface', 'beta')}; rmse(log L) {_g(sf.rmse, 3)} "
                  f"on {sf.n} cells (Huber on log L, L-BFGS-B from a grid of starts; within-budget bootstrap)",
                  f"- FLOPs per image F(N) = {_g(sf.k_f)} * N^{_g(sf.phi, 3)}; so N* ~ C^{_g(sf.a_n, 3)}, D* ~ C^{_g(sf.a_d, 3)}, "
                  f"L*(C) - E ~ C^-{_g(sf.b, 3)}"]  # fmt: skip
        if sf.at_bound:
            lines.append(f"- ended on a bound: {', '.join(sf.at_bound)} (those intervals are unbounded)")
    elif isinstance(sf, Refusal):
        lines.append(f"Not fitted: {sf.reason}")
    return lines


def _extrapolation_lines(ex) -> list[str]:
    lines = ["", "## Extrapolation check (fit without the largest budget, predict it)", ""]
    if isinstance(ex, Refusal):
        return lines + [f"Not run: {ex.reason}"]
    if not isinstance(ex, dict):
        return lines
    lines.append(f"Held out: budget {ex['held_out_budget']}, best loss {_g(ex['actual_loss'])} ({ex['model']}) at C = {_g(ex['compute'])}; "
                 f"95% prediction intervals from {ex['draws']} bootstrap draws.")  # fmt: skip
    for name in ("saturating", "power", "surface"):
        e = ex[name]
        if "predicted_loss" in e:
            lo, hi = e["interval"]
            lines.append(f"- {name}: predicted {_g(e['predicted_loss'])} [{_end(lo)}, {_end(hi)}], relative error "
                         f"{e['relative_error']:+.1%}: **{e['verdict']}**")  # fmt: skip
        else:
            lines.append(f"- {name}: not fitted: {e['refused']}")
    return lines


def _same_rate_lines(result: dict) -> list[str]:
    lines = ["", "## Do model size and epochs grow at the same rate?", "",
             "\"ConvNets Match Vision Transformers at Scale\" (Smith et al. 2023): compute-optimal model size and training "
             "epochs grow at the same rate. Here N* ~ C^a_N and epochs* = D* / (images per epoch) ~ C^a_D; the verdict "
             "rests on the 95% bootstrap interval of a_N - a_D, both exponents from the same draws (paired).", "",
             "| approach | N* exponent a_N | epochs* exponent a_D | a_N - a_D [95% interval] | verdict |", "|---|---|---|---|---|"]  # fmt: skip
    titles = dict(APPROACHES)
    for name, v in result.get("same_rate", {}).items():
        if "refused" in v:
            lines.append(f"| {titles[name]} | | | | refused: {v['refused']} |")
            continue
        ends = ", ".join("n/a" if math.isnan(x) else _end(x) for x in v["interval"])
        lines.append(f"| {titles[name]} | {_g(v['a_N'], 3)} | {_g(v['epochs_exponent'], 3)} | {_g(v['difference'], 3)} [{ends}] | "
                     f"**{v['line']}** |")  # fmt: skip
    return lines + ["", "With training FLOPs per image F(N) ~ N^phi, C ~ N^phi D, so phi a_N + a_D = 1: the same rate is "
                    "1 / (1 + phi) each (0.5 under the 6ND rule). On the surface a_N - a_D = (beta - alpha) / (alpha + phi beta)."]  # fmt: skip


def _cost_lines(result: dict) -> list[str]:
    """The sweep's device-hours in parts that add up (table.device_hour_totals)."""
    dh = result.get("device_hours") or {}
    if not math.isfinite(dh.get("total", math.nan)):
        return ["", "Device-hours: not recorded in this table."]
    return ["", "## Compute spent (device-hours)", "",
            "Every attempt's Ray task, from submission to its end (start-up, data, training, evaluation, export), times the "
            "devices (workers) it held, failed attempts included (docs/scaling.md, \"What a run costs\").", "",
            "| part | device-hours |", "|---|---|",
            f"| pretraining, attempts that finished their run | {_g(dh['pretraining'])} |",
            f"| (of which runs that diverged) | {_g(dh['diverged'])} |",
            f"| fine-tuning, attempts that finished their run | {_g(dh['finetuning'])} |",
            f"| failed attempts (pretraining and fine-tuning; retried or given up) | {_g(dh['failed'])} |",
            f"| **total** | **{_g(dh['total'])}** |"]  # fmt: skip


def _fit_lines(result: dict) -> list[str]:
    iv = result.get("intervals", {})
    lines = _side_by_side(result) + _curve_lines(result, iv)
    opt = result.get("optimal")
    lines += ["", "## Compute-optimal allocation (isoFLOP parabolas in log N)", ""]
    if isinstance(opt, OptimalFit):
        lines += [f"- N*(C) = {_g(opt.k_n)} * C^{_g(opt.a_n, 3)}, exponent 95% interval {_ci(iv, 'optimal', 'a_N')}",
                  f"- D*(C) = {_g(opt.k_d)} * C^{_g(opt.a_d, 3)} samples, exponent 95% interval {_ci(iv, 'optimal', 'a_D')}",
                  f"- so for 10x the compute: {10**opt.a_n:.2f}x the parameters and {10**opt.a_d:.2f}x the samples "
                  "(the paper's rule of thumb: grow both at the same rate, ~C^0.5 each)", "",
                  "| compute (FLOPs) | N* (params) | D* (samples) | epochs* | loss at N* | models |", "|---|---|---|---|---|---|"]  # fmt: skip
        lines += [f"| {_g(lv['compute'])} | {_g(lv['n_opt'])} | {_g(lv['d_opt'])} | {_g(lv['epochs_opt'], 3)} | {_g(lv['loss_opt'])} | {lv['models']} |"
                  for lv in opt.levels]  # fmt: skip
        for r in opt.skipped:
            lines.append(f"- level {r.what} skipped: {r.reason}")
    elif isinstance(opt, Refusal):
        lines.append(f"Not fitted: {opt.reason}")
    lines += _same_rate_lines(result)
    ft = result.get("finetune")
    lines += ["", "## Fine-tuned accuracy against pretraining compute", ""]
    if isinstance(ft, PowerFit):
        lines.append(f"- error = 1 - top-1 = {_g(ft.a)} * C^-{_g(ft.b, 3)}, exponent 95% interval {_ci(iv, 'finetune', 'b')}")
    elif isinstance(ft, Refusal):
        lines.append(f"- error(C) not fitted: {ft.reason}")
    return lines + _extrapolation_lines(result.get("extrapolation"))


def write_report(result: dict, out: str, title: str = "Scaling sweep") -> str:
    """Write report.md, *.png, fit.json and tensorboard/ into the local folder `out`; returns report.md's path."""
    os.makedirs(out, exist_ok=True)
    cs: list[Cell] = result["cells"]
    figs = _plots(result, out) if cs else {}
    lines = [f"# {title}", "", f"Runs by status: {result['status']}. Fits use the best lr per (model, budget) "
             f"on held-out loss ({result['metric']}); diverged and failed runs are listed, never fitted.", ""]  # fmt: skip
    if "refusal" in result:
        lines += [f"**No fit**: {result['refusal'].reason}.", ""]
    lines += ["| model | params | budget | compute (FLOPs) | samples | epochs | best lr | lrs tried | loss | frontier | fine-tuned top-1 |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    on_frontier = {id(c) for c in result.get("frontier", [])}
    for c in cs:
        lines.append(f"| {c.model} | {_g(c.params)} | {c.budget} | {_g(c.compute)} | {_g(c.samples)} | {_g(c.epochs, 3)} | {_g(c.lr)} | "
                     f"{', '.join(_g(x) for x in c.lrs_tried)} | {_g(c.loss)} | {'*' if id(c) in on_frontier else ''} | {_g(c.finetune_top1, 3)} |")  # fmt: skip
    if result.get("lr_at_edge"):
        lines += ["", "Best lr at the edge of its grid (the optimum may lie outside; widen the grid): " + "; ".join(result["lr_at_edge"])]
    if result["excluded"]:
        lines += ["", "Not fitted: " + "; ".join(f"{r['point']} ({r['status']}{': ' + str(r.get('error'))[:120] if r.get('error') else ''})"
                                                 for r in result["excluded"])]  # fmt: skip
    lines += _cost_lines(result)
    if "refusal" not in result:
        lines += [""] + _fit_lines(result)
    lines += ["", "## Plots", ""] + [f"![{n}]({n}.png)" for n in figs]
    path = os.path.join(out, "report.md")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.join(out, "fit.json"), "w") as f:
        json.dump(to_json(result), f, indent=1)
    if figs:
        _tensorboard(result, figs, out)
        import matplotlib.pyplot as plt

        for fig in figs.values():
            plt.close(fig)
    return path
