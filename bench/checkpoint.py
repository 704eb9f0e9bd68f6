"""Cost of one checkpoint per rank: host memory and training stall, sharded (ours) vs full gather.

    python bench/checkpoint.py [--model nfnet_f0] [--res 64] [--micro 2] [--world 2] [--zero 1]

`--world` processes joined by a gloo process group (no Ray: the checkpoint code does not need it)
each build a real DeepSpeed engine at `--zero`, take 3 SGD steps (the median is the step time), then
checkpoint twice, alternating, in the same processes:
  ours      pipeline/train/checkpoint.snapshot (the stall: host copies of what the rank owns) and
            write_shard (in the trainer it runs on Ray Train's upload thread while training goes on);
  baseline  the consolidated checkpoint we wrote before: every rank gathers every tensor whole through
            DeepSpeed's collective safe_get_full_* calls and keeps it on the host; rank 0 writes it
            with safetensors.save_file while the others wait (all of it stalls training).
Host memory is the bytes of host tensors the checkpoint holds at its peak (exact), divided by the model
state (fp32 weights + momentum + EMA); goal for ours: <= 1/world + the largest tensor. The peak RSS
rise (sampled every 2 ms) is printed as a cross-check; it reads lower where the allocator reuses pages
freed earlier in the process.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


class PeakRSS:
    """Peak resident memory above the level at entry, sampled on a thread."""

    def __enter__(self):
        import psutil

        self.proc, self.base, self.peak, self._stop = psutil.Process(), 0, 0, threading.Event()
        self.base = self.peak = self.proc.memory_info().rss
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _run(self):
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, self.proc.memory_info().rss)

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)
        self.delta = self.peak - self.base
        return False


def worker(rank: int, a: dict) -> None:
    os.environ.update(DS_ACCELERATOR="cpu", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(a["port"]), RANK=str(rank),
                      WORLD_SIZE=str(a["world"]), LOCAL_RANK=str(rank))  # fmt: skip
    import deepspeed
    import torch
    import torch.distributed as dist
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state
    from safetensors.torch import save_file

    from models import create_model
    from pipeline.train.checkpoint import relink_optimizer_state, snapshot, write_shard
    from pipeline.train.step import SkippableSGD, make_ema

    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=a["world"])
    torch.manual_seed(0)
    model = create_model(a["model"], num_classes=1000)
    opt = SkippableSGD(model.param_groups(2e-5), lr=0.1, momentum=0.9, nesterov=True)
    opt.skip = True
    cfg = {"train_micro_batch_size_per_gpu": a["micro"], "gradient_accumulation_steps": 1, "train_batch_size": a["micro"] * a["world"],
           "gradient_clipping": 0.0, "zero_optimization": {"stage": a["zero"]}, "zero_allow_untested_optimizer": True,
           "steps_per_print": 10**9}  # fmt: skip
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=cfg, dist_init_required=False)
    opt.skip = False
    ema = make_ema(engine.module, 0.999)
    x = torch.randn(a["micro"], 3, a["res"], a["res"])
    y = torch.randint(0, 1000, (a["micro"],))
    steps = []
    for _ in range(3):
        t0 = time.perf_counter()
        engine.backward(torch.nn.functional.cross_entropy(engine(x), y))
        engine.step()
        ema.update_parameters(engine.module)
        steps.append(time.perf_counter() - t0)
    n = sum(p.numel() for p in engine.module.parameters())
    state = 3 * n * 4
    largest = max(p.numel() for p in engine.module.parameters()) * 4
    tmp = tempfile.mkdtemp(prefix="bench-ckpt-")

    def ours() -> tuple[float, float, float, float]:
        dist.barrier()
        with PeakRSS() as mem:
            t0 = time.perf_counter()
            snap = snapshot(engine.module, opt, ema, engine.optimizer, rank, a["world"], 3)
            stall = time.perf_counter() - t0
            write_shard(os.path.join(tmp, "ours"), snap, {"counters": {}} if rank == 0 else None)
            background = time.perf_counter() - t0 - stall
            held = snap.nbytes
            del snap
        return held, mem.delta, stall, background

    def baseline() -> tuple[float, float, float, float]:
        dist.barrier()
        with PeakRSS() as mem:
            t0 = time.perf_counter()
            relink_optimizer_state(engine.optimizer)
            out, ema_p = {}, dict(ema.module.named_parameters())
            for name, p in engine.module.named_parameters():
                full = safe_get_full_fp32_param(p)
                out[f"param/{name}"] = (full if full is not None else p.detach()).float().cpu().clone()
                mom = safe_get_full_optimizer_state(p, "momentum_buffer") if hasattr(p, "_hp_mapping") else opt.state[p]["momentum_buffer"]
                out[f"momentum/{name}"] = mom.float().cpu().clone()
                out[f"ema/{name}"] = ema_p[name].detach().float().cpu().clone()
            if rank == 0:
                save_file(out, os.path.join(tmp, "state.safetensors"))
            dist.barrier()  # the others waited for rank 0's write (then its upload)
            stall = time.perf_counter() - t0
            held = sum(t.numel() * t.element_size() for t in out.values())
            del out
        return held, mem.delta, stall, 0.0

    res = {"ours": [], "baseline": []}
    for _ in range(2):
        res["ours"].append(ours())
        res["baseline"].append(baseline())
    out = {k: [statistics.median(col) for col in zip(*v)] for k, v in res.items()}
    out.update(state=state, largest=largest, step=statistics.median(steps), params=n)
    Path(a["out"], f"rank{rank}.json").write_text(json.dumps(out))
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="nfnet_f0")
    ap.add_argument("--res", type=int, default=64)
    ap.add_argument("--micro", type=int, default=2)
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--zero", type=int, default=1)
    args = ap.parse_args()
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tempfile.mkdtemp(prefix="bench-ckpt-out-")
    mp.start_processes(worker, args=({**vars(args), "port": port, "out": out},), nprocs=args.world, start_method="spawn")
    print(json.dumps(vars(args)))
    for r in range(args.world):
        m = json.loads(Path(out, f"rank{r}.json").read_text())
        goal = 1 / args.world + m["largest"] / m["state"]
        (oh, om, os_, ob), (bh, bm, bs, _) = m["ours"], m["baseline"]
        print(f"rank {r}: model state {m['state'] / 2**20:.0f} MiB ({m['params'] / 1e6:.1f}M params x weights, momentum, EMA), "
              f"step {m['step']:.2f} s")  # fmt: skip
        print(f"  CHECKPOINT HOST MEMORY / STATE rank={r}: ours {oh / m['state']:.3f} (goal <= 1/{args.world} + largest tensor "
              f"= {goal:.3f}), full gather {bh / m['state']:.3f}  [host tensor bytes held; peak RSS rise: ours "
              f"{om / m['state']:.3f}, full gather {bm / m['state']:.3f}, lower where the allocator reuses freed pages]")  # fmt: skip
        print(f"  CHECKPOINT STALL / STEP rank={r}: ours {os_ / m['step']:.3f} (snapshot {os_ * 1e3:.0f} ms; writing {ob * 1e3:.0f} ms "
              f"runs in the background), full gather + rank-0 write {bs / m['step']:.3f}")  # fmt: skip


if __name__ == "__main__":
    main()
