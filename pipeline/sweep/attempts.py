"""What a sweep's runs cost: every attempt of every Ray task, in device-hours, kept durably.

The runner (the driver) records each attempt of a pretraining point or a fine-tuning run in
{sweep}/attempts.jsonl, one JSON line per attempt, when it submits the task, every HEARTBEAT_S while
the task runs, and when it returns:

    {"point", "kind": "pretrain" | "finetune", "config_hash", "workers", "start", "last_seen", "end", "status"}

An attempt costs (end - start) x workers device-seconds: the whole task (start-up, data, training,
evaluation, export; and any wait for room on the cluster, which is not told apart), one device per
worker. An attempt the driver never saw end (it was killed) counts up to its last heartbeat, so at
most HEARTBEAT_S of it is missed. The file only grows: a re-run of the sweep adds its attempts to
those of earlier runs. The driver is the only writer, so rewriting the whole file atomically on
each change is safe on local disks and on S3 (which cannot append).
"""

from __future__ import annotations

import json
import math
import time

from data_prep.storage import Store

HEARTBEAT_S = 60.0
NAME = "attempts.jsonl"
# Attempts that did not finish their run: they raised, their process died, or the driver was cut
# off while they ran ("interrupted"; "running" is what such an attempt says in the file).
FAILED = ("failed", "interrupted", "running")


def attempt_hours(records: list[dict], point: str, kind: str, config_hash: str) -> tuple[float, float]:
    """(device-hours of every attempt of this run, the part spent on attempts that failed)."""
    total = failed = 0.0
    for r in records:
        if (r["point"], r["kind"], r["config_hash"]) != (point, kind, config_hash):
            continue
        end = r["end"] if r.get("end") is not None else r["last_seen"]
        h = max(0.0, end - r["start"]) * r["workers"] / 3600
        total += h
        failed += h if r["status"] in FAILED else 0.0
    return total, failed


class AttemptLog:
    """attempts.jsonl of one sweep (see the module docstring); `clock` is replaceable for tests."""

    def __init__(self, root: str, endpoint: str | None = None, clock=time.time):
        self.store, self.clock = Store(root, endpoint), clock
        data = self.store.read_if_exists(NAME)
        self.records = [json.loads(line) for line in (data or b"").decode().splitlines() if line.strip()]
        for r in self.records:  # left running by a driver that is gone (one driver per sweep)
            if r["status"] == "running":
                r["status"] = "interrupted"

    def _save(self, now: float | None = None) -> None:
        # Every save proves the driver alive, so it refreshes every running attempt's last_seen: a
        # driver whose `ray.wait` keeps returning finished tasks (more often than HEARTBEAT_S) never
        # reaches `beat`, and its long attempts would otherwise keep their start time as last_seen.
        running = [r for r in self.records if r["status"] == "running"]
        if running:
            now = self.clock() if now is None else now
            for r in running:
                r["last_seen"] = now
        self.store.write_bytes_atomic(NAME, "".join(json.dumps(r) + "\n" for r in self.records).encode())

    def start(self, point: str, kind: str, config_hash: str, workers: int) -> int:
        """Record a submitted attempt; returns its id for `beat` and `end`."""
        now = self.clock()
        self.records.append({"point": point, "kind": kind, "config_hash": config_hash, "workers": int(workers),
                             "start": now, "last_seen": now, "end": None, "status": "running"})  # fmt: skip
        self._save(now)
        return len(self.records) - 1

    def beat(self, ids=()) -> None:
        """A heartbeat: the save refreshes every running attempt (`ids` kept for callers)."""
        self._save()

    def end(self, i: int, status: str) -> None:
        """The attempt returned; `status` is what it left its run: ok, diverged or failed."""
        now = self.clock()
        self.records[i].update(last_seen=now, end=now, status=status)
        self._save(now)

    def settle(self, point: str, kind: str, config_hash: str, status: str) -> None:
        """A run found finished that nobody saw finish: its latest interrupted attempt finished it."""
        for r in reversed(self.records):
            if (r["point"], r["kind"], r["config_hash"]) == (point, kind, config_hash):
                if r["status"] == "interrupted":
                    r["status"] = status
                    self._save()
                return

    def hours(self, point: str, kind: str, config_hash: str) -> tuple[float, float]:
        return attempt_hours(self.records, point, kind, config_hash)


def floor_hours(train_wall_time_s, workers: int) -> float:
    """The training loop's own time x workers: what a run measured itself (summed over its resumes),
    a lower bound for its attempts' total when some were never recorded (an older sweep, or a run
    that finished after the driver was gone)."""
    try:
        t = float(train_wall_time_s)
    except (TypeError, ValueError):
        return 0.0
    return t * workers / 3600 if math.isfinite(t) else 0.0
