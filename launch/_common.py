"""Shared by the launchers: argument parsing, checks before Ray, connecting, one-line errors.

Order of a launch: parse -> resolve the config (types, ranges, names: pipeline.config.validate) ->
paths -> placeholders, S3 reachability, the data's manifest -> connect to Ray -> the cluster's
resources -> fit. Everything that can fail before Ray does, in a few seconds, as `error: ...` and
exit 2 (`--debug` shows the traceback), the way `python -m data_prep` reports.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
from pathlib import Path

# `ray job submit --working-dir .` runs `python launch/x.py` from the working dir: make the
# project importable without an install.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PATH_KEYS = (("data", "root"), ("run", "storage"), ("model", "init_from"), ("data", "source"), ("data", "val_labels"), ("data", "classes"))


def parse(description: str, default_preset: str, extra=None) -> argparse.Namespace:
    from pipeline.cli.help import fields_help, presets_help

    ap = argparse.ArgumentParser(description=description, epilog=presets_help() + "\n\n" + fields_help(),
                                 formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    if extra is not None:
        extra(ap)
    ap.add_argument("--preset", default=default_preset, help="a preset (listed below)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a config field, e.g. --set schedule.epochs=2 --set run.num_workers=8")  # fmt: skip
    ap.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    ap.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    return ap.parse_args()


def guard(main) -> int:
    """Run a launcher's main: a failure is one line `error: ...` on stderr and exit status 2."""
    try:
        return main() or 0
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - the one place a launcher's errors become one line
        if "--debug" in sys.argv:
            raise
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 2


def one_line(e: BaseException) -> str:
    """Our own errors carry their message; anything else gets its type, its first line and its last
    (a training failure's message ends with the worker's own exception line), and a pointer to --debug."""
    from data_prep.manifest import ManifestError
    from data_prep.pack import PackError
    from data_prep.sources import SourceError

    cause = getattr(e, "cause", None)  # ray.exceptions.RayTaskError: the task's own exception, without Ray's header
    if isinstance(cause, BaseException):
        e = cause
    lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()] or [""]
    if isinstance(e, (ValueError, ManifestError, PackError, SourceError, FileNotFoundError, PermissionError)):
        return lines[0]
    last = f" ... {lines[-1]}" if len(lines) > 1 else ""
    return f"{type(e).__name__}: {lines[0]}{last} (run with --debug for the traceback)"


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


def in_ray_job_copy() -> bool:
    """True inside `ray job submit --working-dir`: the entrypoint runs in Ray's temporary copy of the
    directory, so a relative path would point into Ray's session directory (and outputs vanish with it)."""
    job = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    return bool(job and json.loads(job).get("runtime_env", {}).get("working_dir"))


def is_relative(value: str) -> bool:
    return bool(value) and not value.startswith("s3://") and not os.path.isabs(value)


def submit_base() -> str | None:
    """The directory relative paths mean: the working directory outside a Ray job; inside a job's copy
    of the working dir, the submit directory launch/submit.py recorded when it is on this machine; else
    None (relative paths must be refused)."""
    if not in_ray_job_copy():
        return os.getcwd()
    submit_dir, host = os.environ.get("NFNET_SUBMIT_DIR", ""), os.environ.get("NFNET_SUBMIT_HOST", "")
    return submit_dir if submit_dir and host == socket.gethostname() and os.path.isdir(submit_dir) else None


def absolutize(cfg):
    """Relative local paths -> absolute. Outside a Ray job they are relative to the launcher's working
    directory. Inside a job's copy of the working dir they are relative to where the user submitted
    from, when launch/submit.py recorded it (NFNET_SUBMIT_DIR) and that directory is on this machine;
    otherwise refused with what to do (they used to land in Ray's temporary copy)."""
    base = submit_base() or ""
    for section, key in PATH_KEYS:
        obj = getattr(cfg, section)
        value = getattr(obj, key)
        if not value or value.startswith("s3://") or os.path.isabs(value):
            continue
        if key in ("source", "classes") and (value == "fashion-mnist" or "," in value or "/" not in value and not base):
            continue  # the sample corpus, class names, a bare name (the finetune preset's "imagenet" stand-in)
        if key in ("source", "classes") and base and not os.path.exists(os.path.join(base, value)):
            continue  # not a path here (the finetune preset's "imagenet" stand-in): prepare_data names it
        if not base:
            raise ValueError(f"{section}.{key}={value} is a relative path, but this job runs in Ray's copy of the working "
                             "directory: use an absolute or s3:// path, or submit with `python launch/submit.py -- python "
                             "launch/...` (it records your directory; a local cluster only)")  # fmt: skip
        setattr(obj, key, os.path.normpath(os.path.join(base, value)))
    return cfg


def preflight(cfg, *, data: bool = True) -> dict | None:
    """Checks before Ray: placeholder buckets, S3 reachability and credentials, the data's manifest
    (returned) and its objective. Warns when the warm-up is longer than the run."""
    from pipeline.cli.preflight import check_model_name, check_s3, warmup_warning
    from pipeline.config import check_placeholders

    check_model_name(cfg)
    check_placeholders(cfg)
    check_s3(cfg)
    if not data:
        return None
    from data_prep.manifest import load_manifest
    from pipeline.config import check_objective

    manifest = load_manifest(cfg.data.root, cfg.data.s3_endpoint or None, offsets=False)  # counts and labels only
    check_objective(cfg, manifest, f"{cfg.data.root}/manifest.json")
    warning = warmup_warning(cfg, manifest)
    if warning:
        print(f"warning: {warning}", flush=True)
    return manifest


def check_cluster(cfg) -> None:
    from pipeline.cli.preflight import check_resources

    check_resources(cfg)


def print_config(cfg, full: bool = False) -> None:
    """--print-config: the whole resolved config (JSON). A run: only the values that differ from the
    defaults; the full config goes to {storage}/{name}/config.json."""
    if full:
        print("resolved config:\n" + json.dumps(cfg.to_dict(), indent=1), flush=True)
        return
    from pipeline.cli.help import non_default

    print("config (non-default values; all of it in the run's config.json): " + " ".join(non_default(cfg)), flush=True)
