"""Pretraining: config, schedule, data-parallel correctness with AGC at ZeRO 0/1/2, SIGKILL recovery,
TensorBoard, exports, S3 checkpoints. Runs real Ray Train + DeepSpeed workers on a `ray start` cluster."""

from __future__ import annotations

import json
import math
import os
import signal
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from data_prep.pack import PackOptions, pack
from pipeline.config import PRESETS, TrainConfig, apply_overrides, resolve
from pipeline.train.step import lr_at


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("fm") / "out"
    pack("fashion-mnist", str(out), PackOptions(samples_per_shard=100, limit_per_split=700, heldout_fraction=0.1), progress=False)
    return str(out)


def tiny_sets(data: str, storage: str, name: str, **sets) -> list[str]:
    base = [
        "model.name=nfnet_pico", f"data.root={data}", "data.workers=0", "data.shuffle_window=32",
        "aug.train_res=16", "aug.eval_res=16", "aug.randaug_layers=1",
        "optim.lr_base=0.4", "optim.warmup_epochs=0.1", "optim.ema_decay=0.9",
        "schedule.global_batch=64", "schedule.micro_batch=16", "schedule.epochs=0", "schedule.samples=384",
        "schedule.ckpt_every=0", "schedule.eval_every=0", "schedule.log_every=1", f"run.storage={storage}", f"run.name={name}",
        "run.num_workers=2", "run.max_failures=0",
    ]  # fmt: skip
    return base + [f"{k}={v}" for k, v in sets.items()]


def tiny_cfg(data: str, storage: str, name: str, **sets) -> TrainConfig:
    return resolve("demo", tiny_sets(data, storage, name, **sets))


def run_fit(cfg: TrainConfig, address: str):
    import ray

    from pipeline.train.ray_job import fit

    if not ray.is_initialized():
        ray.init(address=address, log_to_driver=False)
    return fit(cfg)


def export_weights(storage: str, name: str) -> dict[str, torch.Tensor]:
    return load_file(str(Path(storage) / name / "export" / "model.safetensors"))


# ---- config ------------------------------------------------------------------------------------
def test_presets_and_batch_identity():
    f7 = resolve("f7")
    assert f7.model.name == "nfnet_f7" and f7.peak_lr == pytest.approx(1.6)
    assert f7.schedule.global_batch == 4096 and f7.accum_steps == 4096 // (16 * 64)
    assert (f7.optim.weight_decay, f7.optim.agc_clip, f7.optim.ema_decay, f7.aug.label_smoothing) == (2e-5, 0.01, 0.99999, 0.1)
    assert (f7.optim.momentum, f7.optim.nesterov, f7.run.precision) == (0.9, True, "auto")
    demo = resolve("demo")
    assert demo.schedule.global_batch >= 1024 and demo.accum_steps == 4 and demo.run.num_workers == 2
    with pytest.raises(ValueError, match="not divisible by micro_batch 48 x num_workers 2"):
        resolve("demo", ["schedule.micro_batch=48"])
    with pytest.raises(ValueError, match="unknown config key 'optim.lr'"):
        resolve("demo", ["optim.lr=1"])
    cfg = apply_overrides(demo, ["optim.lr_base=0.25", "run.use_gpu=false", 'model.overrides={"drop_rate": 0.0}'])
    assert cfg.optim.lr_base == 0.25 and cfg.run.use_gpu is False and cfg.model.overrides == {"drop_rate": 0.0}
    assert set(PRESETS) >= {"f7", "demo"}


def test_training_length_in_one_place():
    cfg = resolve("demo", ["schedule.epochs=2"])
    assert cfg.total_steps(train_samples=10_240, flops_per_image=1.0) == 20
    cfg = resolve("demo", ["schedule.epochs=0", "schedule.samples=5000"])
    assert cfg.total_steps(10_240, 1.0) == math.ceil(5000 / 1024)
    cfg = resolve("demo", ["schedule.epochs=0", "schedule.train_flops=2.048e9"])
    assert cfg.total_steps(10_240, flops_per_image=1e6) == 2  # 2048 images
    with pytest.raises(ValueError, match="exactly one"):
        resolve("demo", ["schedule.samples=5"]).total_steps(10, 1.0)


def test_lr_warmup_then_cosine():
    cfg = resolve("demo", ["optim.lr_base=0.1", "optim.warmup_epochs=1"])  # peak 0.1 * 1024/256 = 0.4
    lrs = [lr_at(s, cfg, steps_per_epoch=10, total_steps=50) for s in range(50)]
    assert lrs[0] == pytest.approx(0.04) and lrs[9] == pytest.approx(0.4)
    assert all(a < b for a, b in zip(lrs[:10], lrs[1:10]))
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:])) and lrs[-1] < 0.001
    assert lrs[30] == pytest.approx(0.4 * 0.5 * (1 + math.cos(math.pi * 20 / 40)))


