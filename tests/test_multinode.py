"""Two hosts on one machine: network namespaces joined by a veth pair, a Ray head in one and a
worker node in the other, the S3-protocol server on the head's address (../shared/docs/stack-notes.md).

In that cluster: pack the sample corpus into S3 with Ray tasks on both nodes; pretrain with 2 workers
placed one per node (gloo over the veth), reading shards from S3 and checkpointing to S3 (the
reference); two elastic runs (run.min_workers=1, run.num_workers=2) that end with the reference's
weights: one loses the worker host for good mid-run and finishes on one worker, one starts on the
head alone and grows when the worker host joins; fine-tune from the S3 export on both nodes.

Needs root (CI runs as root) and iproute2. Without them the test fails and says so.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
import time

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


STEPS = 60  # optimizer steps of every pretraining run here (global batch 64): the grow test's second host joins mid-run


def _train_sets(h: Hosts, name: str, *extra: str) -> list[str]:
    sets = [
        "data.root=s3://mnode/fm", f"data.s3_endpoint={h.s3}", "data.workers=0", "data.shuffle_window=64",
        "aug.train_res=16", "aug.eval_res=16", "aug.randaug_layers=1", "optim.lr_base=0.4", "optim.warmup_epochs=0.1",
        "optim.ema_decay=0.9", "schedule.global_batch=64", "schedule.micro_batch=16", "schedule.epochs=0",
        f"schedule.samples={64 * STEPS}", "schedule.ckpt_every=4", "schedule.eval_every=0", "schedule.log_every=1",
        "run.storage=s3://mnode/runs", f"run.name={name}", "run.num_workers=2", "run.placement=SPREAD", *extra,
    ]  # fmt: skip
    return [x for s in sets for x in ("--set", s)]


def _results(h: Hosts, run: str) -> dict:
    code = f"from data_prep.storage import Store; print(Store('s3://mnode/runs/{run}').read_bytes('results.json').decode())"
    return json.loads(h.python("a", code).stdout)


@pytest.fixture(scope="module")
def packed(hosts):
    """The sample corpus packed into S3 by Ray tasks (both nodes take chunks)."""
    h = hosts
    h.run("a", sys.executable, "-m", "data_prep", "pack", "fashion-mnist", "s3://mnode/fm", "--ray", "--ray-address", h.address,
          "--limit-per-split", "900", "--samples-per-shard", "100", "--heldout-fraction", "0.1", "--no-progress", timeout=300)  # fmt: skip
    manifest = json.loads(h.python("a", "from data_prep.storage import Store; print(Store('s3://mnode/fm').read_bytes('manifest.json').decode())").stdout)
    assert manifest["splits"]["train"]["samples"] > 700
    return manifest


@pytest.fixture(scope="module")
def reference(hosts, packed):
    """The uninterrupted run the elastic runs must reproduce: 2 workers, one per host, from start to end."""
    h = hosts
    t0 = time.time()
    clean = h.run("a", sys.executable, "launch/pretrain_f7.py", "--preset", "demo", *_train_sets(h, "clean", "run.max_failures=0"))
    log = clean.stdout + clean.stderr
    assert f"ip={h.ip['a']}" in log and f"ip={h.ip['b']}" in log, "the two workers were not placed one per host"
    r = _results(h, "clean")
    assert r["training"]["world_size"] == 2 and r["training"]["resizes"] == []
    # device-hours: 2 workers for the attempt's length (less than the job, which starts Ray Train first)
    assert 1.0 * r["training"]["wall_time_s"] < r["training"]["device_hours"] * 3600 / 2 < time.time() - t0
    return r


def _weight_diff(h: Hosts, run_a: str, run_b: str) -> dict:
    """Largest |difference| over every tensor of two exports' raw and EMA weights (fp32)."""
    code = f"""
import json, io
from safetensors.torch import load
from data_prep.storage import Store
out = {{}}
for f in ("model.safetensors", "ema.safetensors"):
    a, b = (load(Store(f"s3://mnode/runs/{{r}}/export").read_bytes(f)) for r in ("{run_a}", "{run_b}"))
    assert a.keys() == b.keys() and a, f
    out[f] = max((a[k] - b[k]).abs().max().item() for k in a)
print(json.dumps(out))
"""
    return json.loads(h.python("a", code).stdout.strip().splitlines()[-1])


