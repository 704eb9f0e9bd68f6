"""Multi-node scaling efficiency: images/s of a 2-node run against a 1-node run of the same global batch.

    python bench/scaling_efficiency.py --netns          # here: two namespace "hosts", one CPU worker each (needs root)
    RAY_ADDRESS=HEAD:6379 python bench/scaling_efficiency.py --workers-per-node 8 --preset f7 \\
        --set data.root=s3://BUCKET/imagenet-wds --set schedule.samples=200000 --storage s3://BUCKET/bench
                                                        # a real GPU cluster, unchanged

Both runs are the real trainer (Ray Train + DeepSpeed + AGC + the loader) with the same global
batch: 1 node runs k workers with 2a accumulation steps, 2 nodes run 2k workers with a. Throughput
is the median of the trainer's own perf/images_per_s after the first quarter of the run (warm-up).
Communication: inside the same worker layout, the gradient's all-reduce (fp32, one per optimizer
step at ZeRO-0) is timed on its own; its share of the step time is printed. On a 2-core machine
the two "nodes" share the cores and a veth, so the ratio says little about real clusters.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _allreduce_worker(config: dict) -> None:
    import ray.train
    import torch
    import torch.distributed as dist

    buf = torch.ones(config["numel"], device="cuda" if config["gpu"] else "cpu")
    times = []
    for i in range(config["reps"] + 2):
        dist.barrier()
        if config["gpu"]:
            torch.cuda.synchronize()
        t = time.perf_counter()
        dist.all_reduce(buf)
        if config["gpu"]:
            torch.cuda.synchronize()
        if i >= 2:  # the first calls set up the communicator
            times.append(time.perf_counter() - t)
    # Ray Train V2 returns metrics only with a checkpoint: rank 0 reports the figure in one.
    import json
    import tempfile

    if ray.train.get_context().get_world_rank() == 0:
        d = tempfile.mkdtemp()
        Path(d, "allreduce.json").write_text(json.dumps({"allreduce_s": statistics.median(times)}))
        ray.train.report({}, checkpoint=ray.train.Checkpoint.from_directory(d))
    else:
        ray.train.report({})


def allreduce_seconds(numel: int, workers: int, placement: str, gpu: bool, storage: str, endpoint: str | None) -> float:
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from pipeline.train.ray_job import storage_args

    trainer = TorchTrainer(
        _allreduce_worker, train_loop_config={"numel": numel, "reps": 10, "gpu": gpu},
        torch_config=TorchConfig(backend="nccl" if gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=gpu, placement_strategy=placement),
        run_config=RunConfig(name=f"allreduce-{workers}-{int(time.time())}", **storage_args(storage, endpoint)),  # shared: rank 0 may be elsewhere
    )  # fmt: skip
    import json

    with trainer.fit().checkpoint.as_directory() as d:
        return float(json.loads(Path(d, "allreduce.json").read_text())["allreduce_s"])


def images_per_s(run: str, endpoint: str | None) -> float:
    """Median of the trainer's perf/images_per_s after the first quarter (TensorBoard events in the
    run dir; for S3 storage they are uploaded at the end), else samples / wall time from results.json."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from data_prep.storage import Store

    store = Store(f"{run}/tensorboard", endpoint)
    with tempfile.TemporaryDirectory() as tmp:
        for name in store.list():
            Path(tmp, name).parent.mkdir(parents=True, exist_ok=True)
            Path(tmp, name).write_bytes(store.read_bytes(name))
        acc = EventAccumulator(tmp)
        acc.Reload()
        if "perf/images_per_s" in acc.Tags().get("scalars", []):
            vals = [e.value for e in acc.Scalars("perf/images_per_s")]
            return statistics.median(vals[len(vals) // 4 :])
    import json

    t = json.loads(Store(run, endpoint).read_bytes("results.json"))["training"]
    return t["samples_seen"] / t["wall_time_s"]


def one_layout(args, nodes: int) -> dict:
    from models import create_model
    from pipeline.config import resolve
    from pipeline.train.ray_job import fit

    k = args.workers_per_node
    workers = k * nodes
    accum = args.accum * (2 // nodes)  # same global batch: 1 node accumulates twice as much
    placement = "STRICT_PACK" if nodes == 1 else ("STRICT_SPREAD" if k == 1 else "PACK")
    name = f"scaling-{nodes}node-{int(time.time())}"
    cfg = resolve(args.preset, args.set + [
        f"run.num_workers={workers}", f"run.placement={placement}", f"run.name={name}", f"run.storage={args.storage}",
        f"schedule.global_batch={args.micro * accum * workers}", f"schedule.micro_batch={args.micro}",
        "schedule.eval_every=0", "schedule.ckpt_every=0", "schedule.log_every=1", "run.max_failures=0", "run.export=false",
    ])  # fmt: skip
    if not cfg.data.root.startswith("s3://"):
        cfg.data.root = os.path.abspath(cfg.data.root)
    t = time.time()
    fit(cfg)
    wall = time.time() - t
    endpoint = cfg.data.s3_endpoint or None
    ips = images_per_s(f"{args.storage.rstrip('/')}/{name}", endpoint)
    from data_prep.manifest import load_manifest

    classes = len(load_manifest(cfg.data.root, endpoint)["classes"])
    model = create_model(cfg.model.name, classes, width_mult=cfg.model.width_mult, depth_mult=cfg.model.depth_mult,
                         device="meta", **cfg.model.overrides)  # fmt: skip
    ar = allreduce_seconds(sum(p.numel() for p in model.parameters()), workers, placement, cfg.run.use_gpu, args.storage, endpoint)
    step = cfg.schedule.global_batch / ips
    return {"nodes": nodes, "workers": workers, "accum": accum, "global_batch": cfg.schedule.global_batch, "images_per_s": ips,
            "step_s": step, "allreduce_s": ar, "comm_share": ar / step, "wall_s": wall}  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--netns", action="store_true", help="build two namespace hosts on this machine and run inside them")
    ap.add_argument("--workers-per-node", type=int, default=1)
    ap.add_argument("--micro", type=int, default=32)
    ap.add_argument("--accum", type=int, default=1, help="accumulation steps of the 2-node run (1 node: twice this)")
    ap.add_argument("--preset", default="demo")
    ap.add_argument("--set", action="append", default=[])
    ap.add_argument("--storage", default="", help="run storage (shared: s3:// on a real cluster); default a temp dir")
    args = ap.parse_args()
    if args.netns:
        return in_namespaces(args)
    if not args.set and args.preset == "demo":  # the CPU default: a tiny model, short runs
        args.set = [f"data.root={REPO / 'data' / 'fashion-mnist'}", "data.workers=0", "aug.train_res=32", "aug.eval_res=32",
                    "schedule.epochs=0", "schedule.samples=12800"]  # fmt: skip
    args.storage = args.storage or tempfile.mkdtemp(prefix="bench-scaling-")
    import ray

    ray.init(address=os.environ.get("RAY_ADDRESS", "auto"), log_to_driver=False)
    one, two = one_layout(args, 1), one_layout(args, 2)
    for r in (one, two):
        print(f"{r['nodes']} node(s): {r['workers']} workers x micro {args.micro} x accum {r['accum']} = global {r['global_batch']}: "
              f"{r['images_per_s']:.0f} img/s, step {r['step_s'] * 1e3:.0f} ms, gradient all-reduce {r['allreduce_s'] * 1e3:.1f} ms "
              f"({r['comm_share']:.1%} of the step)")  # fmt: skip
    ratio = two["images_per_s"] / one["images_per_s"]
    print(f"ratio 2-node / 1-node images/s: {ratio:.3f}  (scaling efficiency {ratio / 2:.1%} of linear)")
    return 0


def in_namespaces(args) -> int:
    """Build two hosts (infra/netns.py), re-run this script inside the first, tear them down."""
    from infra.netns import Hosts, can_create_namespaces

    why = can_create_namespaces()
    if why:
        print(f"--netns: {why}", file=sys.stderr)
        return 2
    if not (REPO / "data" / "fashion-mnist" / "manifest.json").exists():
        subprocess.run([sys.executable, "-m", "data_prep", "pack", "fashion-mnist", str(REPO / "data" / "fashion-mnist"),
                        "--heldout-fraction", "0.02", "--no-progress"], check=True, cwd=REPO)  # fmt: skip
    h = Hosts()
    try:
        h.up()
        argv = [a for a in sys.argv[1:] if a != "--netns"]
        out = h.run("a", sys.executable, str(Path(__file__).resolve()), *argv, timeout=1800)
        print(out.stdout, end="")
        return 0
    finally:
        h.down()


if __name__ == "__main__":
    sys.exit(main())
