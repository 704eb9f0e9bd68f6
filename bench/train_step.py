"""Step throughput of our stack (Ray Train + DeepSpeed + AGC) against plain PyTorch DDP, one run.

    python bench/train_step.py [--model nfnet_nano] [--res 64] [--micro 32] [--accum 2] [--steps 6]
    python bench/train_step.py --gpu          # NFNet-F0 at 192 px, bf16, one GPU: img/s and MFU

Inside one Ray Train run with `--workers` workers, each worker builds the same model twice, as a
DeepSpeed engine with AGC at the accumulation boundary (our trainer's step) and as a plain
torch DDP model with no_sync accumulation, AGC on p.grad and torch SGD (the same math), and times
them step by step, alternating, on the same in-memory batches (no loader in either). It prints
the overhead of ours over plain and the share of AGC in our step.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def worker(config: dict) -> None:
    import os

    import deepspeed
    import ray.train
    import torch

    from models import create_model
    from pipeline.train.agc import adaptive_grad_clip_
    from pipeline.config import resolve
    from pipeline.train.step import SkippableSGD, agc_at_boundary, deepspeed_config, soft_cross_entropy

    gpu = config["gpu"]
    device = torch.device("cuda", ray.train.get_context().get_local_rank()) if gpu else torch.device("cpu")
    if not gpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        torch.set_num_threads(1)
    world = ray.train.get_context().get_world_size()
    cfg = resolve("demo", [f"schedule.micro_batch={config['micro']}", f"run.num_workers={world}",
                           f"schedule.global_batch={config['micro'] * config['accum'] * world}", f"run.zero_stage={config['zero']}"])  # fmt: skip
    torch.manual_seed(0)

    def build():
        m = create_model(config["model"], num_classes=1000).to(device)
        return m, SkippableSGD(m.param_groups(2e-5), lr=0.1, momentum=0.9, nesterov=True)

    model, opt = build()
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=deepspeed_config(cfg, gpu), dist_init_required=False)
    plain, plain_opt = build()
    ddp = torch.nn.parallel.DistributedDataParallel(plain)
    exclude = model.agc_exclude_names()
    xs = [torch.randn(config["micro"], 3, config["res"], config["res"], device=device) for _ in range(config["accum"])]
    ys = [torch.softmax(torch.randn(config["micro"], 1000, device=device), -1) for _ in range(config["accum"])]
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=gpu)
    sync = torch.cuda.synchronize if gpu else (lambda: None)

    def ours() -> tuple[float, float]:
        sync()
        t0, agc = time.perf_counter(), 0.0
        for a, (x, y) in enumerate(zip(xs, ys)):
            with amp:
                loss = soft_cross_entropy(engine(x), y)
            engine.backward(loss)
            if a == len(xs) - 1:
                sync()
                t1 = time.perf_counter()
                agc_at_boundary(engine.module, exclude, 0.01, 1e-3, config["zero"])
                sync()
                agc = time.perf_counter() - t1
            engine.step()
        sync()
        return time.perf_counter() - t0, agc

    def reference() -> float:
        sync()
        t0 = time.perf_counter()
        for a, (x, y) in enumerate(zip(xs, ys)):
            # gradients all-reduced only on the last micro-batch, as DeepSpeed does
            with ddp.no_sync() if a < len(xs) - 1 else contextlib.nullcontext():
                with amp:
                    loss = soft_cross_entropy(ddp(x), y) / len(xs)
                loss.backward()
        adaptive_grad_clip_(((p, p.grad) for n, p in plain.named_parameters() if n not in exclude), 0.01, 1e-3)
        plain_opt.step()
        plain_opt.zero_grad(set_to_none=True)
        sync()
        return time.perf_counter() - t0

    ours(), reference()  # warm-up
    t_ours, t_agc, t_ref = [], [], []
    for _ in range(config["steps"]):
        t, a = ours()
        t_ours.append(t)
        t_agc.append(a)
        t_ref.append(reference())
    if ray.train.get_context().get_world_rank() == 0:  # the driver runs on this machine (single-node bench)
        Path(config["out"]).write_text(json.dumps({"ours": statistics.median(t_ours), "agc": statistics.median(t_agc),
                                                   "plain": statistics.median(t_ref)}))  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="nfnet_nano")
    ap.add_argument("--res", type=int, default=64)
    ap.add_argument("--micro", type=int, default=32)
    ap.add_argument("--accum", type=int, default=2)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--zero", type=int, default=0)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--gpu", action="store_true", help="NFNet-F0, 192 px, bf16, 1 GPU worker; prints img/s and MFU")
    args = ap.parse_args()
    if args.gpu:
        args.model, args.res, args.micro, args.accum, args.workers, args.zero = "nfnet_f0", 192, 128, 1, 1, 1
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    ray.init(include_dashboard=False, log_to_driver=False)
    out = Path("/tmp/nfnet-bench") / f"train-step-{int(time.time())}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    args.out = str(out)
    env = {} if args.gpu else {"DS_ACCELERATOR": "cpu"}
    trainer = TorchTrainer(
        worker, train_loop_config=vars(args),
        torch_config=TorchConfig(backend="nccl" if args.gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=args.workers, use_gpu=args.gpu, resources_per_worker={"CPU": 1}),
        run_config=RunConfig(storage_path="/tmp/nfnet-bench", name=f"train-step-{int(time.time())}", worker_runtime_env={"env_vars": env}),
    )  # fmt: skip
    trainer.fit()
    m = json.loads(out.read_text())
    images = args.micro * args.accum * args.workers
    print(json.dumps(vars(args)))
    print(f"ours (Ray Train + DeepSpeed ZeRO-{args.zero} + AGC): {m['ours'] * 1e3:.1f} ms/step, {images / m['ours']:.1f} img/s")
    print(f"plain torch DDP, same math:                 {m['plain'] * 1e3:.1f} ms/step, {images / m['plain']:.1f} img/s")
    print(f"OVERHEAD ours/plain - 1: {m['ours'] / m['plain'] - 1:+.3f}  (goal <= +0.10)")
    print(f"AGC share of our step: {m['agc'] / m['ours']:.3f}  (goal <= 0.05)")
    if args.gpu:
        from models import resolve_config
        from models.flops import train_flops_per_image

        fpi = train_flops_per_image(resolve_config("nfnet_f0"), 192)
        ips = images / m["ours"]
        print(f"NFNet-F0 192px bf16: {ips:.0f} img/s, MFU {ips * fpi / 989e12:.3f} of an H100's 989 TFLOP/s dense bf16 (goal >= 5700 img/s)")


if __name__ == "__main__":
    main()
