"""Run a scaling sweep: pretraining points as Ray tasks (at most `parallel` at a time, each a
TorchTrainer that waits for room on the cluster), fine-tuning of the selected runs, the results
table after every finished run, and the fit at the end.

Resumable: a point whose row says ok or diverged (with the same config hash) is skipped; a point
that finished while the sweep was not watching (results.json in its run dir, same config) is
recorded without training; a failed point is re-run up to `max_retries` times and resumes from its
last checkpoint (same storage and name). Diverged runs are recorded and never fitted.

Cost: every attempt (pretraining and fine-tuning, failed ones too) is in the sweep's attempt log
(attempts.py); a row's device-hours columns are its attempts' totals.
"""

from __future__ import annotations

import json
import math
import os
import time
import traceback

from data_prep.manifest import load_manifest
from data_prep.storage import Store

from pipeline.config import TrainConfig
from pipeline.scaling.analysis import cells as best_cells
from pipeline.scaling.laws import frontier
from pipeline.scaling.table import read_table, write_table

from .attempts import HEARTBEAT_S, AttemptLog, floor_hours
from .spec import Point, SweepSpec, config_hash, finetune_config, point_config, points


def _run_task(cfg_dict: dict) -> str | None:
    """In a Ray task: train one run to completion. None on success, else the error (last 2000 chars)."""
    from pipeline.train.ray_job import fit, save_config

    cfg = TrainConfig.from_dict(cfg_dict)
    try:
        save_config(cfg)
        fit(cfg)
        return None
    except Exception as e:  # noqa: BLE001 - any failure is recorded in the table, never lost
        return (f"{type(e).__name__}: {e}\n" + traceback.format_exc())[-2000:]


def _run_dir(cfg: TrainConfig) -> str:
    return f"{cfg.run.storage.rstrip('/')}/{cfg.run.name}"


def _read_json(url: str, name: str, endpoint) -> dict | None:
    store = Store(url, endpoint)
    return json.loads(store.read_bytes(name)) if store.exists(name) else None


def _int(x, default: int = 0) -> int:
    """Table cells may be "" or NaN (an older or hand-edited table)."""
    try:
        v = float(x)
    except (TypeError, ValueError):
        return default
    return int(v) if math.isfinite(v) else default


def _params(cfg: TrainConfig, classes: int) -> int:
    from models import create_model

    m = create_model(cfg.model.name, classes, width_mult=cfg.model.width_mult, depth_mult=cfg.model.depth_mult,
                     device="meta", **cfg.model.overrides)  # fmt: skip
    return sum(p.numel() for p in m.parameters())