# ---- distributed training ----------------------------------------------------------------------
@pytest.mark.slow
def test_two_workers_equal_one_worker_with_accumulation_at_each_zero_stage(tiny_data, tmp_path, ray_cluster):
    """Same global batch (64) and seed: 1 worker x 4 micro-steps vs 2 workers x 2, AGC on,
    stochastic depth and dropout on. Weights after 6 steps agree to 1e-5 at ZeRO 0, 1 and 2."""
    storage = str(tmp_path)
    run_fit(tiny_cfg(tiny_data, storage, "ref", **{"run.num_workers": 1}), ray_cluster["address"])
    ref = export_weights(storage, "ref")
    summary = json.loads((tmp_path / "ref" / "export" / "summary.json").read_text())
    assert summary["steps"] == 6 and summary["samples_seen"] == 384
    assert summary["train_flops"] == pytest.approx(384 * summary["train_flops_per_image"])
    for stage in (0, 1, 2):
        name = f"dp-zero{stage}"
        run_fit(tiny_cfg(tiny_data, storage, name, **{"run.zero_stage": stage}), ray_cluster["address"])
        got = export_weights(storage, name)
        worst = max((got[k] - ref[k]).abs().max().item() for k in ref)
        moved = max((ref[k] - v).abs().max().item() for k, v in load_init(tiny_data).items())
        assert worst < 1e-5, (stage, worst)
        assert moved > 1e-3  # the runs actually trained


def load_init(data: str) -> dict[str, torch.Tensor]:
    from models import create_model

    torch.manual_seed(0)
    return create_model("nfnet_pico", num_classes=10).state_dict()


