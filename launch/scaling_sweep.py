"""Scaling-law sweep: `ray job submit --working-dir . -- python launch/scaling_sweep.py configs/sweeps/demo.yaml [--set key=value]`.

Pretrains every (model, budget, lr, seed) of the SPEC with the same trainer, fine-tunes the
selected runs, writes {storage}/{name}/results.csv after every run, and fits the scaling laws into
{storage}/{name}/report (report.md, PNGs, fit.json, TensorBoard). Re-running the same command
resumes: finished runs are skipped, failed ones retried, diverged ones kept out of the fits.
"""

from __future__ import annotations

import argparse
import json
import sys

import os

from _common import PATH_KEYS, connect_ray, guard, is_relative, submit_base  # also puts the project on sys.path

from pipeline.scaling.__main__ import summarize
from pipeline.sweep.runner import Sweep, run_sweep
from pipeline.sweep.spec import load_spec


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("spec", help="a sweep SPEC (YAML or JSON), e.g. configs/sweeps/demo.yaml")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a top-level SPEC field, e.g. --set parallel=2")
    ap.add_argument("--point-set", action="append", default=[], metavar="KEY=VALUE",
                    help="append a training-config override to every point's `set`, e.g. --point-set data.root=/abs/data")
    ap.add_argument("--finetune-set", action="append", default=[], metavar="KEY=VALUE",
                    help="append an override to finetune.set, e.g. --finetune-set data.source=/abs/imagenet")
    ap.add_argument("--plan", action="store_true", help="print the grid (params, FLOPs per image, steps, compute) and exit")
    ap.add_argument("--retry-failed", action="store_true", help="also retry points that used up their retries")
    ap.add_argument("--no-fit", action="store_true", help="train only; fit later with python -m pipeline.scaling fit")
    ap.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    args = ap.parse_args()
    base = submit_base()
    if base is None:  # in Ray's copy of the working dir, with no submit dir on this machine
        spec = load_spec(args.spec, args.set)
        path_keys = {f"{section}.{key}" for section, key in PATH_KEYS}
        sets = [s.split("=", 1) for s in args.point_set + args.finetune_set if "=" in s]
        relative = [f"storage={spec.storage}"] if is_relative(spec.storage) else []
        relative += [f"{k}={v}" for k, v in sets if k in path_keys and is_relative(v) and v != "fashion-mnist"]
        if relative:
            raise ValueError(f"{', '.join(relative)}: relative paths, but this job runs in Ray's copy of the working directory: "
                             "use absolute or s3:// paths, or submit with launch/submit.py (a local cluster)")  # fmt: skip
    elif base != os.getcwd():
        os.chdir(base)  # the SPEC's relative paths (storage, data) mean what they mean where the user submitted
    spec = load_spec(args.spec, args.set)
    spec.set += args.point_set
    spec.finetune.set += args.finetune_set
    if args.plan:
        rows = Sweep(spec, log=lambda *_: None).plan()
        for r in rows:
            print(f"{r['point']:<44} params {r['params']:>11,}  {r['flops_per_image']:.3g} FLOPs/img  {r['steps']:>6} steps  "
                  f"{r['train_flops']:.3g} FLOPs  {r['status']}")  # fmt: skip
        print(f"total {sum(r['train_flops'] for r in rows):.3g} training FLOPs in {len(rows)} runs")
        return
    connect_ray()
    out = run_sweep(spec, retry_failed=args.retry_failed, fit=not args.no_fit)
    counts = {}
    for r in out["rows"]:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    print(f"\nresults table: {out['table']}  ({json.dumps(counts)})")
    if "result" in out:
        print(summarize(out["result"]))
        print(f"report: {out['report']}")


if __name__ == "__main__":
    sys.exit(guard(main))
