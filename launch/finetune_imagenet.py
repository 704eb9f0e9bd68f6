"""Fine-tune or evaluate a pretrained NFNet: `ray job submit --working-dir . -- python launch/finetune_imagenet.py [--preset finetune] [--set k=v ...] [--eval-only]`.

The same trainer and config as pretraining (preset `finetune`): model.init_from is a pretraining
export, a run directory, a Ray Train checkpoint or a timm/converted weights file (local or s3://);
data.source is ImageNet in class folders (or flat val/ + data.val_labels), packed into shards first,
or data.root is an existing data_prep output. --eval-only evaluates model.init_from on
data.eval_split (top-1, top-5, loss; raw and EMA) without training. Results: {storage}/{name}/results.json.
"""

from __future__ import annotations

import json
import sys

from _common import absolutize, check_cluster, connect_ray, guard, parse, preflight, print_config  # also puts the project on sys.path

from data_prep.storage import Store
from pipeline.config import resolve
from pipeline.finetune.prepare import prepare_data
from pipeline.train.ray_job import fit, save_config


def main() -> None:
    def extra(ap):
        ap.add_argument("--eval-only", action="store_true", help="evaluate model.init_from on data.eval_split; no training")

    args = parse(__doc__.splitlines()[0], default_preset="finetune", extra=extra)
    sets = args.set + (["run.mode=eval", "run.export=false"] if args.eval_only else [])
    cfg = absolutize(resolve(args.preset, sets))
    if args.print_config:
        print_config(cfg, full=True)
        return
    print_config(cfg)
    preflight(cfg, data=False)  # the data may still have to be packed (prepare_data checks it then)
    connect_ray()
    check_cluster(cfg)
    prepare_data(cfg, use_ray=True)
    print(f"config saved to {save_config(cfg)}", flush=True)
    fit(cfg)
    run = f"{cfg.run.storage.rstrip('/')}/{cfg.run.name}"
    results = json.loads(Store(run, cfg.data.s3_endpoint or None).read_bytes("results.json"))
    print(f"\nrun directory: {run}\n  results: {run}/results.json")
    for tag in ("raw", "ema"):
        if tag in results:
            r = results[tag]
            print(f"  {tag:>3}: top-1 {r['top1']:.4f}  top-5 {r['top5']:.4f}  loss {r['loss']:.4f}  "
                  f"on {results['samples']} {results['split']} images at {results['eval_res']} px")  # fmt: skip
    if cfg.run.mode == "train" and cfg.run.export:
        print(f"  fine-tuned export: {run}/export")


if __name__ == "__main__":
    sys.exit(guard(main))
