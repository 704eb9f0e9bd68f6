"""`make demo`: the main job on the embedded default, as a user would run it on a cluster.

1. pack the sample corpus (fashion-mnist) into data/fashion-mnist unless it is already there;
2. start a local Ray head (dashboard and job server on 127.0.0.1) unless one is running;
3. `ray job submit --working-dir . -- python launch/pretrain_f7.py --preset demo`;
4. write a real class-folder dataset from the sample package's test images (4 clothing groups,
   data/fashion-mnist-groups) and `ray job submit ... python launch/finetune_imagenet.py --preset
   demo_finetune` on the pretraining export: packed into shards, new zero head, higher resolution, SAM;
5. print both results and where the TensorBoard logs and the exports are.

`--sweep` (make sweep-demo) does 1, 2 and 4's dataset, then submits the CPU scaling sweep
`launch/scaling_sweep.py configs/sweeps/demo.yaml` and prints its fitted laws and report.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data" / "fashion-mnist"
GROUPS = ROOT / "data" / "fashion-mnist-groups"
RUNS = ROOT / "runs"
DASHBOARD = "http://127.0.0.1:8265"


def sh(*cmd: str, check: bool = True, **kw) -> subprocess.CompletedProcess:
    print("+ " + " ".join(cmd), flush=True)
    return subprocess.run(cmd, check=check, cwd=ROOT, **kw)


def ray_running() -> bool:
    """A Ray head answers on its GCS port (`ray status` would retry for minutes when there is none)."""
    import socket

    try:
        socket.create_connection(("127.0.0.1", 6379), timeout=1).close()
        return True
    except OSError:
        return False


def main() -> int:
    sweep = "--sweep" in sys.argv[1:]
    bin_dir = str(Path(sys.executable).parent)
    os.environ["PATH"] = f"{bin_dir}:{os.environ.get('PATH', '')}"  # the job's `python` is the venv's
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # Ray >= 2.59 turns on token authentication for local clusters; the job client must then send
    # the token too. Use token mode throughout, with the token in Ray's default file (~/.ray/auth_token).
    os.environ.setdefault("RAY_AUTH_MODE", "token")
    if os.environ["RAY_AUTH_MODE"] == "token" and not os.environ.get("RAY_AUTH_TOKEN"):
        sh("ray", "get-auth-token", "--generate", capture_output=True)
    if not (DATA / "manifest.json").exists():
        sh(sys.executable, "-m", "data_prep", "pack", "fashion-mnist", str(DATA), "--heldout-fraction", "0.02",
           "--samples-per-shard", "1000", "--workers", "2")  # fmt: skip
    from data_prep.sample_folders import write_groups

    print(f"class-folder dataset for fine-tuning: {GROUPS} {write_groups(str(GROUPS))}", flush=True)
    started = False
    if not ray_running():
        sh("ray", "start", "--head", "--port", "6379", "--num-cpus", "2", "--dashboard-host", "127.0.0.1",
           "--dashboard-port", "8265", "--disable-usage-stats")  # fmt: skip
        started = True
    if sweep:
        try:
            t0 = time.time()
            sh("ray", "job", "submit", "--address", DASHBOARD, "--working-dir", ".", "--",
               "python", "launch/scaling_sweep.py", "configs/sweeps/demo.yaml", "--set", f"storage={RUNS}",
               "--point-set", f"data.root={DATA}", "--finetune-set", f"data.source={GROUPS}")  # fmt: skip
            print(f"\nsweep finished in {time.time() - t0:.0f} s; report: {RUNS / 'sweep-demo' / 'report' / 'report.md'}")
            print(f"TensorBoard: tensorboard --logdir {RUNS / 'sweep-demo'} --host 127.0.0.1")
        finally:
            if started:
                sh("ray", "stop", check=False, capture_output=True)
        return 0
    name = time.strftime("demo-%Y%m%d-%H%M%S")
    try:
        t0 = time.time()
        sh("ray", "job", "submit", "--address", DASHBOARD, "--working-dir", ".", "--",
           "python", "launch/pretrain_f7.py", "--preset", "demo", "--set", f"data.root={DATA}",
           "--set", f"run.storage={RUNS}", "--set", f"run.name={name}")  # fmt: skip
        wall = time.time() - t0
        t1 = time.time()
        sh("ray", "job", "submit", "--address", DASHBOARD, "--working-dir", ".", "--",
           "python", "launch/finetune_imagenet.py", "--preset", "demo_finetune", "--set", f"model.init_from={RUNS / name / 'export'}",
           "--set", f"data.source={GROUPS}", "--set", f"run.storage={RUNS}", "--set", f"run.name={name}-finetune")  # fmt: skip
        wall_ft = time.time() - t1
    finally:
        if started:
            sh("ray", "stop", check=False, capture_output=True)
    run = RUNS / name
    summary = json.loads((run / "export" / "summary.json").read_text())
    print("\n=== demo summary ===")
    print(f"trained {summary['steps']} steps ({summary['epochs']:.2f} epochs, {summary['samples_seen']} samples, "
          f"{summary['train_flops']:.3g} training FLOPs) in {summary['wall_time_s']:.0f} s of training, {wall:.0f} s job")  # fmt: skip
    print(f"held-out loss {summary['heldout_raw_loss']:.4f} (EMA {summary['heldout_ema_loss']:.4f}), "
          f"top-1 {summary['heldout_raw_top1']:.3f} (EMA {summary['heldout_ema_top1']:.3f}) on {summary['heldout_samples']} images")  # fmt: skip
    ft = RUNS / f"{name}-finetune"
    res = json.loads((ft / "results.json").read_text())
    print(f"fine-tuned on {res['classes']} clothing groups ({res['training']['step']} steps, SAM, {res['eval_res']} px) "
          f"in {res['training']['wall_time_s']:.0f} s of training, {wall_ft:.0f} s job:")  # fmt: skip
    for tag in ("raw", "ema"):
        r = res[tag]
        print(f"  {tag}: top-1 {r['top1']:.3f}, top-5 {r['top5']:.3f}, loss {r['loss']:.4f} on {res['samples']} val images")
    print(f"TensorBoard: tensorboard --logdir {RUNS} --host 127.0.0.1")
    print(f"exports: {run / 'export'} (pretrained), {ft / 'export'} (fine-tuned); results: {ft / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
