"""Shared by the launchers: argument parsing, connecting to Ray, printing where results went."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

# `ray job submit --working-dir .` runs `python launch/x.py` from the working dir: make the
# project importable without an install.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def parse(description: str, default_preset: str, extra=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=description)
    if extra is not None:
        extra(ap)
    ap.add_argument("--preset", default=default_preset, help="a preset of pipeline.config.PRESETS")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a config field, e.g. --set schedule.epochs=2 --set run.num_workers=8")  # fmt: skip
    ap.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    return ap.parse_args()


def connect_ray() -> None:
    """RAY_ADDRESS (set by `ray job submit`) or a running local cluster; else start one bound to 127.0.0.1."""
    import ray

    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address)
        return
    try:
        ray.init(address="auto")
    except ConnectionError:
        ray.init(include_dashboard=False, dashboard_host="127.0.0.1")


def absolutize(cfg):
    """Local paths relative to where the launcher runs; Ray workers have other working dirs."""
    for section, key in (("data", "root"), ("run", "storage"), ("model", "init_from"), ("data", "source"),
                         ("data", "val_labels"), ("data", "classes")):  # fmt: skip
        obj = getattr(cfg, section)
        value = getattr(obj, key)
        if key in ("source", "classes") and not os.path.exists(value):
            continue  # "fashion-mnist", comma-separated class names
        if value and not value.startswith("s3://"):
            setattr(obj, key, os.path.abspath(value))
    return cfg


def check_data(cfg) -> None:
    """Fail before any worker starts when the data is not a finished data_prep output, or is
    multi-label under optim.objective=softmax."""
    from data_prep.manifest import load_manifest
    from pipeline.config import check_objective

    manifest = load_manifest(cfg.data.root, cfg.data.s3_endpoint or None)
    check_objective(cfg, manifest, f"{cfg.data.root}/manifest.json")


def print_config(cfg) -> None:
    print("resolved config:\n" + json.dumps(cfg.to_dict(), indent=1), flush=True)
