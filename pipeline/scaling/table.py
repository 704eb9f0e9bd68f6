"""The sweep's results table: one row per pretraining run, CSV or Parquet (by extension), local or s3://.

Written whole and atomically after every finished run, so an interrupted sweep never leaves a
half-written table; `point` is the key a re-run uses to skip finished runs.

Cost columns (pipeline/sweep/attempts.py): `device_hours` is every pretraining attempt of the
point (its Ray task's wall time x workers, failed attempts included), `failed_device_hours` the
part spent on attempts that failed; `finetune_device_hours` and `finetune_failed_device_hours` the
same for its fine-tuning. `train_wall_time_s` is the training loop's own time (summed over resumes).
"""

from __future__ import annotations

import csv
import io
import math

from data_prep.storage import Store

COLUMNS = [
    "point", "model", "model_name", "width_mult", "depth_mult", "params", "flops_per_image",
    "budget", "budget_kind", "budget_value", "lr_base", "peak_lr", "seed",
    "samples_seen", "epochs", "train_flops", "train_wall_time_s", "device_hours", "failed_device_hours",
    "finetune_device_hours", "finetune_failed_device_hours", "heldout_loss", "heldout_loss_raw", "heldout_loss_ema", "heldout_top1",
    "finetune_top1", "finetune_top5", "finetune_status", "status", "attempts", "error", "config_hash", "finetune_config_hash",
    "run_dir",
]  # fmt: skip
NUMERIC = {"width_mult", "depth_mult", "params", "flops_per_image", "budget_value", "lr_base", "peak_lr", "seed",
           "samples_seen", "epochs", "train_flops", "train_wall_time_s", "device_hours", "failed_device_hours",
           "finetune_device_hours", "finetune_failed_device_hours", "heldout_loss", "heldout_loss_raw", "heldout_loss_ema",
           "heldout_top1", "finetune_top1", "finetune_top5", "attempts"}  # fmt: skip
STATUSES = ("ok", "diverged", "failed")


def _num(v):
    if v in (None, ""):
        return math.nan
    return float(v)


def _split(url: str) -> tuple[str, str]:
    root, _, name = url.rstrip("/").rpartition("/")
    return root or ".", name


def read_table(url: str, endpoint: str | None = None) -> list[dict]:
    """Rows of a results table; [] when it does not exist yet. A missing column is a clear error."""
    root, name = _split(url)
    store = Store(root, endpoint)
    if not store.exists(name):
        return []
    data = store.read_bytes(name)
    if name.endswith(".parquet"):
        import pyarrow.parquet as pq

        rows = pq.read_table(io.BytesIO(data)).to_pylist()
    else:
        rows = list(csv.DictReader(io.StringIO(data.decode())))
    for i, r in enumerate(rows):
        missing = [c for c in ("point", "model", "status") if c not in r]
        if missing:
            raise ValueError(f"{url}: row {i + 1} has no {missing} column(s); is this a sweep results table?")
        if "wall_time_s" in r and r.get("train_wall_time_s") in (None, ""):  # the column's name before it was split out
            r["train_wall_time_s"] = r.pop("wall_time_s")
        for c in COLUMNS:  # an older table: absent columns read as empty
            r.setdefault(c, "")
        for c in NUMERIC & set(r):
            try:
                r[c] = _num(r[c])
            except (TypeError, ValueError):
                raise ValueError(f"{url}: row {i + 1} ({r['point']}): column {c!r} is not a number: {r[c]!r}") from None
    return rows


def write_table(url: str, rows: list[dict], endpoint: str | None = None) -> None:
    root, name = _split(url)
    store = Store(root, endpoint)
    rows = [{c: r.get(c, "") for c in COLUMNS} for r in rows]
    if name.endswith(".parquet"):
        import pyarrow as pa
        import pyarrow.parquet as pq

        cols = {c: [(_num(r[c]) if c in NUMERIC else str(r[c])) for r in rows] for c in COLUMNS}
        buf = io.BytesIO()
        pq.write_table(pa.table(cols), buf)
        store.write_bytes_atomic(name, buf.getvalue())
        return
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({c: ("" if isinstance(v, float) and math.isnan(v) else v) for c, v in r.items()})
    store.write_bytes_atomic(name, buf.getvalue().encode())


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def device_hour_totals(rows: list[dict]) -> dict[str, float]:
    """The sweep's device-hours in three parts that add up to `total`: pretraining and fine-tuning
    attempts that finished their run, and failed attempts of either (retried or given up); also
    `diverged`, the part of pretraining spent on runs that diverged. nan when the table records none."""

    def total(col: str, status: str | None = None) -> float:
        return float(sum(r[col] for r in rows if (status is None or r.get("status") == status) and _finite(r.get(col))))

    if not any(_finite(r.get("device_hours")) for r in rows):
        return dict.fromkeys(("pretraining", "finetuning", "failed", "total", "diverged"), math.nan)
    failed_pre, failed_ft = total("failed_device_hours"), total("finetune_failed_device_hours")
    out = {"pretraining": total("device_hours") - failed_pre, "finetuning": total("finetune_device_hours") - failed_ft,
           "failed": failed_pre + failed_ft, "diverged": total("device_hours", "diverged") - total("failed_device_hours", "diverged")}  # fmt: skip
    out["total"] = out["pretraining"] + out["finetuning"] + out["failed"]
    return out