def _world_sizes(h: Hosts, run: str) -> dict[int, int]:
    """TensorBoard's progress/world_size per step, read back from the run's S3 TensorBoard files (the
    last value written for a step wins: a step redone after a restart was computed by the new size)."""
    code = f"""
import json, os, tempfile
from data_prep.storage import Store
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
s, d = Store("s3://mnode/runs/{run}/tensorboard"), tempfile.mkdtemp()
for name in s.list(""):
    open(os.path.join(d, os.path.basename(name)), "wb").write(s.read_bytes(name))
events = []
for f in os.listdir(d):  # one file per attempt's rank 0
    ea = EventAccumulator(os.path.join(d, f)); ea.Reload()
    if "progress/world_size" in ea.Tags()["scalars"]:  # not in an attempt killed before it flushed a step
        events += ea.Scalars("progress/world_size")
print(json.dumps({{e.step: int(e.value) for e in sorted(events, key=lambda e: e.wall_time)}}))
"""
    return {int(k): v for k, v in json.loads(h.python("a", code).stdout.strip().splitlines()[-1]).items()}


def _elastic_run(h: Hosts, name: str, on_step, logs) -> tuple[dict, str, float]:
    """An elastic run (1 to 2 workers) in the background; on_step(step) is called for each step line.
    Its output is kept in logs/{name}.log (pytest's tmp_path) for a failure's diagnosis."""
    t0 = time.time()
    # Our steps take 0.3 s, a real one seconds: Ray Train's controller polls the workers every 0.5 s
    # instead of 2 s so that checkpoints register (and resizes happen) within a few steps. After a
    # node is lost, Ray may try the old size once before its GCS notices the node is dead (~15 s);
    # that try fails after the worker-group start timeout, 20 s here instead of 60 s.
    env = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5", "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "20"}
    proc = h.popen("a", sys.executable, "launch/pretrain_f7.py", "--preset", "demo",
                   *_train_sets(h, name, "run.min_workers=1", "run.max_failures=3", "run.resize_check_s=2"),
                   env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    lines = []

    def reader():
        for line in proc.stdout:
            lines.append(line)
            if m := re.search(r"\bstep (\d+)/\d+ epoch", line):
                on_step(int(m.group(1)))

    t = threading.Thread(target=reader, daemon=True)
    t.start()
    rc = proc.wait(timeout=600)
    t.join(timeout=10)
    log = "".join(lines)
    (logs / f"{name}.log").write_text(log)
    assert rc == 0, log[-6000:]
    assert "elastic: 1 to 2 workers, at sizes [1, 2] (accumulation 4, 2)" in log
    return _results(h, name), log, time.time() - t0


def test_elastic_run_loses_a_host_for_good_and_finishes_on_one_worker_with_the_same_weights(hosts, reference, tmp_path):
    h = hosts
    if h.alive_nodes() < 2:
        h.start_node("b")
    gone = {}

    def take_away():  # once Ray has registered a checkpoint (its snapshot is in the run directory)
        h.python("a", "import time\nfrom data_prep.storage import Store\ns = Store('s3://mnode/runs/shrink')\n"
                      "while not s.exists('checkpoint_manager_snapshot.json'): time.sleep(0.2)", timeout=120)  # fmt: skip
        h.stop_node("b")
        gone["t"] = time.time()

    def on_step(step):
        if step == 5 and not gone:
            threading.Thread(target=take_away, daemon=True).start()

    r, log, wall = _elastic_run(h, "shrink", on_step, tmp_path)
    assert gone, "the run ended before the worker host was taken away:\n" + log[-3000:]
    assert h.alive_nodes() == 1  # the worker host never came back
    tr = r["training"]
    assert tr["step"] == reference["training"]["step"] == STEPS and tr["world_size"] == 1
    assert len(tr["resizes"]) == 1, (tr, log[-4000:])
    (rs,) = tr["resizes"]
    # resumed at a checkpoint (ckpt_every=4) after losing the steps since it
    assert (rs["from"], rs["to"]) == (2, 1) and rs["step"] % 4 == 0 and 4 <= rs["step"] < STEPS and tr["resumes"] == 1, rs
    assert 0 < rs["checkpoint_to_restart_s"] < rs["wait_s"] < wall
    # one worker after the resize: less device time than 2 workers for the whole job
    assert tr["wall_time_s"] < tr["device_hours"] * 3600 < 2 * wall
    diff = _weight_diff(h, "clean", "shrink")
    print(f"elastic shrink: weight diff {diff}, resize {rs}, job {wall:.0f} s, device-hours {tr['device_hours']:.5f}")
    assert diff["model.safetensors"] < 1e-5 and diff["ema.safetensors"] < 1e-5, diff
    assert abs(r["raw"]["loss"] - reference["raw"]["loss"]) < 1e-5
    ws = _world_sizes(h, "shrink")
    k = rs["step"]
    assert sorted(ws) == list(range(1, STEPS + 1)) and {ws[s] for s in range(1, k + 1)} == {2} and {ws[s] for s in range(k + 1, STEPS + 1)} == {1}, ws


def test_elastic_run_starts_on_one_host_and_grows_when_the_second_joins(hosts, reference, tmp_path):
    h = hosts
    if h.alive_nodes() > 1:
        h.stop_node("b")
        h.wait_nodes(1)
    joined = {}

    def on_step(step):  # the worker host joins while the run trains on the head alone
        if step == 1 and not joined:
            joined["t"] = time.time()
            threading.Thread(target=h.start_node, args=("b", False), daemon=True).start()

    r, log, wall = _elastic_run(h, "grow", on_step, tmp_path)
    assert joined, log[-3000:]
    tr = r["training"]
    assert tr["step"] == STEPS and tr["world_size"] == 2 and tr["resumes"] == 1
    assert len(tr["resizes"]) == 1, (tr, log[-4000:])
    (rs,) = tr["resizes"]
    assert (rs["from"], rs["to"]) == (1, 2) and rs["step"] % 4 == 0 and 4 <= rs["step"] < STEPS, rs  # at a checkpoint (ckpt_every=4)
    assert 0 < rs["checkpoint_to_restart_s"] < rs["wait_s"] < wall
    assert tr["wall_time_s"] < tr["device_hours"] * 3600 < 2 * wall  # one worker for part of the run
    assert f"ip={h.ip['b']}" in log
    diff = _weight_diff(h, "clean", "grow")
    print(f"elastic grow: weight diff {diff}, resize {rs}, job {wall:.0f} s, device-hours {tr['device_hours']:.5f}")
    assert diff["model.safetensors"] < 1e-5 and diff["ema.safetensors"] < 1e-5, diff
    ws = _world_sizes(h, "grow")
    assert sorted(ws) == list(range(1, STEPS + 1)), ws
    assert {ws[s] for s in range(1, rs["step"] + 1)} == {1} and {ws[s] for s in range(rs["step"] + 1, STEPS + 1)} == {2}, ws


def test_two_host_finetune_from_the_s3_export(hosts, reference, tmp_path):
    """Fine-tune from the reference's S3 export on both hosts (class folders packed into S3 first)."""
    from data_prep.sample_folders import write_groups

    h = hosts
    if h.alive_nodes() < 2:
        h.start_node("b")
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
    assert r["pretraining"]["steps"] == STEPS and 0 <= r["raw"]["top1"] <= 1