class Sweep:
    def __init__(self, spec: SweepSpec, *, retry_failed: bool = False, log=print):
        self.spec, self.log, self.retry_failed = spec, log, retry_failed
        self.points = points(spec)
        self.cfgs = {p.name: point_config(spec, p) for p in self.points}
        first = next(iter(self.cfgs.values()))
        self.endpoint = first.data.s3_endpoint or None
        if "working_dir_files" in os.path.abspath(spec.root):  # would vanish with Ray's copy of the working dir
            raise ValueError(f"storage {spec.storage!r} resolves inside Ray's temporary copy of the working dir "
                             f"({os.path.abspath(spec.root)}); pass an absolute path or s3:// URI: --set storage=/abs/runs")  # fmt: skip
        try:
            self.manifest = load_manifest(first.data.root, self.endpoint)
        except Exception as e:
            if "working_dir_files" not in first.data.root:
                raise
            raise type(e)(f"{e}. Relative paths in a SPEC resolve inside Ray's copy of the working dir, which has no "
                          "data/ (git-ignored): pass an absolute path or s3:// URI, e.g. --point-set data.root=/abs/path") from e  # fmt: skip
        self.classes = len(self.manifest["classes"])
        self.rows = {r["point"]: r for r in read_table(spec.table, self.endpoint)}
        self.attempts = AttemptLog(spec.root, self.endpoint)

    # ---- one row per run ---------------------------------------------------------------------
    def _base_row(self, p: Point, cfg: TrainConfig) -> dict:
        return {"point": p.name, "model": p.model.label, "model_name": p.model.name, "width_mult": p.model.width_mult,
                "depth_mult": p.model.depth_mult, "params": _params(cfg, self.classes), "budget": p.budget.label,
                "budget_kind": p.budget.kind, "budget_value": p.budget.value, "lr_base": p.lr, "peak_lr": cfg.peak_lr,
                "seed": p.seed, "config_hash": config_hash(cfg), "run_dir": _run_dir(cfg)}  # fmt: skip

    def _collect(self, p: Point, error: str | None, attempts: int) -> dict:
        cfg = self.cfgs[p.name]
        row = {**self.rows.get(p.name, {}), **self._base_row(p, cfg), "attempts": attempts, "error": ""}
        res = _read_json(_run_dir(cfg), "results.json", self.endpoint)
        if res is None or res.get("status") not in ("ok", "diverged"):
            row.update(status="failed", error=(error or "no results.json was written").strip().splitlines()[-1][:300])
            return row
        t = res["training"]
        row.update(samples_seen=t["samples_seen"], epochs=t["epochs"], train_flops=t["train_flops"], train_wall_time_s=t["wall_time_s"],
                   flops_per_image=t["train_flops_per_image"])  # fmt: skip
        if res["status"] == "diverged":
            row.update(status="diverged", error=res.get("reason", "")[:300], heldout_loss=math.nan)
            return row
        raw, ema = res.get("raw", {}), res.get("ema", {})
        row.update(heldout_loss_raw=raw.get("loss", math.nan), heldout_loss_ema=ema.get("loss", math.nan))
        pick = ema if self.spec.metric == "ema" and ema else raw
        loss = pick.get("loss", math.nan)
        row.update(heldout_loss=loss, heldout_top1=pick.get("top1", math.nan), status="ok")
        chance = math.log(self.classes)
        if "loss" not in pick:  # no evaluation was recorded: not a verdict on the run
            row.update(status="failed", error="results.json holds no held-out evaluation")
        elif not math.isfinite(loss) or loss > self.spec.diverged_factor * chance:
            row.update(status="diverged", error=f"held-out loss {loss:.4g} > {self.spec.diverged_factor} x ln({self.classes}) = "
                                                f"{self.spec.diverged_factor * chance:.4g} (chance level)")  # fmt: skip
        return row

    def _account(self, row: dict) -> None:
        """The row's device-hours from the attempt log: pretraining (never less than the training
        loop's own time x workers, for attempts that went unrecorded) and fine-tuning, each with the
        part spent on failed attempts."""
        total, failed = self.attempts.hours(row["point"], "pretrain", row["config_hash"])
        floor = floor_hours(row.get("train_wall_time_s"), self.cfgs[row["point"]].run.num_workers)
        row.update(device_hours=max(total, floor), failed_device_hours=failed)
        if row.get("finetune_config_hash"):
            total, failed = self.attempts.hours(row["point"], "finetune", row["finetune_config_hash"])
            row.update(finetune_device_hours=total, finetune_failed_device_hours=failed)

    def _save(self) -> None:
        order = {p.name: i for i, p in enumerate(self.points)}
        rows = sorted(self.rows.values(), key=lambda r: order.get(r["point"], len(order)))
        write_table(self.spec.table, rows, self.endpoint)

    # ---- planning ------------------------------------------------------------------------------
    def todo(self) -> list[Point]:
        out = []
        for p in self.points:
            cfg, row = self.cfgs[p.name], self.rows.get(p.name)
            h = config_hash(cfg)
            if row and row.get("config_hash") and row["config_hash"] != h and row.get("status") in ("ok", "diverged"):
                raise ValueError(f"point {p.name}: the table holds a finished run with another config (hash {row['config_hash']} != {h}); "
                                 f"the spec changed. Use another sweep name, or delete {_run_dir(cfg)} and its row in {self.spec.table}")  # fmt: skip
            if row and row.get("status") in ("ok", "diverged"):
                continue
            if row and row.get("status") == "failed" and not self.retry_failed and _int(row.get("attempts")) > self.spec.max_retries:
                self.log(f"skip {p.name}: failed {_int(row.get('attempts'))} times (re-run with --retry-failed to try again)")
                continue
            saved = _read_json(_run_dir(cfg), "config.json", self.endpoint)
            if saved is not None and saved != cfg.to_dict():  # its checkpoints belong to another config
                raise ValueError(f"point {p.name}: {_run_dir(cfg)} holds a run with another config (the spec changed). "
                                 "Use another sweep name, or delete that run directory and its row")  # fmt: skip
            if saved is not None:  # finished while nobody was watching?
                done = self._collect(p, None, _int(row.get("attempts")) if row else 1)
                if done["status"] in ("ok", "diverged"):
                    self.attempts.settle(p.name, "pretrain", h, done["status"])
                    self._account(done)
                    self.rows[p.name] = done
                    self._save()
                    continue
            out.append(p)
        return out

    def plan(self) -> list[dict]:
        """The grid with its compute: what `--plan` prints before anything runs."""
        from models import resolve_config
        from models.flops import train_flops_per_image

        total = self.manifest["splits"][self.cfgs[self.points[0].name].data.train_split]["samples"]
        out = []
        for p in self.points:
            cfg = self.cfgs[p.name]
            arch = resolve_config(cfg.model.name, cfg.model.width_mult, cfg.model.depth_mult, **cfg.model.overrides)
            fpi = train_flops_per_image(arch, cfg.aug.train_res, self.classes) * (2 if cfg.optim.sam_rho > 0 else 1)
            steps = cfg.total_steps(total, fpi)
            out.append({"point": p.name, "params": _params(cfg, self.classes), "flops_per_image": fpi, "steps": steps,
                        "train_flops": steps * cfg.schedule.global_batch * fpi, "status": self.rows.get(p.name, {}).get("status", "")})  # fmt: skip
        return out

    # ---- running ---------------------------------------------------------------------------------
    def _run_many(self, kind: str, jobs: list[tuple[str, TrainConfig, str]], on_done) -> None:
        """Run (key, cfg, config hash) as Ray tasks, `parallel` at a time; on_done(key, error, attempt)
        as each ends, which ends the attempt in the log. The log has each attempt from submission,
        with a heartbeat every HEARTBEAT_S, so a killed driver leaves its attempts' time behind."""
        import ray

        task = ray.remote(num_cpus=0, max_retries=0)(_run_task)
        queue, pending = list(jobs), {}
        while queue or pending:
            while queue and len(pending) < self.spec.parallel:
                key, cfg, h = queue.pop(0)
                self.log(f"start {key}")
                attempt = self.attempts.start(key, kind, h, cfg.run.num_workers)
                pending[task.remote(cfg.to_dict())] = (key, cfg, h, attempt, time.time())
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=HEARTBEAT_S)
            if not ready:
                self.attempts.beat([v[3] for v in pending.values()])
                continue
            key, cfg, h, attempt, t0 = pending.pop(ready[0])
            try:
                error = ray.get(ready[0])
            except Exception as e:  # noqa: BLE001 - the task's process died (OOM, lost node): record, go on
                error = f"{type(e).__name__}: {e}"[-2000:]
            self.log(f"end {key} in {time.time() - t0:.0f} s" + (f": {error.strip().splitlines()[-1]}" if error else ""))
            if on_done(key, error, attempt):
                queue.append((key, cfg, h))

    def pretrain(self) -> None:
        todo = self.todo()
        by_name = {p.name: p for p in todo}
        self.log(f"sweep {self.spec.name}: {len(self.points)} points, {len(todo)} to run, {self.spec.parallel} side by side")

        def done(key, error, attempt) -> bool:
            """Record the attempt's row; True to retry it."""
            p = by_name[key]
            attempts = _int(self.rows.get(key, {}).get("attempts")) + 1
            self.rows[key] = r = self._collect(p, error, attempts)
            self.attempts.end(attempt, r["status"])
            self._account(r)
            self._save()
            self.log(f"  {key}: {r['status']}" + (f", held-out loss {r['heldout_loss']:.4f}" if r["status"] == "ok" else f" ({r['error']})"))
            if r["status"] == "failed" and attempts <= self.spec.max_retries:
                self.log(f"  retrying {key} (attempt {attempts + 1} of {self.spec.max_retries + 1}); it resumes from its last checkpoint")
                return True
            return False

        self._run_many("pretrain", [(p.name, self.cfgs[p.name], config_hash(self.cfgs[p.name])) for p in todo], done)

    def selected_for_finetuning(self) -> list[str]:
        current = {p.name for p in self.points}  # the table may hold rows of points the spec no longer lists
        rows = [r for r in self.rows.values() if r["point"] in current]
        if self.spec.finetune.select == "all":
            return [r["point"] for r in rows if r["status"] == "ok"]
        cs = best_cells(rows, "heldout_loss")
        if self.spec.finetune.select == "frontier":
            cs = frontier(cs)
        return [c.point for c in cs]

    def finetune(self) -> None:
        from pipeline.finetune.prepare import prepare_data

        if not self.spec.finetune.preset:
            return
        by_name = {p.name: p for p in self.points}
        jobs = []
        for k in self.selected_for_finetuning():
            cfg = finetune_config(self.spec, by_name[k], self.rows[k]["run_dir"])
            h = config_hash(cfg)  # of the config before data preparation: what the SPEC asked for
            row = self.rows[k]
            if row.get("finetune_status") == "ok" and row.get("finetune_config_hash") == h:
                continue
            row.update(finetune_config_hash=h, finetune_top1=math.nan, finetune_top5=math.nan, finetune_status="")
            prepare_data(cfg, use_ray=False, progress=False)  # packs once, in the driver; then reused
            cfg.data.source = ""
            Store(_run_dir(cfg), self.endpoint).delete("results.json")  # never read a stale result as this one's
            jobs.append((k, cfg, h))
        self.log(f"fine-tuning {len(jobs)} run(s) ({self.spec.finetune.select}) with preset {self.spec.finetune.preset}")
        ft_cfgs = {k: cfg for k, cfg, _ in jobs}
        tries: dict[str, int] = {}

        def done(key, error, attempt) -> bool:
            """Record the fine-tuning result in the point's row; True to retry it."""
            tries[key] = tries.get(key, 0) + 1
            res = _read_json(_run_dir(ft_cfgs[key]), "results.json", self.endpoint)
            row = self.rows[key]
            if res is not None and res.get("status") == "ok":
                pick = res.get("ema") if self.spec.metric == "ema" and res.get("ema") else res["raw"]
                row.update(finetune_top1=pick["top1"], finetune_top5=pick["top5"], finetune_status="ok")
            else:
                row.update(finetune_status="failed", error=("fine-tuning: " + (error or "no results.json").strip().splitlines()[-1])[:300])
            self.attempts.end(attempt, row["finetune_status"])
            self._account(row)
            self._save()
            self.log(f"  {key}: fine-tuned top-1 {row.get('finetune_top1', math.nan):.4f}" if row["finetune_status"] == "ok" else f"  {key}: {row['error']}")
            return row["finetune_status"] == "failed" and tries[key] <= self.spec.max_retries

        self._run_many("finetune", jobs, done)


def run_sweep(spec: SweepSpec, *, retry_failed: bool = False, fit: bool = True, log=print) -> dict:
    """Pretrain every point, fine-tune the selected runs, fit; returns {"table", "report", "result"}."""
    sw = Sweep(spec, retry_failed=retry_failed, log=log)
    Store(spec.root, sw.endpoint).write_bytes_atomic("sweep.json", json.dumps(_spec_dict(spec), indent=1).encode())
    sw.pretrain()
    sw.finetune()
    out = {"table": spec.table, "rows": list(sw.rows.values())}
    if fit:
        from pipeline.scaling.fit import fit_table

        out["result"], out["report"] = fit_table(spec.table, f"{spec.root}/report", draws=spec.bootstrap, endpoint=sw.endpoint,
                                                 title=f"Scaling sweep {spec.name}")  # fmt: skip
    return out


def _spec_dict(spec: SweepSpec) -> dict:
    import dataclasses

    return dataclasses.asdict(spec)
