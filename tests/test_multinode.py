"""Two hosts on one machine: network namespaces joined by a veth pair, a Ray head in one and a
worker node in the other, the S3-protocol server on the head's address (../shared/docs/stack-notes.md).

In that cluster: pack the sample corpus into S3 with Ray tasks on both nodes; pretrain with 2 workers
placed one per node (gloo over the veth), reading shards from S3 and checkpointing to S3; SIGKILL
the worker node's training process mid-run and check the run recovers and ends with the same
held-out loss as an uninterrupted run; fine-tune from the S3 export on both nodes.

Needs root (CI runs as root) and iproute2. Without them the test fails and says so.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from infra.netns import Hosts, can_create_namespaces
@pytest.fixture(scope="module")
def hosts():
    why = can_create_namespaces()
    if why:
        pytest.fail(f"{why}. The multi-node tests need it (CI runs as root): run the suite as root.")
    h = Hosts()
    try:
        h.up()
        yield h
    finally:
        h.down()


def _train_sets(h: Hosts, name: str, *extra: str) -> list[str]:
    sets = [
        "data.root=s3://mnode/fm", f"data.s3_endpoint={h.s3}", "data.workers=0", "data.shuffle_window=64",
        "aug.train_res=16", "aug.eval_res=16", "aug.randaug_layers=1", "optim.lr_base=0.4", "optim.warmup_epochs=0.1",
        "optim.ema_decay=0.9", "schedule.global_batch=64", "schedule.micro_batch=16", "schedule.epochs=0",
        "schedule.samples=1280", "schedule.ckpt_every=4", "schedule.eval_every=0", "schedule.log_every=1",
        "run.storage=s3://mnode/runs", f"run.name={name}", "run.num_workers=2", "run.placement=SPREAD", *extra,
    ]  # fmt: skip
    return [x for s in sets for x in ("--set", s)]


def _results(h: Hosts, run: str) -> dict:
    code = f"from data_prep.storage import Store; print(Store('s3://mnode/runs/{run}').read_bytes('results.json').decode())"
    return json.loads(h.python("a", code).stdout)


def test_two_host_pack_pretrain_with_worker_node_kill_and_finetune_over_s3(hosts, tmp_path):
    h = hosts
    # 1. Pack into S3 with Ray tasks (both nodes take chunks).
    h.run("a", sys.executable, "-m", "data_prep", "pack", "fashion-mnist", "s3://mnode/fm", "--ray", "--ray-address", h.address,
          "--limit-per-split", "900", "--samples-per-shard", "100", "--heldout-fraction", "0.1", "--no-progress", timeout=300)  # fmt: skip
    manifest = json.loads(h.python("a", "from data_prep.storage import Store; print(Store('s3://mnode/fm').read_bytes('manifest.json').decode())").stdout)
    assert manifest["splits"]["train"]["samples"] > 700

    # 2. An uninterrupted run, one worker per node.
    clean = h.run("a", sys.executable, "launch/pretrain_f7.py", "--preset", "demo", *_train_sets(h, "clean", "run.max_failures=0"))
    log = clean.stdout + clean.stderr
    assert f"ip={h.ip['a']}" in log and f"ip={h.ip['b']}" in log, "the two workers were not placed one per host"

    # 3. The same run; the worker node's training process is SIGKILLed after its second checkpoint.
    proc = h.popen("a", sys.executable, "launch/pretrain_f7.py", "--preset", "demo", *_train_sets(h, "killed", "run.max_failures=2"),
                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    lines, killed = [], []

    def reader():
        ckpts = 0
        for line in proc.stdout:
            lines.append(line)
            if "Checkpoint successfully created" in line:
                ckpts += 1
                if ckpts == 2 and not killed:
                    for pid in h.pids("b"):
                        try:
                            if "RayTrainWorker" in Path(f"/proc/{pid}/cmdline").read_text():
                                os.kill(pid, signal.SIGKILL)
                                killed.append(pid)
                        except (FileNotFoundError, ProcessLookupError):
                            pass

    t = threading.Thread(target=reader, daemon=True)
    t.start()
    assert proc.wait(timeout=600) == 0, "".join(lines)[-5000:]
    t.join(timeout=10)
    assert killed, "no training process was found on the worker host to kill:\n" + "".join(lines)[-3000:]
    a, b = _results(h, "clean"), _results(h, "killed")
    assert b["training"]["resumes"] == 1 and a["training"]["resumes"] == 0
    assert b["training"]["step"] == a["training"]["step"] == 20
    assert abs(a["raw"]["loss"] - b["raw"]["loss"]) < 1e-5, (a["raw"], b["raw"])
    assert abs(a["ema"]["loss"] - b["ema"]["loss"]) < 1e-5

    # 4. Fine-tune from the S3 export on both hosts (the class-folder data is packed into S3 first).
    from data_prep.sample_folders import write_groups

    groups = tmp_path / "groups"
    write_groups(str(groups), n_train=256, n_val=128)
    ft = h.run("a", sys.executable, "launch/finetune_imagenet.py", "--preset", "demo_finetune",
               *[x for s in (f"model.init_from=s3://mnode/runs/clean/export", f"data.source={groups}", f"data.s3_endpoint={h.s3}",
                             "data.workers=0", "aug.train_res=16", "aug.eval_res=16", "optim.sam_rho=0.05", "schedule.epochs=1",
                             "schedule.global_batch=64", "schedule.micro_batch=32", "schedule.ckpt_every=0", "run.storage=s3://mnode/runs",
                             "run.name=ft", "run.num_workers=2", "run.placement=SPREAD", "run.max_failures=0")
                 for x in ("--set", s)])  # fmt: skip
    assert f"ip={h.ip['b']}" in ft.stdout + ft.stderr
    r = _results(h, "ft")
    assert r["init_from"] == "s3://mnode/runs/clean/export" and r["classes"] == 4 and r["samples"] == 128
    assert r["pretraining"]["steps"] == 20 and 0 <= r["raw"]["top1"] <= 1
