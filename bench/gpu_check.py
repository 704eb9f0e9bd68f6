"""The prepared GPU check (bench/gpu_check.sh calls it): one table, at most 8 minutes on one H100/H200.

    bash bench/gpu_check.sh             # on a machine with a GPU and this project's stack installed
    bash bench/gpu_check.sh --dry-run   # the same sections on CPU with a tiny model (tests run it)

Sections, each a part of the table:
1. speed: NFNet-F0 at 192 px, bf16 autocast on fp32 weights (docs/precision.md), SGD + AGC on one
   device; images/s and MFU (dense bf16 peak from pipeline.train.step) for eager vs torch.compile
   and NCHW vs channels-last, each at the largest micro-batch of MICRO_CANDIDATES that fits.
   Goal: >= 5,700 img/s (25% MFU at 43 GFLOP per training image) on an H100-class GPU; MLPerf's
   ResNet-50 trains at 7.16k img/s per H100, about 18% MFU.
2. zero: ZeRO 0, 1 and 2 on one device, 3 steps of our trainer's step (DeepSpeed engine, AGC at the
   accumulation boundary) from the same weights and batches: max weight difference against ZeRO-0.
3. pretrain: `launch/pretrain_f7.py` (the f7 preset) with nfnet_f0 at width 1/4 on a synthetic
   corpus for 60 steps, evaluation, a checkpoint every 10 steps, a training worker SIGKILLed after
   its third checkpoint: it resumes and finishes all steps.
The dry run uses nfnet_pico at depth 1/4, 16 px, 12 pretraining steps, and torch.compile's
aot_eager backend (the same tracing, without inductor's C++ build, which takes minutes on 2 cores;
tests/test_train.py checks inductor's numerics).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
MICRO_CANDIDATES = (256, 192, 128, 96, 64, 32)


def _free(device) -> None:
    import gc

    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _dist_init(device) -> None:
    import torch.distributed as dist

    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=0, world_size=1)


def _build(spec: dict, device):
    import torch

    from models import create_model

    torch.manual_seed(0)
    m = create_model(spec["model"], num_classes=1000, width_mult=spec.get("width", 1.0), depth_mult=spec.get("depth", 1.0),
                     stochdepth_rate=0.0, drop_rate=0.0).to(device)  # fmt: skip
    return m


def speed(spec: dict, device, compile_: bool, channels_last: bool, steps: int) -> dict:
    """images/s of one training step (forward+backward in bf16 autocast, AGC, SGD) at the largest micro-batch that fits."""
    import torch

    from models import resolve_config
    from models.flops import train_flops_per_image
    from pipeline.train.agc import adaptive_grad_clip_
    from pipeline.train.step import peak_bf16_flops, soft_cross_entropy

    fmt = torch.channels_last if channels_last else torch.contiguous_format
    for micro in spec["micro"]:
        model = _build(spec, device)
        opt = torch.optim.SGD(model.param_groups(2e-5), lr=0.1, momentum=0.9, nesterov=True)
        exclude = model.agc_exclude_names()
        fwd = torch.compile(model, backend=spec["backend"]) if compile_ else model
        x = torch.randn(micro, 3, spec["res"], spec["res"], device=device).contiguous(memory_format=fmt)
        y = torch.softmax(torch.randn(micro, 1000, device=device), -1)

        def step():
            with torch.autocast(device.type, dtype=torch.bfloat16):
                loss = soft_cross_entropy(fwd(x), y)
            loss.backward()
            adaptive_grad_clip_(((p, p.grad) for n, p in model.named_parameters() if n not in exclude), 0.01, 1e-3)
            opt.step()
            opt.zero_grad(set_to_none=True)

        try:
            for _ in range(2):  # compilation and autotuning happen here
                step()
            sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
            sync()
            t0 = time.perf_counter()
            for _ in range(steps):
                step()
            sync()
        except torch.OutOfMemoryError:
            oom = True
        else:
            oom = False
        if oom:  # outside the except block, so the failed step's frames (and activations) are gone
            del model, opt, fwd, x, y
            _free(device)
            continue
        ips = micro * steps / (time.perf_counter() - t0)
        fpi = train_flops_per_image(resolve_config(spec["model"], width_mult=spec.get("width", 1.0),
                                                   depth_mult=spec.get("depth", 1.0)), spec["res"], 1000)  # fmt: skip
        peak = peak_bf16_flops(torch.cuda.get_device_name(device)) if device.type == "cuda" else 0.0
        del model, opt, fwd, x, y
        _free(device)
        return {"micro": micro, "img_s": ips, "mfu": ips * fpi / peak if peak else None, "gflop_per_image": fpi / 1e9}
    raise RuntimeError("no micro-batch of MICRO_CANDIDATES fits")


def zero_equality(spec: dict, device) -> dict:
    """3 steps at ZeRO 0, 1, 2 on one device from the same weights and batches; max |w - w_zero0|."""
    import deepspeed
    import torch

    from pipeline.config import resolve
    from pipeline.train.step import SkippableSGD, agc_at_boundary, deepspeed_config, soft_cross_entropy

    _dist_init(device)
    micro, accum = 8, 2
    xs = [torch.randn(micro, 3, spec["res"], spec["res"], generator=torch.Generator().manual_seed(i)).to(device) for i in range(6)]
    ys = [torch.softmax(torch.randn(micro, 1000, generator=torch.Generator().manual_seed(100 + i)), -1).to(device) for i in range(6)]
    weights = {}
    for stage in (0, 1, 2):
        cfg = resolve("demo", [f"run.zero_stage={stage}", "run.num_workers=1", f"schedule.micro_batch={micro}",
                               f"schedule.global_batch={micro * accum}"])  # fmt: skip
        model = _build(spec, device)
        opt = SkippableSGD(model.param_groups(2e-5), lr=0.4, momentum=0.9, nesterov=True)
        opt.skip = True
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=deepspeed_config(cfg, True), dist_init_required=False)
        opt.skip = False
        for i, (x, y) in enumerate(zip(xs, ys)):
            with torch.autocast(device.type, dtype=torch.bfloat16):
                logits = engine(x)
            assert logits.dtype == torch.bfloat16, f"bf16 autocast did not reach the model inside the engine: {logits.dtype}"
            engine.backward(soft_cross_entropy(logits, y))
            if i % accum == accum - 1:
                agc_at_boundary(engine.module, model.agc_exclude_names(), 0.01, 1e-3, stage)
            engine.step()
        # fp32 weights are whole on every rank at ZeRO 0/1/2 (DeepSpeed all-gathers the updated partitions)
        weights[stage] = {k: v.detach().float().cpu() for k, v in engine.module.named_parameters()}
        del engine, model, opt
    base = weights[0]
    return {f"zero{s}_vs_zero0": max((weights[s][k] - base[k]).abs().max().item() for k in base) for s in (1, 2)}


def pretrain(spec: dict, gpu: bool, work: Path) -> dict:
    """launch/pretrain_f7.py for `steps` steps on a synthetic corpus; SIGKILL a worker after 3 checkpoints."""
    import psutil

    sys.path.insert(0, str(REPO / "bench"))
    from pack import make_corpus

    from data_prep.pack import PackOptions, pack

    corpus, data = work / "corpus", work / "data"
    make_corpus(corpus, spec["images"], classes=10)
    pack(str(corpus), str(data), PackOptions(samples_per_shard=100, heldout_fraction=0.1), progress=False)
    g = spec["global_batch"]
    sets = [f"model.name={spec['model']}", f"model.width_mult={spec.get('width', 1.0)}", f"model.depth_mult={spec.get('depth', 1.0)}",
            f"data.root={data}", "data.workers=2" if gpu else "data.workers=0", "data.shuffle_window=256",
            f"aug.train_res={spec['res']}", f"aug.eval_res={spec['res']}", "aug.randaug_layers=2",
            f"schedule.global_batch={g}", f"schedule.micro_batch={spec['pretrain_micro']}", "schedule.epochs=0",
            f"schedule.samples={g * spec['steps']}", f"schedule.ckpt_every={spec['ckpt_every']}",
            f"schedule.eval_every={spec['steps'] // 2}", "schedule.log_every=5", "optim.warmup_epochs=0.5",
            f"run.storage={work / 'runs'}", "run.name=gpu-check", "run.num_workers=1", f"run.use_gpu={gpu}",
            f"run.cpus_per_worker={4 if gpu else 1}", "run.precision=bf16", "run.max_failures=2"]  # fmt: skip
    argv = [sys.executable, str(REPO / "launch" / "pretrain_f7.py"), "--preset", "f7"]
    for s in sets:
        argv += ["--set", s]
    run_dir, killed = work / "runs" / "gpu-check", []

    def killer():
        deadline = time.time() + 600
        while time.time() < deadline and not killed:
            if len(list(run_dir.glob("checkpoint_*/trainer.json"))) >= 3:
                for proc in psutil.process_iter(["cmdline"]):
                    if any("RayTrainWorker" in part for part in (proc.info["cmdline"] or [])):
                        os.kill(proc.pid, signal.SIGKILL)
                        killed.append(proc.pid)
                        break
            time.sleep(0.05)

    t = threading.Thread(target=killer, daemon=True)
    t.start()
    t0 = time.perf_counter()
    out = subprocess.run(argv, cwd=work, capture_output=True, text=True, timeout=spec["timeout"])
    t.join(timeout=5)
    if out.returncode != 0:
        raise RuntimeError(f"pretraining failed (exit {out.returncode}):\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    s = json.loads((run_dir / "export" / "summary.json").read_text())
    return {"steps": s["steps"], "resumes": s["resumes"], "killed": len(killed), "heldout_raw_loss": s.get("heldout_raw_loss"),
            "heldout_ema_loss": s.get("heldout_ema_loss"), "wall_s": time.perf_counter() - t0}  # fmt: skip


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny model: the same sections in a minute or two")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args(argv)
    import torch

    if args.dry_run:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        device = torch.device("cpu")
        spec = {"model": "nfnet_pico", "depth": 0.25, "res": 16, "micro": (8,), "backend": "aot_eager", "steps": 12,
                "ckpt_every": 2, "global_batch": 32, "pretrain_micro": 16, "images": 200, "timeout": 600}  # fmt: skip
        speed_steps = 2
    else:
        if not torch.cuda.is_available():
            print("error: no GPU visible (torch.cuda.is_available() is False); use --dry-run on CPU", file=sys.stderr)
            return 2
        device = torch.device("cuda", 0)
        spec = {"model": "nfnet_f0", "res": 192, "micro": MICRO_CANDIDATES, "backend": "inductor", "steps": 60,
                "ckpt_every": 10, "global_batch": 256, "pretrain_micro": 64, "images": 2000, "timeout": 420, "width": 1.0}  # fmt: skip
        speed_steps = 20
    print(f"device: {torch.cuda.get_device_name(0) if device.type == 'cuda' else 'cpu'}; torch {torch.__version__}", flush=True)
    results = {"device": str(device), "dry_run": args.dry_run, "speed": {}}
    for compile_ in (False, True):
        for cl in (False, True):
            key = f"{'compiled' if compile_ else 'eager'} {'channels_last' if cl else 'NCHW'}"
            results["speed"][key] = speed(spec, device, compile_, cl, speed_steps)
            print(key, results["speed"][key], flush=True)
    results["zero"] = zero_equality(spec, device)
    _free(device)  # the pretraining's Ray worker needs the GPU's memory
    print("zero", results["zero"], flush=True)
    pre_spec = {**spec, "width": 0.25} if not args.dry_run else spec
    with tempfile.TemporaryDirectory(prefix="nfnet-gpu-check-") as tmp:
        results["pretrain"] = pretrain(pre_spec, device.type == "cuda", Path(tmp))
    print(table(results, spec))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    ok = results["pretrain"]["steps"] == spec["steps"] and results["pretrain"]["resumes"] >= 1
    ok &= all(v < 1e-5 for v in results["zero"].values())
    return 0 if ok else 1


def table(r: dict, spec: dict) -> str:
    res = spec["res"]
    lines = [f"| check | result |", "| --- | --- |"]
    for key, v in r["speed"].items():
        mfu = f", MFU {v['mfu']:.3f}" if v["mfu"] is not None else ""
        lines.append(f"| {spec['model']} @{res}px bf16 train, {key} | {v['img_s']:.0f} img/s at micro-batch {v['micro']}{mfu} "
                     f"({v['gflop_per_image']:.1f} GFLOP/image) |")  # fmt: skip
    for key, v in r["zero"].items():
        lines.append(f"| ZeRO one-device step equality, {key} | max weight diff {v:.2e} (goal < 1e-5) |")
    p = r["pretrain"]
    lines.append(f"| launch/pretrain_f7.py, {spec['steps']} steps, SIGKILL after 3 checkpoints | steps {p['steps']}, "
                 f"resumes {p['resumes']}, held-out loss raw {p['heldout_raw_loss']:.4f} / EMA {p['heldout_ema_loss']:.4f}, "
                 f"{p['wall_s']:.0f} s |")  # fmt: skip
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
