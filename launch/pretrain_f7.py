"""Pretrain an NFNet: `ray job submit --working-dir . -- python launch/pretrain_f7.py [--preset f7] [--set k=v ...]`.

Thin: resolve the config, connect to Ray, run the trainer, say where the results are.
"""

from __future__ import annotations

import sys

from _common import absolutize, check_cluster, connect_ray, guard, parse, preflight, print_config  # also puts the project on sys.path

from pipeline.config import resolve
from pipeline.train.ray_job import fit, save_config


def main() -> None:
    args = parse(__doc__.splitlines()[0], default_preset="f7")
    cfg = absolutize(resolve(args.preset, args.set))
    if args.print_config:
        print_config(cfg, full=True)
        return
    print_config(cfg)
    print(f"global batch {cfg.schedule.global_batch} = micro {cfg.schedule.micro_batch} x accum {cfg.accum_steps} "
          f"x workers {cfg.run.num_workers}; peak lr {cfg.peak_lr:g}", flush=True)  # fmt: skip
    preflight(cfg)
    connect_ray()
    check_cluster(cfg)
    print(f"config saved to {save_config(cfg)}", flush=True)
    result = fit(cfg)
    run = f"{cfg.run.storage.rstrip('/')}/{cfg.run.name}"
    print(f"\nrun directory: {run}")
    print(f"  tensorboard: {run}/tensorboard    (tensorboard --logdir {run}/tensorboard --host 127.0.0.1)")
    print(f"  export for fine-tuning: {run}/export")
    if result.checkpoint is not None:
        print(f"  latest checkpoint: {result.checkpoint.path}")
    metrics = result.metrics or {}
    print("  final metrics: " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items()))


if __name__ == "__main__":
    sys.exit(guard(main))
