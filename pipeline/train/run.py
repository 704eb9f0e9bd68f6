"""One training run inside a Ray Train worker, built in dependency order:
device -> manifest -> model -> optimizer -> DeepSpeed engine -> EMA -> resume -> loaders -> loop.
`train_loop_per_worker` at the bottom is the function Ray Train starts in every worker.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import threading
import time

import torch

from data_prep.manifest import load_manifest
from data_prep.storage import Store
from pipeline.config import TrainConfig, check_objective
from pipeline.data.augment import normalize
from pipeline.data.loader import Layout, eval_loader, train_loader
from pipeline.finetune.sources import build_model, check_classes, load_source, model_from_source
from pipeline.formats.sharded import open_ray

from .checkpoint import restore, snapshot, write_export, write_shard
from .evaluate import evaluate, metric_names
from .sam import sam_ascend, sam_restore
from .step import SkippableSGD, agc_at_boundary, deepspeed_config, loss_for, lr_at, make_ema, peak_bf16_flops, seed_for

log = logging.getLogger("nfnet.train")


def step_line(step: int, total: int, steps_per_epoch: float, elapsed: float, rate: float, loss: float, lr: float,
              clipped: float, ips: float) -> str:  # fmt: skip
    """`step 120/900 epoch 1.33 loss 2.3012 lr 0.4 agc-clipped 0.012 5210 img/s elapsed 4:05 eta 26:30`.
    elapsed counts earlier attempts too (from the checkpoint); the ETA uses this attempt's rate in steps/s."""

    def hms(s: float) -> str:
        s = int(s)
        return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"

    eta = hms((total - step) / rate) if rate > 0 else "?"
    return (f"step {step}/{total} epoch {step / steps_per_epoch:.2f} loss {loss:.4f} lr {lr:.4g} agc-clipped {clipped:.3f} "
            f"{ips:.0f} img/s elapsed {hms(elapsed)} eta {eta}")


class NonFiniteLossError(RuntimeError):
    pass


