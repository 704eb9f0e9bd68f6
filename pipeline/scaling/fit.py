"""Table in, report out: read a results table (local or s3://), analyze, write the report next to it."""

from __future__ import annotations

import math
import os
import shutil
import tempfile

import numpy as np

from data_prep.storage import Store

from .analysis import analyze
from .report import write_report
from .table import read_table

METRICS = {"raw": "heldout_loss_raw", "ema": "heldout_loss_ema", "sweep": "heldout_loss"}


def train_size_of(rows: list[dict]) -> float:
    """Images per epoch, from the rows themselves (samples_seen / epochs of finished runs)."""
    sizes = [r["samples_seen"] / r["epochs"] for r in rows
             if r.get("status") == "ok" and math.isfinite(r.get("epochs", math.nan)) and r.get("epochs", 0) > 0]  # fmt: skip
    return float(np.median(sizes)) if sizes else math.nan


def fit_table(results: str, out: str | None = None, *, metric: str = "sweep", draws: int = 500, endpoint: str | None = None,
              title: str | None = None) -> tuple[dict, str]:  # fmt: skip
    """Returns (analysis result, report.md url). `out` defaults to a `report` folder beside the table."""
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {sorted(METRICS)}, got {metric!r}")
    rows = read_table(results, endpoint)
    if not rows:
        raise FileNotFoundError(f"{results}: no results table there (or it is empty)")
    result = analyze(rows, train_size=train_size_of(rows), metric=METRICS[metric], draws=draws)
    out = out or f"{results.rstrip('/').rpartition('/')[0] or '.'}/report"
    title = title or f"Scaling sweep: {results}"
    if not out.startswith("s3://"):
        return result, write_report(result, out, title)
    tmp = tempfile.mkdtemp(prefix="nfnet-report-")
    try:
        write_report(result, tmp, title)
        store = Store(out, endpoint)
        for dirpath, _, files in os.walk(tmp):
            for name in files:
                rel = os.path.relpath(os.path.join(dirpath, name), tmp)
                with open(os.path.join(dirpath, name), "rb") as f:
                    store.write_bytes_atomic(rel, f.read())
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return result, f"{out.rstrip('/')}/report.md"