@pytest.mark.slow
def test_sigkill_of_a_worker_and_resubmission_recover_to_the_same_result(tiny_data, tmp_path, ray_cluster):
    import psutil

    storage = str(tmp_path)
    sets = {"schedule.samples": 64 * 16, "schedule.ckpt_every": 3, "run.max_failures": 2}
    run_fit(tiny_cfg(tiny_data, storage, "clean", **sets), ray_cluster["address"])
    killed = []

    def killer():
        deadline = time.time() + 240
        while time.time() < deadline and not killed:
            # Three checkpoints on disk: the first is surely registered with Ray Train (a worker's
            # report queue holds one report, so the third cannot be written before the controller
            # took the second, and with it the first).
            if len(list((tmp_path / "crash").glob("checkpoint_*/trainer.json"))) >= 3:
                for proc in psutil.process_iter(["cmdline"]):
                    if any("RayTrainWorker" in part for part in (proc.info["cmdline"] or [])):
                        os.kill(proc.pid, signal.SIGKILL)
                        killed.append(proc.pid)
                        break
            time.sleep(0.02)

    t = threading.Thread(target=killer, daemon=True)
    t.start()
    run_fit(tiny_cfg(tiny_data, storage, "crash", **sets), ray_cluster["address"])
    t.join(timeout=5)
    assert killed, "no training worker was killed"
    summary = json.loads((tmp_path / "crash" / "export" / "summary.json").read_text())
    assert summary["resumes"] >= 1 and summary["steps"] == 16 and summary["samples_seen"] == 1024
    clean, crash = export_weights(storage, "clean"), export_weights(storage, "crash")
    assert max((clean[k] - crash[k]).abs().max().item() for k in clean) < 1e-5
    clean_s = json.loads((tmp_path / "clean" / "export" / "summary.json").read_text())
    assert summary["heldout_raw_loss"] == pytest.approx(clean_s["heldout_raw_loss"], abs=1e-5)

    # Re-submitting the same run name continues the run: `ray job submit` without retries, SIGKILL
    # of a worker after three checkpoints fails the job; the same command submitted again finishes
    # it from the latest registered checkpoint, with the clean run's weights.
    import subprocess

    import psutil

    ray_bin = str(Path(ray_cluster["env"]["PATH"].split(":")[0]) / "ray")
    argv = ["python", "launch/pretrain_f7.py", "--preset", "demo"]
    for item in tiny_sets(tiny_data, storage, "resub", **{**sets, "run.max_failures": 0}):
        argv += ["--set", item]

    def ray_job(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
        return subprocess.run([ray_bin, "job", *args], env=ray_cluster["env"], capture_output=True, text=True, timeout=timeout)

    def submit(sid: str, *flags: str) -> subprocess.CompletedProcess:
        return ray_job("submit", "--address", ray_cluster["dashboard"], "--submission-id", sid, "--working-dir",
                       str(Path(__file__).resolve().parents[1]), *flags, "--", *argv)  # fmt: skip

    sid = f"resub-1-{os.getpid()}"
    assert submit(sid, "--no-wait").returncode == 0
    deadline = time.time() + 300
    while len(list((tmp_path / "resub").glob("checkpoint_*/trainer.json"))) < 3:
        assert time.time() < deadline, "the first submission wrote no checkpoints"
        time.sleep(0.02)
    victims = [p for p in psutil.process_iter(["cmdline"]) if any("RayTrainWorker" in c for c in (p.info["cmdline"] or []))]
    os.kill(victims[0].pid, signal.SIGKILL)
    while f"Job '{sid}' failed" not in (status := ray_job("status", "--address", ray_cluster["dashboard"], sid).stdout):
        assert f"Job '{sid}' succeeded" not in status and time.time() < deadline, status[-3000:]
        time.sleep(1)
    assert not (tmp_path / "resub" / "export").exists()
    second = submit(f"resub-2-{os.getpid()}")
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    resub = json.loads((tmp_path / "resub" / "export" / "summary.json").read_text())
    assert resub["resumes"] == 1 and resub["steps"] == 16
    weights = export_weights(storage, "resub")
    assert max((clean[k] - weights[k]).abs().max().item() for k in clean) < 1e-5


@pytest.mark.slow
def test_tensorboard_export_and_s3_checkpoints(tiny_data, tmp_path, ray_cluster, s3_server, s3_bucket):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from data_prep.storage import Store
    from models import NFNet
    from models.variants import NFNetConfig

    storage = str(tmp_path)
    run_fit(tiny_cfg(tiny_data, storage, "tb", **{"schedule.eval_every": 3, "schedule.ckpt_every": 3}), ray_cluster["address"])
    acc = EventAccumulator(str(tmp_path / "tb" / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    for tag in ("train/loss", "train/lr", "train/agc_clip_fraction", "perf/images_per_s", "progress/samples_seen",
                "progress/train_flops", "heldout/raw_loss", "heldout/ema_loss", "heldout/raw_top1", "heldout/ema_top1"):  # fmt: skip
        assert tag in tags, tag
    assert [e.step for e in acc.Scalars("heldout/raw_loss")] == [3, 6]
    assert [e.value for e in acc.Scalars("progress/samples_seen")] == [64 * s for s in range(1, 7)]
    assert 0.0 <= acc.Scalars("train/agc_clip_fraction")[0].value <= 1.0
    assert any("hparams" in str(f) or f.name.startswith("events") for f in (tmp_path / "tb" / "tensorboard").iterdir())
    exp = tmp_path / "tb" / "export"
    info = json.loads((exp / "config.json").read_text())
    model = NFNet(NFNetConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in info["arch"].items()}), info["num_classes"])
    model.load_state_dict(load_file(str(exp / "model.safetensors")))
    assert json.loads((exp / "classes.json").read_text())[0] == "T-shirt_top"
    assert set(load_file(str(exp / "ema.safetensors"))) == set(model.state_dict())

    s3 = f"s3://{s3_bucket}/runs"
    run_fit(tiny_cfg(tiny_data, s3, "s3run", **{"schedule.ckpt_every": 3, "data.s3_endpoint": s3_server}), ray_cluster["address"])
    names = Store(f"{s3}/s3run", s3_server).list()
    assert any(n.startswith("checkpoint_") and n.endswith("state.safetensors") for n in names)
    assert {"export/model.safetensors", "export/summary.json", "export/config.json"} <= set(names)
    assert any(n.startswith("tensorboard/events") for n in names)
    blob = b"".join(Store(f"{s3}/s3run", s3_server).read_bytes(n) for n in names if n.endswith(".json"))
    assert b"testing" not in blob  # the (dummy) secret key never lands in saved files


@pytest.mark.slow
def test_non_finite_losses_skip_steps_then_stop_with_a_clear_error(tiny_data, tmp_path, ray_cluster):
    """An absurd lr without AGC blows the weights up: non-finite steps are skipped and counted,
    and after max_bad_steps in a row the run stops, naming the cause; earlier checkpoints stay."""
    from ray.train import TrainingFailedError

    cfg = tiny_cfg(tiny_data, str(tmp_path), "nan", **{"optim.lr_base": 1e12, "optim.agc_clip": 0.0,
                                                        "optim.warmup_epochs": 0, "schedule.max_bad_steps": 2,
                                                        "schedule.ckpt_every": 1, "schedule.samples": 64 * 20})  # fmt: skip
    with pytest.raises(TrainingFailedError, match="consecutive steps had a non-finite loss"):
        run_fit(cfg, ray_cluster["address"])
    assert list((tmp_path / "nan").glob("checkpoint_*/state.safetensors"))
    # results.json says so: a sweep records the run as diverged (not failed, not retried).
    res = json.loads((tmp_path / "nan" / "results.json").read_text())
    assert res["status"] == "diverged" and "non-finite" in res["reason"] and res["training"]["skipped_steps"] >= 2
