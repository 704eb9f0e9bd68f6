"""Science check: the same NFNet with and without AGC at global batch 4096, linearly scaled lr.

    python docs/agc_experiment.py [--epochs 3] [--res 16]

Trains nfnet_pico on the packed sample corpus (data/fashion-mnist, `make demo` creates it) twice
with lr = 0.1 x 4096/256 = 1.6 (warm-up 1 epoch, cosine), once with AGC (lambda 0.01) and once
without, then plots training loss and prints the held-out results. Writes docs/agc-large-batch.png.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--epochs", type=float, default=3)
    ap.add_argument("--res", type=int, default=16)
    ap.add_argument("--data", default=str(ROOT / "data" / "fashion-mnist"))
    args = ap.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import ray
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from pipeline.config import resolve
    from pipeline.train.ray_job import fit

    ray.init(include_dashboard=False, log_to_driver=False)
    storage = tempfile.mkdtemp(prefix="agc-exp-")
    results = {}
    for name, clip in (("agc", 0.01), ("no_agc", 0.0)):
        cfg = resolve("demo", [
            f"data.root={args.data}", f"aug.train_res={args.res}", f"aug.eval_res={args.res}", "aug.randaug_layers=0",
            "schedule.global_batch=4096", "schedule.micro_batch=256", f"schedule.epochs={args.epochs}",
            "schedule.eval_every=0", "schedule.ckpt_every=0", "schedule.log_every=1", "optim.lr_base=0.1",
            "optim.warmup_epochs=1", f"optim.agc_clip={clip}", f"run.storage={storage}", f"run.name={name}",
            "run.max_failures=0", "schedule.max_bad_steps=1000",
        ])  # fmt: skip
        fit(cfg)
        acc = EventAccumulator(f"{storage}/{name}/tensorboard")
        acc.Reload()
        loss = [(e.step, e.value) for e in acc.Scalars("train/loss")]
        summary = json.loads(Path(storage, name, "export", "summary.json").read_text())
        results[name] = {"loss": loss, "summary": summary}
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, r in results.items():
        ax.plot([s for s, _ in r["loss"]], [min(v, 10) for _, v in r["loss"]], label=name.replace("_", " "))
    ax.set_xlabel("step (4096 images each)")
    ax.set_ylabel("training loss (clipped at 10)")
    ax.set_title(f"nfnet_pico, batch 4096, lr 1.6, {args.res}px fashion-mnist")
    ax.legend()
    fig.tight_layout()
    fig.savefig(ROOT / "docs" / "agc-large-batch.png", dpi=120)
    for name, r in results.items():
        s = r["summary"]
        print(f"{name:7s} final train loss {r['loss'][-1][1]:.4f}  max train loss {max(v for _, v in r['loss']):.4f}  "
              f"held-out loss {s.get('heldout_raw_loss', float('nan')):.4f} top-1 {s.get('heldout_raw_top1', float('nan')):.3f}  "
              f"skipped steps {s['skipped_steps']}")  # fmt: skip


if __name__ == "__main__":
    main()