class TrainRun:
    def __init__(self, cfg: TrainConfig, submission: str | None = None):
        import ray.train

        # This attempt's start: its workers hold their devices from here (device-hours count from it).
        self.t_start, self.t_start_unix = time.perf_counter(), time.time()
        self.cfg, self.submission = cfg, submission
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        # V / world micro-batches per worker and step (elastic runs start at any size in world_sizes()).
        self.A = cfg.accum_for(self.world)
        self.endpoint = cfg.data.s3_endpoint or None
        gpu = cfg.run.use_gpu and torch.cuda.is_available()
        self.device = torch.device(f"cuda:{ctx.get_local_rank()}" if gpu else "cpu")
        if gpu:
            torch.cuda.set_device(self.device)
        else:
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
            torch.set_num_threads(max(1, cfg.run.cpus_per_worker))
        # bf16 is autocast around the forward pass: weights, gradients, their all-reduce, AGC, SGD and
        # EMA stay fp32 (docs/precision.md).
        bf16 = cfg.run.precision == "bf16" or (cfg.run.precision == "auto" and gpu)
        self.amp_dtype = torch.bfloat16 if bf16 else None
        self.memory_format = torch.channels_last if cfg.run.channels_last else torch.contiguous_format
        self.manifest = load_manifest(cfg.data.root, self.endpoint)
        self.classes = self.manifest["classes"]
        # The driver refused this already (ray_job.fit); again here for callers that start workers themselves.
        check_objective(cfg, self.manifest, f"{cfg.data.root}/manifest.json")
        # sigmoid: loaders yield multi-hot targets from every label of a sample (data_prep's json "labels")
        self.multi_hot = cfg.optim.objective == "sigmoid"

    # ---- build -------------------------------------------------------------------------------
    def build(self) -> None:
        import deepspeed

        from models.flops import train_flops_per_image

        cfg = self.cfg
        torch.manual_seed(cfg.run.seed)  # identical initial weights on every rank
        self.model, self.model_info, self.init_src = build_model(cfg.model, len(self.classes))
        self.exclude = self.model.agc_exclude_names()
        self.flops_per_image = train_flops_per_image(self.model.cfg, cfg.aug.train_res, len(self.classes))
        if cfg.optim.sam_rho > 0:  # SAM's ascent pass: a second forward/backward per image
            self.flops_per_image *= 2
        self.opt = SkippableSGD(self.model.param_groups(cfg.optim.weight_decay), lr=cfg.peak_lr,
                                momentum=cfg.optim.momentum, nesterov=cfg.optim.nesterov)  # fmt: skip
        self.opt.skip = True  # ZeRO-1/2 step the optimizer once at init to create its state: not an update
        self.engine, _, _, _ = deepspeed.initialize(model=self.model.to(self.device), optimizer=self.opt,
                                                    config=deepspeed_config(cfg, self.amp_dtype is not None, self.A), dist_init_required=False)  # fmt: skip
        self.opt.skip = False
        self.module = self.engine.module
        self.ema = make_ema(self.module, cfg.optim.ema_decay) if cfg.optim.ema_decay > 0 else None
        if cfg.run.compile:  # after the EMA copy, which stays eager; compiles in place (names unchanged)
            self.engine.compile()
        # device_seconds: workers x seconds of every attempt (resumed attempts add theirs); resizes: one
        # record per change of world size; world_size and ckpt_unix: the attempt that wrote a checkpoint.
        self.counters = {"step": 0, "samples_seen": 0, "train_flops": 0.0, "bad_samples": 0, "skipped_steps": 0,
                         "wall_time_s": 0.0, "ema_updates": 0, "resumes": 0, "resumed_from": None, "device_seconds": 0.0,
                         "resizes": [], "world_size": self.world, "ckpt_unix": None, "submission": self.submission}  # fmt: skip
        self.pending_resize = None

    def maybe_resume(self) -> None:
        import ray.train

        ckpt = ray.train.get_checkpoint()
        if ckpt is None:
            return
        ck = open_ray(ckpt)  # each rank reads by byte range what it restores; nothing is downloaded whole
        restore(ck, self.module, self.opt, self.ema, self.engine.optimizer)
        self.counters.update(ck.trainer["counters"])
        c = self.counters
        c["resumes"] += 1
        c["resumed_from"] = c["step"]
        # From the checkpoint's save to this attempt's start: the steps done after the checkpoint (lost),
        # Ray noticing the failure or the new node, and placing the workers. Within one submission the
        # devices were held through it: counted at this attempt's size (the old group's end is not
        # observable from here). A re-submission's gap is a person's, not device time.
        gap = max(0.0, self.t_start_unix - c["ckpt_unix"]) if c.get("ckpt_unix") else None  # hosts' clocks may differ
        if gap is not None and c.get("submission") == self.submission and self.submission is not None:
            c["device_seconds"] += self.world * gap
        c["submission"] = self.submission
        prev = c.get("world_size") or self.world
        if prev != self.world:  # completed at this attempt's first step (_note_resize)
            self.pending_resize = {"step": c["step"], "from": prev, "to": self.world,
                                   "checkpoint_to_restart_s": None if gap is None else round(gap, 3)}  # fmt: skip
        c["world_size"] = self.world
        if self.ema is not None:
            self.ema.n_averaged.fill_(self.counters["ema_updates"])
        if self.rank == 0:
            log.warning("resumed from checkpoint at step %d", self.counters["step"])

    # ---- loop --------------------------------------------------------------------------------
    def run(self) -> None:
        cfg = self.cfg
        if cfg.run.mode == "eval":
            return self.evaluate_only()
        self.build()
        self.maybe_resume()
        layout = Layout(cfg.schedule.micro_batch, self.world, self.A)
        start = self.counters["step"]
        self.train_dl, self.train_ds = train_loader(
            cfg.data.root, layout, self.rank, cfg.aug, workers=cfg.data.workers, prefetch=cfg.data.prefetch,
            split=cfg.data.train_split, seed=cfg.run.seed, start_step=start, shuffle_window=cfg.data.shuffle_window,
            endpoint=self.endpoint, decode_threads=cfg.data.decode_threads, s3_retry_s=cfg.data.s3_retry_s,
            substitute_on_s3_outage=cfg.data.substitute_on_s3_outage, multi_hot=self.multi_hot,
        )  # fmt: skip
        self.total_steps = cfg.total_steps(self.train_ds.total, self.flops_per_image)
        steps_per_epoch = self.train_ds.total / cfg.schedule.global_batch
        self.writer = self._writer() if self.rank == 0 else None
        it = iter(self.train_dl)
        bad_in_row, t_last, imgs_since = 0, time.perf_counter(), 0
        t_run = time.perf_counter() - self.counters["wall_time_s"]
        first_step, t_attempt = self.counters["step"], time.perf_counter()  # the ETA's rate: this attempt's steps and time
        self.t_dev = self.t_start  # device time is counted up to here (every step adds world x its seconds)
        for step in range(start, self.total_steps):
            lr = lr_at(step, cfg, steps_per_epoch, self.total_steps)
            for group in self.opt.param_groups:
                group["lr"] = lr
            losses, bad_samples = [], 0
            batches = [next(it) for _ in range(self.A)]
            loss_fn = self._micro_loss(step)
            sam_w = sam_ascend(self.module, batches, loss_fn, cfg.optim.sam_rho)[0] if cfg.optim.sam_rho > 0 else None
            for a, batch in enumerate(batches):
                loss = loss_fn(self.engine, a, batch)
                self.engine.backward(loss)
                losses.append(loss.detach())
                bad_samples += batch["bad"]
                if a == self.A - 1:
                    if sam_w is not None:  # the gradient was taken at w + e; step from w
                        sam_restore(self.module, sam_w)
                    stats = self._boundary(torch.stack(losses))
                self.engine.step()
            skipped = self.opt.skip
            self.opt.skip = False
            # on the engine's device: NCCL has no CPU tensors
            bad = torch.tensor(float(bad_samples), dtype=torch.float64, device=self.device)
            flags = torch.stack([torch.stack(losses).mean().double(), bad])
            torch.distributed.all_reduce(flags)
            mean_loss = flags[0].item() / self.world
            c = self.counters
            c["step"] = step + 1
            c["samples_seen"] += cfg.schedule.global_batch
            c["train_flops"] += self.flops_per_image * cfg.schedule.global_batch
            c["bad_samples"] += int(flags[1].item())
            if skipped:
                c["skipped_steps"] += 1
                bad_in_row += 1
                if bad_in_row >= cfg.schedule.max_bad_steps:
                    msg = (f"{bad_in_row} consecutive steps had a non-finite loss (last at step {step}); stopping. "
                           "The last good checkpoint is kept; lower optim.lr_base or check the data.")  # fmt: skip
                    # A sweep records this run as diverged (not failed, not retried) from results.json.
                    self._write_results({"status": "diverged", "reason": msg, "training": self._training_counters()})
                    self._wait_for_upload(timeout=600)  # the pending checkpoint (and TensorBoard) reach storage
                    raise NonFiniteLossError(msg)
            else:
                bad_in_row = 0
                if self.ema is not None:
                    self.ema.update_parameters(self.module)
                    c["ema_updates"] += 1
            imgs_since += cfg.schedule.global_batch
            self._count_device_time()
            if self.pending_resize is not None:
                self._note_resize()
            if self.writer is not None:  # every step: which world size computed it
                self.writer.add_scalar("progress/world_size", self.world, step + 1)
            # every log_every steps, and the last step (a run shorter than log_every still shows one line)
            if self.writer is not None and ((step + 1) % cfg.schedule.log_every == 0 or step + 1 == self.total_steps):
                ips = imgs_since / max(time.perf_counter() - t_last, 1e-9)
                self._log_train(step + 1, mean_loss, lr, stats, ips, skipped)
                if self.rank == 0:
                    now = time.perf_counter()
                    print(step_line(step + 1, self.total_steps, steps_per_epoch, now - t_run, (c["step"] - first_step) / (now - t_attempt),
                                    mean_loss, lr, stats.clip_fraction, ips), flush=True)  # fmt: skip
                t_last, imgs_since = time.perf_counter(), 0
            c["wall_time_s"] = time.perf_counter() - t_run
            last = step + 1 == self.total_steps
            metrics = {"step": step + 1, "loss": mean_loss, "lr": lr, "final": last}  # final: no resize after it
            if (cfg.schedule.eval_every and (step + 1) % cfg.schedule.eval_every == 0) or last:
                metrics.update(self._evaluate(step + 1))
            # Report to Ray Train only with checkpoints: its controller takes one report per worker
            # every 2 s (RAY_TRAIN_HEALTH_CHECK_INTERVAL_S) through a queue of size 1, so a report
            # every step caps training at one step per 2 s. Per-step metrics go to TensorBoard.
            if (cfg.schedule.ckpt_every and (step + 1) % cfg.schedule.ckpt_every == 0) or last:
                self._checkpoint(metrics)
        if self.pending_resize is not None:  # resumed after the last step: no step to note it at
            self._note_resize()
        if not getattr(self, "last_eval", None):  # resumed at the end (e.g. a failure after the last step): evaluate now
            self._evaluate(self.total_steps)
        ev, names = self.last_eval, metric_names(cfg.optim.objective)
        self._count_device_time()
        self._write_results({
            **{tag: {k: ev[f"heldout_{tag}_{k}"] for k in names} for tag in ("raw", "ema") if f"heldout_{tag}_loss" in ev},
            "samples": ev.get("heldout_samples"), "bad_samples": ev.get("heldout_bad"),
            "pretraining": self.init_src.summary if self.init_src is not None else None,
            "training": self._training_counters(), "status": "ok",
        })  # fmt: skip
        if self.cfg.run.export:
            self._export()
        if self.writer is not None:
            self.writer.close()
            self._wait_for_upload()  # its TensorBoard sync must not land after (and overwrite) this final one
            self._sync_tensorboard()

    def _training_counters(self) -> dict:
        c = {k: self.counters[k] for k in ("step", "samples_seen", "train_flops", "wall_time_s", "skipped_steps", "resumes")}
        return {**c, "epochs": c["samples_seen"] / self.train_ds.total, "train_flops_per_image": self.flops_per_image,
                "world_size": self.world, "device_hours": self.counters["device_seconds"] / 3600,
                "resizes": self.counters["resizes"]}  # fmt: skip

    def _count_device_time(self) -> None:
        now = time.perf_counter()
        self.counters["device_seconds"] += self.world * (now - self.t_dev)
        self.t_dev = now

    def _note_resize(self) -> None:
        """At the first step after a restart at another world size: record the resize with how long the
        run waited (checkpoint save -> first step at the new size) and this attempt's start-up."""
        r, self.pending_resize = self.pending_resize, None
        r["startup_s"] = round(time.perf_counter() - self.t_start, 3)
        if r["checkpoint_to_restart_s"] is not None:
            r["wait_s"] = round(r["checkpoint_to_restart_s"] + r["startup_s"], 3)
        self.counters["resizes"].append(r)
        if self.rank == 0:
            print(f"resized from {r['from']} to {r['to']} workers at step {r['step']}: accumulation {self.A}, "
                  f"waited {r.get('wait_s', '?')} s from the checkpoint to the first step", flush=True)  # fmt: skip
            if self.writer is not None and "wait_s" in r:
                self.writer.add_scalar("progress/resize_wait_s", r["wait_s"], r["step"])

    def _micro_loss(self, step: int):
        """loss of micro-batch a of this rank at `step`; stochastic depth/dropout seeded per (step, slot)
        so the SAM ascent pass and the main pass drop the same blocks."""
        cfg = self.cfg
        criterion = loss_for(cfg.optim.objective)  # soft (B, C) targets either way: softmax or per-class sigmoid CE

        def loss_fn(module, a: int, batch: dict) -> torch.Tensor:
            torch.manual_seed(seed_for(cfg.run.seed, step, self.rank * self.A + a))
            x = normalize(batch["image"].to(self.device, non_blocking=True), self.memory_format)
            y = batch["target"].to(self.device, non_blocking=True)
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp_dtype is not None):
                logits = module(x)
            if self.amp_dtype is not None and logits.dtype != self.amp_dtype:  # never train fp32 unawares
                raise RuntimeError(f"run.precision=bf16 but the model computed {logits.dtype} logits: autocast did not "
                                   "reach the forward pass (DeepSpeed's torch_autocast section?)")  # fmt: skip
            return criterion(logits, y)

        return loss_fn

    def _boundary(self, losses: torch.Tensor):
        """At the accumulation boundary: agree on finiteness across ranks, then AGC."""
        from .agc import AGCStats

        finite = torch.isfinite(losses).all().float().reshape(1)  # on the engine's device, like every collective
        torch.distributed.all_reduce(finite, op=torch.distributed.ReduceOp.MIN)
        if finite.item() < 1:
            self.opt.skip = True
            return AGCStats(torch.zeros(()), 0, torch.zeros(()))
        if self.cfg.optim.agc_clip > 0:
            return agc_at_boundary(self.module, self.exclude, self.cfg.optim.agc_clip, self.cfg.optim.agc_eps, self.cfg.run.zero_stage)
        return AGCStats(torch.zeros(()), 0, torch.zeros(()))

    # ---- evaluation, logging, checkpoints, export ----------------------------------------------
    def _eval_loader(self):
        d = self.cfg.data
        return eval_loader(d.root, d.eval_split, self.cfg.schedule.micro_batch, self.rank, self.world, self.cfg.aug,
                           workers=d.workers, endpoint=self.endpoint, decode_threads=d.decode_threads,
                           s3_retry_s=d.s3_retry_s, substitute_on_s3_outage=d.substitute_on_s3_outage,
                           multi_hot=self.multi_hot)[0]  # fmt: skip

    def _evaluate(self, step: int) -> dict:
        cfg = self.cfg
        dl = self._eval_loader()
        out = {}
        for tag, module in (("raw", self.module), ("ema", self.ema.module if self.ema is not None else None)):
            if module is None:
                continue
            r = evaluate(module, dl, self.device, self.amp_dtype, self.memory_format, cfg.optim.objective)
            for k in metric_names(cfg.optim.objective):  # sigmoid adds heldout/{tag}_map
                out[f"heldout_{tag}_{k}"] = r[k]
                if self.writer is not None:
                    self.writer.add_scalar(f"heldout/{tag}_{k}", r[k], step)
            out["heldout_samples"], out["heldout_bad"] = r["samples"], r["bad"]
        if self.rank == 0:  # its own line, not only inside Ray's TrainingReport dumps
            shown = "  ".join(f"{tag} " + " ".join(f"{k} {out[f'heldout_{tag}_{k}']:.4f}" for k in metric_names(cfg.optim.objective))
                              for tag in ("raw", "ema") if f"heldout_{tag}_loss" in out)  # fmt: skip
            print(f"eval step {step}: {cfg.data.eval_split} ({out.get('heldout_samples')} images)  {shown}", flush=True)
        self.last_eval = out
        return out

    def evaluate_only(self) -> None:
        """run.mode=eval: model.init_from on data.eval_split, raw and EMA weights, into results.json."""
        cfg = self.cfg
        src = load_source(cfg.model.init_from, cfg.model)
        where = f"{cfg.data.root} (split {cfg.data.eval_split})"
        if src.classes is not None:
            check_classes(src.classes, self.classes, src.url, where)
        elif src.num_classes != len(self.classes):
            raise ValueError(f"class mismatch: {src.url} has {src.num_classes} classes, {where} has {len(self.classes)}")
        dl = self._eval_loader()
        out = {}
        for tag in ("raw", "ema"):
            if tag == "ema" and src.ema is None:
                continue
            model = model_from_source(src, tag, cfg.model.overrides if src.kind != "timm" else {}).to(self.device)
            r = evaluate(model, dl, self.device, self.amp_dtype, self.memory_format, cfg.optim.objective)
            out[tag] = {k: r[k] for k in metric_names(cfg.optim.objective)}
            out.update(samples=r["samples"], bad_samples=r["bad"])
        self._write_results({**out, "pretraining": src.summary})

    def _write_results(self, results: dict) -> None:
        """results.json in the run directory: what the fine-tuning stage and the sweeps read."""
        if self.rank != 0:
            return
        cfg = self.cfg
        # "objective": what top1/top5/loss mean, and whether there is a map (pipeline/train/evaluate.py)
        doc = {"mode": cfg.run.mode, "init_from": cfg.model.init_from, "data": cfg.data.root, "split": cfg.data.eval_split,
               "eval_res": cfg.aug.eval_res, "eval_crop": cfg.aug.eval_crop, "classes": len(self.classes),
               "data_rejected": self.manifest.get("rejected", 0), "objective": cfg.optim.objective, **results}  # fmt: skip
        root = cfg.run.storage if cfg.run.storage.startswith("s3://") else os.path.abspath(cfg.run.storage)
        store = Store(f"{root.rstrip('/')}/{cfg.run.name}", self.endpoint)
        store.write_bytes_atomic("results.json", json.dumps(doc, indent=1).encode())
        print(json.dumps({"results": store.url("results.json"), **doc}), flush=True)

    def _writer(self):
        from torch.utils.tensorboard import SummaryWriter

        self.tb_dir = self._run_store_local("tensorboard")
        return SummaryWriter(self.tb_dir)

    def _run_store_local(self, sub: str) -> str:
        """A local directory for `sub` of the run: inside the run dir for local storage, else a temp dir synced later."""
        storage = self.cfg.run.storage
        if storage.startswith("s3://"):
            return tempfile.mkdtemp(prefix=f"nfnet-{sub}-")
        path = os.path.join(os.path.abspath(storage), self.cfg.run.name, sub)
        os.makedirs(path, exist_ok=True)
        return path

    def _sync_tensorboard(self) -> None:
        if self.cfg.run.storage.startswith("s3://"):
            store = Store(f"{self.cfg.run.storage.rstrip('/')}/{self.cfg.run.name}/tensorboard", self.endpoint)
            for name in os.listdir(self.tb_dir):
                p = os.path.join(self.tb_dir, name)
                if os.path.isfile(p):
                    store.write_bytes_atomic(name, open(p, "rb").read())

    def _log_train(self, step: int, loss: float, lr: float, stats, ips: float, skipped: bool) -> None:
        w, c = self.writer, self.counters
        w.add_scalar("train/loss", loss, step)
        w.add_scalar("train/lr", lr, step)
        w.add_scalar("train/agc_clip_fraction", stats.clip_fraction, step)
        w.add_scalar("train/agc_max_ratio", float(stats.max_ratio), step)
        w.add_scalar("train/skipped_steps", c["skipped_steps"], step)
        w.add_scalar("perf/images_per_s", ips, step)
        w.add_scalar("progress/samples_seen", c["samples_seen"], step)
        w.add_scalar("progress/train_flops", c["train_flops"], step)
        w.add_scalar("progress/epochs", c["samples_seen"] / self.train_ds.total, step)
        w.add_scalar("data/bad_samples", c["bad_samples"], step)
        peak = self.cfg.run.device_peak_flops
        if not peak and self.device.type == "cuda":
            peak = peak_bf16_flops(torch.cuda.get_device_name(self.device))
        if peak:
            w.add_scalar("perf/mfu", ips * self.flops_per_image / (peak * self.world), step)

    def _checkpoint(self, metrics: dict) -> None:
        """Every rank copies what it owns to host memory (the only stall: ~state / world bytes), then Ray
        Train's upload thread writes and uploads the shard while training goes on (pipeline/train/
        checkpoint.py). Ray registers the checkpoint once every rank's upload is done."""
        import ray.train
        from ray.train import CheckpointUploadMode

        t0 = time.perf_counter()
        self._count_device_time()
        self.counters["ckpt_unix"] = time.time()  # a restart measures its wait from here
        # Back-pressure: one checkpoint in flight at a time, so host copies never pile up when uploads are
        # slower than ckpt_every (Ray's upload pool is one thread with an unbounded queue).
        self._wait_for_upload()
        snap = snapshot(self.module, self.opt, self.ema, self.engine.optimizer, self.rank, self.world, self.counters["step"])
        doc = None
        if self.rank == 0:
            doc = {"counters": dict(self.counters), "config": self.cfg.to_dict(), "model": self.model_info, "classes": self.classes}
            if self.writer is not None:
                self.writer.flush()
        storage = ray.train.get_context().get_storage()
        d = tempfile.mkdtemp(prefix="nfnet-ckpt-")
        sync_tb = self.rank == 0 and self.cfg.run.storage.startswith("s3://")

        done = self._upload_done = threading.Event()

        def upload(checkpoint, dir_name: str):  # in Ray's checkpoint-upload thread
            persisted = []
            try:  # shard first, its index in a second copy (write_shard)
                write_shard(d, snap, doc, lambda folder: persisted.append(
                    storage.persist_current_checkpoint(ray.train.Checkpoint.from_directory(folder), dir_name)))
                if sync_tb:  # a crash keeps the TensorBoard log up to the last checkpoint
                    self._sync_tensorboard()
                return persisted[-1]
            finally:
                done.set()

        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d),
                         checkpoint_upload_mode=CheckpointUploadMode.ASYNC, checkpoint_upload_fn=upload)  # fmt: skip
        stall = time.perf_counter() - t0
        self.ckpt_stats = {"stall_s": stall, "snapshot_bytes": snap.nbytes}
        if self.writer is not None:
            self.writer.add_scalar("perf/checkpoint_stall_s", stall, self.counters["step"])
            self.writer.add_scalar("perf/checkpoint_host_bytes_rank0", snap.nbytes, self.counters["step"])

    def _wait_for_upload(self, timeout: float | None = None) -> None:
        done = getattr(self, "_upload_done", None)
        if done is not None and not done.wait(timeout):
            log.warning("checkpoint upload still running after %.0f s", timeout)

    def _export(self) -> None:
        if self.rank != 0:  # weights and EMA are whole on every rank at ZeRO 0/1/2: no gather
            return
        c = self.counters
        summary = {
            "train_flops": c["train_flops"], "samples_seen": c["samples_seen"],
            "epochs": c["samples_seen"] / self.train_ds.total, "steps": c["step"],
            "train_flops_per_image": self.flops_per_image, "wall_time_s": c["wall_time_s"],
            "skipped_steps": c["skipped_steps"], "bad_samples": c["bad_samples"], "world_size": self.world,
            "resumes": c["resumes"], "resumed_from": c["resumed_from"], "resizes": c["resizes"],
            "device_hours": c["device_seconds"] / 3600,
            "global_batch": self.cfg.schedule.global_batch, "data": self.cfg.data.root,
            # Informational: fine-tuning starts any export the same way (a new head for its classes), and
            # says what the held-out numbers below mean (sigmoid: any-label top-1, mAP).
            "objective": self.cfg.optim.objective,
            **getattr(self, "last_eval", {}),
        }  # fmt: skip
        dest = f"{self.cfg.run.storage.rstrip('/')}/{self.cfg.run.name}/export"
        if not dest.startswith("s3://"):
            dest = os.path.abspath(dest)
        write_export(dest, self.module, self.ema, self.model_info, self.classes, summary, self.endpoint)
        if self.writer is not None:
            hparams = {"model": self.cfg.model.name, "width_mult": self.cfg.model.width_mult, "lr_base": self.cfg.optim.lr_base,
                       "global_batch": self.cfg.schedule.global_batch, "agc_clip": self.cfg.optim.agc_clip,
                       "weight_decay": self.cfg.optim.weight_decay, "zero_stage": self.cfg.run.zero_stage}  # fmt: skip
            final = {f"final/{k}": v for k, v in getattr(self, "last_eval", {}).items() if isinstance(v, float)}
            self.writer.add_hparams(hparams, final, run_name=".")
        log.warning("export written to %s", dest)
        print(json.dumps({"export": dest, **summary}))


def train_loop_per_worker(config: dict) -> None:
    """Ray Train entry point; `config` is {"train": TrainConfig.to_dict()}."""
    TrainRun(TrainConfig.from_dict(config["train"]), config.get("submission")).run()
