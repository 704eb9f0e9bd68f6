"""The launchers as a user meets them: mistakes fail before Ray in one line, --help documents every
field, relative paths inside a Ray job, the cluster's resources, the warm-up warning."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.config import TrainConfig, resolve

REPO = Path(__file__).resolve().parents[1]


def launch(*args: str, env: dict | None = None, script: str = "launch/pretrain_f7.py") -> tuple[subprocess.CompletedProcess, float]:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "RAY_JOB_CONFIG", "AWS_"))}
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, script, *args], cwd=REPO, capture_output=True, text=True, timeout=60, env={**base, **(env or {})})
    return r, time.monotonic() - t0


def launch_here(script: str, *args: str) -> tuple[int, str, str, float]:
    """A launcher's main in this process (imports warm: ~0.1 s where a fresh interpreter takes 1-5 s),
    through the same guard as its command line; returns (exit status, stdout, stderr, seconds)."""
    import contextlib
    import importlib
    import io

    sys.path.insert(0, str(REPO / "launch"))
    module = importlib.import_module(Path(script).stem)
    out, err, argv = io.StringIO(), io.StringIO(), sys.argv
    sys.argv = [script, *args]
    t0 = time.monotonic()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                rc = module.guard(module.main)
            except SystemExit as e:  # argparse (--help)
                rc = e.code
    finally:
        sys.argv = argv
    return rc, out.getvalue(), err.getvalue(), time.monotonic() - t0


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens once the socket is closed


MISTAKES = [  # (arguments, what the one line must name)
    (["--preset", "demo", "--set", "optim.lr_bse=0.2"], "unknown config key 'optim.lr_bse'; did you mean optim.lr_base"),
    (["--preset", "demo", "--set", "optim.global_batch=512"], "did you mean schedule.global_batch"),
    (["--preset", "demo", "--set", "schedule.global_batch=abc"], "schedule.global_batch=abc: expected an integer"),
    (["--preset", "demo", "--set", "optim.lr_base=-1"], "optim.lr_base must be > 0"),
    (["--preset", "demo", "--set", "aug.label_smoothing=1.5"], "aug.label_smoothing must be in [0, 1)"),
    (["--preset", "demo", "--set", "schedule.samples=1000"], "set exactly one training length, got schedule.epochs=2 and schedule.samples=1000"),
    (["--preset", "demo", "--set", "model.name=nfnet_f99"], "model.name 'nfnet_f99' is not a model; did you mean nfnet_f"),
    (["--preset", "demo", "--set", "run.precision=fp16"], "run.precision must be one of ['auto', 'fp32', 'bf16'], got 'fp16'"),
    (["--preset", "demo", "--set", "run.zero_stage=3"], "run.zero_stage must be one of [0, 1, 2], got 3"),
    (["--preset", "demo", "--set", "run.num_workers=3"], "not divisible by micro_batch 128 x num_workers 3"),
    (["--preset", "nope"], "unknown preset 'nope'"),
    ([], "data.root=s3://YOUR-BUCKET/imagenet-wds is the preset's placeholder bucket"),
    (["--preset", "demo", "--set", "data.root=/nonexistent/pack"], "/nonexistent/pack/manifest.json not found"),
]


@pytest.mark.parametrize("args,named", MISTAKES, ids=[m[1][:40] for m in MISTAKES])
def test_a_mistake_is_one_line_exit_2_before_ray(args, named, monkeypatch):
    import importlib

    for k in [k for k in os.environ if k.startswith(("RAY_ADDRESS", "RAY_JOB_CONFIG", "AWS_"))]:
        monkeypatch.delenv(k)
    sys.path.insert(0, str(REPO / "launch"))
    connected = []  # the launcher's way to Ray: a mistake must be reported before it is taken
    monkeypatch.setattr(importlib.import_module("pretrain_f7"), "connect_ray", lambda: connected.append(1))
    rc, out, err, took = launch_here("launch/pretrain_f7.py", *args)
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("error: ") and named in lines[0], err[-2000:]
    assert took < 10 and not connected, (took, connected)


def test_the_command_line_exits_2_in_one_line_and_debug_shows_the_traceback():
    r, took = launch("--preset", "demo", "--set", "optim.lr_base=-1")
    assert r.returncode == 2 and r.stderr.strip() == "error: optim.lr_base must be > 0 (per 256 images), got -1.0" and took < 10
    r, _ = launch("--preset", "demo", "--set", "optim.lr_base=-1", "--debug")
    assert r.returncode == 1 and "Traceback" in r.stderr and r.stderr.strip().endswith("got -1.0")


def test_s3_without_credentials_or_endpoint_is_one_line_within_seconds(monkeypatch):
    url = f"http://127.0.0.1:{closed_port()}"
    for k in [k for k in os.environ if k.startswith("AWS_")]:
        monkeypatch.delenv(k)
    monkeypatch.setenv("AWS_ENDPOINT_URL", url)
    for k, v in {"AWS_SHARED_CREDENTIALS_FILE": "/nonexistent", "AWS_CONFIG_FILE": "/nonexistent", "AWS_EC2_METADATA_DISABLED": "true"}.items():
        monkeypatch.setenv(k, v)  # no ~/.aws, no instance metadata: no credentials from anywhere
    rc, _, err, took = launch_here("launch/pretrain_f7.py", "--preset", "demo", "--set", "data.root=s3://nfnet-x/pack")
    assert rc == 2 and "no AWS credentials found: set AWS_ACCESS_KEY_ID" in err and took < 20, err
    for k, v in {"AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "y", "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(k, v)
    rc, _, err, took = launch_here("launch/pretrain_f7.py", "--preset", "demo", "--set", "data.root=s3://nfnet-x/pack")
    assert rc == 2 and f"cannot reach S3 at endpoint {url}" in err and "AWS_ENDPOINT_URL" in err, err
    assert len(err.strip().splitlines()) == 1 and took < 20, (took, err)


def test_help_lists_presets_and_every_field_with_type_default_and_doc():
    rc, stdout, _, _ = launch_here("launch/pretrain_f7.py", "--help")
    r = subprocess.CompletedProcess([], rc, stdout, "")
    assert r.returncode == 0
    for name in ("f7", "demo", "finetune", "demo_finetune"):
        assert f"\n  {name}: " in r.stdout
    cfg = TrainConfig().to_dict()
    for section, fields in cfg.items():
        for key, value in fields.items():
            assert f"  {section}.{key} (" in r.stdout and f"default {value!r})" in r.stdout, f"{section}.{key}"
    assert "  optim.lr_base (float, default 0.1): per 256 images" in r.stdout
    assert "  run.precision (auto|fp32|bf16, default 'auto'): " in r.stdout
    fields = [line for line in r.stdout.splitlines() if re.match(r"  (model|data|aug|optim|schedule|run)\.\w+ \(", line)]
    assert len(fields) == sum(len(f) for f in cfg.values())
    undocumented = [line for line in fields if not re.search(r"\): \S", line)]
    assert not undocumented, undocumented  # every field has a line of doc


def test_relative_paths_in_a_ray_job_resolve_against_the_submit_dir_or_are_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps({"runtime_env": {"working_dir": "gcs://_ray_pkg_x.zip"}}))
    rc, _, err, _ = launch_here("launch/pretrain_f7.py", "--preset", "demo", "--print-config")  # data.root=data/fashion-mnist
    assert rc == 2 and "data.root=data/fashion-mnist is a relative path" in err and "launch/submit.py" in err, err
    monkeypatch.setenv("NFNET_SUBMIT_DIR", str(tmp_path))
    monkeypatch.setenv("NFNET_SUBMIT_HOST", socket.gethostname())
    rc, out, err, _ = launch_here("launch/pretrain_f7.py", "--preset", "demo", "--print-config")
    cfg = json.loads(out.split("resolved config:\n", 1)[1])
    assert cfg["data"]["root"] == str(tmp_path / "data/fashion-mnist") and cfg["run"]["storage"] == str(tmp_path / "runs")
    monkeypatch.setenv("NFNET_SUBMIT_HOST", "another-host")  # a remote cluster: the submit dir is not here
    rc, _, err, _ = launch_here("launch/pretrain_f7.py", "--preset", "demo", "--print-config")
    assert rc == 2 and "is a relative path" in err, err
    rc, _, err, _ = launch_here("launch/scaling_sweep.py", "configs/sweeps/demo.yaml", "--plan")  # its SPEC's storage: runs
    assert rc == 2 and err.startswith("error: storage=runs: relative paths") and "launch/submit.py" in err, err


def test_errors_raised_in_ray_tasks_and_by_data_prep_are_shown_as_their_own_line():
    sys.path.insert(0, str(REPO / "launch"))
    from _common import one_line
    from ray.exceptions import RayTaskError

    from data_prep.sources import SourceError

    wrapped = RayTaskError("pack_task", "Traceback ...\nValueError: bad row 7", ValueError("manifest x.csv: bad row 7"))
    assert one_line(wrapped) == "manifest x.csv: bad row 7"
    assert one_line(SourceError("SOURCE imagenet does not exist")) == "SOURCE imagenet does not exist"
    assert one_line(RuntimeError("Training failed:\n  worker 0\nNonFiniteLossError: 5 steps")) == (
        "RuntimeError: Training failed: ... NonFiniteLossError: 5 steps (run with --debug for the traceback)")


def test_submit_passes_the_runtime_env_and_the_submit_dir():
    sys.path.insert(0, str(REPO / "launch"))
    from submit import runtime_env

    env = runtime_env("/home/me/work")
    assert env["working_dir"] == str(REPO) and "data/" in env["excludes"] and ".venv/" in env["excludes"]
    assert env["env_vars"]["NFNET_SUBMIT_DIR"] == "/home/me/work" and env["env_vars"]["NFNET_SUBMIT_HOST"] == socket.gethostname()
    assert env["env_vars"]["OMP_NUM_THREADS"] == "8"  # infra/runtime_env.yaml's own settings kept


def test_the_warmup_longer_than_the_run_is_named():
    from pipeline.cli.preflight import warmup_warning

    manifest = {"splits": {"train": {"samples": 8192}}}
    short = resolve("demo", ["schedule.epochs=1", "optim.warmup_epochs=2"])  # 8 steps of 1024, warm-up 16
    assert warmup_warning(short, manifest) == ("optim.warmup_epochs=2 is 16 steps, the run only 8: the learning rate ends at "
                                               "0.50 of its peak 0.4; lower optim.warmup_epochs or train longer")  # fmt: skip
    assert warmup_warning(resolve("demo", ["schedule.epochs=3", "optim.warmup_epochs=2"]), manifest) is None


def test_resources_the_cluster_lacks_are_refused_with_the_fix(ray_cluster):
    import ray

    from pipeline.cli.preflight import check_resources

    ours = not ray.is_initialized()  # another test of this session may have connected already
    if ours:
        ray.init(address=ray_cluster["address"], log_to_driver=False)
    try:
        cpus = ray.cluster_resources()["CPU"]
        gpu = resolve("demo", ["run.use_gpu=true", "run.num_workers=2"])
        with pytest.raises(ValueError, match=r"run.num_workers=2 x \(1 CPU, 1 GPU\) needs 2 GPU \(the cluster has 0\): --set run.use_gpu=false"):
            check_resources(gpu)
        many = resolve("demo", [f"run.num_workers={int(cpus) * 4}", f"schedule.global_batch={128 * int(cpus) * 4}"])
        with pytest.raises(ValueError, match=rf"needs {int(cpus) * 4} CPU \(the cluster has {int(cpus)}\): --set run.num_workers={int(cpus)} or fewer"):
            check_resources(many)
        check_resources(resolve("demo", []))  # 2 workers x 1 CPU fit
        # elastic: only the minimum must fit now (it grows when nodes join); a minimum that does not is refused
        big = int(cpus) * 4
        check_resources(resolve("demo", [f"run.num_workers={big}", "run.min_workers=1", f"schedule.global_batch={128 * big}"]))
        with pytest.raises(ValueError, match=rf"^run.min_workers={big} x \(1 CPU\) needs {big} CPU"):
            check_resources(resolve("demo", [f"run.num_workers={big * 2}", f"run.min_workers={big}", f"schedule.global_batch={128 * big * 2}"]))
    finally:
        if ours:
            ray.shutdown()


def readme_submits() -> list[list[str]]:
    """The launcher commands of README's `.venv/bin/python launch/submit.py ... -- python launch/...` lines."""
    import shlex

    text = (REPO / "README.md").read_text().replace("\\\n", " ")
    cmds = []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith(".venv/bin/python launch/submit.py") and " -- " in line:
            cmds.append(shlex.split(line.split(" -- ", 1)[1].split("#")[0]))
    return cmds


def test_readme_submit_commands_resolve_as_printed(monkeypatch):
    """Every README submit line names a launcher, a preset and keys that exist, and its relative paths
    resolve against the directory it was submitted from (run as the job would: in Ray's copy)."""
    cmds = readme_submits()
    assert len(cmds) >= 5, cmds
    job = {"RAY_JOB_CONFIG_JSON_ENV_VAR": json.dumps({"runtime_env": {"working_dir": "gcs://_ray_pkg_x.zip"}}),
           "NFNET_SUBMIT_DIR": str(REPO), "NFNET_SUBMIT_HOST": socket.gethostname()}  # fmt: skip
    for k, v in job.items():
        monkeypatch.setenv(k, v)
    for cmd in cmds:
        assert cmd[0] == "python" and cmd[1].startswith("launch/"), cmd
        rc, out, err, _ = launch_here(cmd[1], *cmd[2:], "--print-config")
        assert rc == 0, (cmd, err[-1500:])
        cfg = json.loads(out.split("resolved config:\n", 1)[1])
        for section, key in (("run", "storage"), ("model", "init_from"), ("data", "root")):
            value = cfg[section][key]
            assert not value or value.startswith(("s3://", "/")), (cmd, section, key, value)


def readme_cluster_block() -> list[str]:
    """The shell lines of README's "Submitting to a Ray cluster" block (continuations joined)."""
    text = (REPO / "README.md").read_text().split("## Submitting to a Ray cluster", 1)[1]
    block = text.split("```bash\n", 1)[1].split("```", 1)[0].replace("\\\n", " ")
    return [" ".join(line.split("#")[0].split()) for line in block.splitlines() if line.split("#")[0].strip()]


@pytest.mark.slow
def test_readme_cluster_commands_run_as_printed_after_a_demo_sized_run(tmp_path, ray_cluster):
    """README's submit lines, verbatim, from a directory laid out as after `make demo` (data/fashion-mnist
    packed, data/fashion-mnist-groups written: the demo's paths and presets, fewer images): pretraining,
    fine-tuning its export, evaluating the fine-tuned export. Relative paths land in that directory
    (not in Ray's copy of the repository); each line is printed once; the evaluation reproduces the
    fine-tuned run's own numbers. `make cluster` is the session's Ray head (the same `ray start --head`
    with token authentication); `export` lines become the environment."""
    from data_prep.pack import PackOptions, pack
    from data_prep.sample_folders import write_groups

    lines = readme_cluster_block()
    assert lines[0] == "make cluster" and lines[-1] == "make cluster-stop", lines
    d = tmp_path
    before = (REPO / "runs" / "my-demo" / "config.json").stat().st_mtime if (REPO / "runs" / "my-demo" / "config.json").exists() else None
    for name in (".venv", "launch"):
        (d / name).symlink_to(REPO / name)
    # ~1,090 training images: 2 epochs at global batch 1024 are 3 steps (the demo's 58,820 make 115)
    pack("fashion-mnist", str(d / "data" / "fashion-mnist"), PackOptions(samples_per_shard=500, limit_per_split=1100, heldout_fraction=0.02), progress=False)
    write_groups(str(d / "data" / "fashion-mnist-groups"), n_train=512, n_val=128)
    env = {**ray_cluster["env"], "RAY_ADDRESS": ray_cluster["dashboard"]}
    env.pop("RAY_AUTH_MODE", None)  # README's `export` line must set it
    ran = []
    for line in lines[1:-1]:
        if line.startswith("export "):
            for kv in line.split()[1:]:
                k, v = kv.split("=", 1)
                env[k] = v
            continue
        t0 = time.monotonic()
        r = subprocess.run(line, shell=True, cwd=d, env=env, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, (line, r.stdout[-3000:], r.stderr[-3000:])
        print(f"{time.monotonic() - t0:.0f} s: {line}")
        ran.append((line, r.stdout, time.monotonic() - t0))
    assert len(ran) == 3, [x[0] for x in ran]
    runs = d / "runs"
    pre = json.loads((runs / "my-demo" / "export" / "summary.json").read_text())
    n_train = json.loads((d / "data" / "fashion-mnist" / "manifest.json").read_text())["splits"]["train"]["samples"]
    assert pre["steps"] == -(-2 * n_train // 1024) and pre["world_size"] == 2, pre  # 2 epochs at the demo's batch
    ft = json.loads((runs / "my-demo-ft" / "results.json").read_text())
    ev = json.loads((runs / "my-demo-eval" / "results.json").read_text())
    assert ft["classes"] == ev["classes"] == 4 and ev["samples"] == ft["samples"] > 0
    # the fine-tuned export holds the EMA weights as well as the raw ones: evaluated again, the same numbers
    for tag in ("raw", "ema"):
        assert ev[tag]["top1"] == pytest.approx(ft[tag]["top1"], abs=1e-6), (tag, ev[tag], ft[tag])
        assert ev[tag]["loss"] == pytest.approx(ft[tag]["loss"], abs=1e-6), (tag, ev[tag], ft[tag])  # measured: equal
    after = (REPO / "runs" / "my-demo" / "config.json").stat().st_mtime if (REPO / "runs" / "my-demo" / "config.json").exists() else None
    assert after == before  # nothing was written into the repository's runs/ (a user's own my-demo stays as it was)
    for line, out, _ in ran:
        ours = [x for x in out.splitlines() if x.strip() and "(RayTrainWorker" not in x and "(TrainController" not in x]
        # without Ray's "(RayTrainWorker pid=...)" prefix: a copy from another process is still a copy
        steps = [re.sub(r"^\(\w+ pid=\d+\)\s*", "", re.sub(r"\x1b\[[0-9;]*m", "", x)) for x in out.splitlines() if re.search(r"step \d+/\d+ epoch .* eta ", x)]
        assert bool(steps) != ("--eval-only" in line), (line, out[-2000:])
        assert len(steps) == len(set(steps)), ("a step line printed twice", line, steps)
        if "pretrain_f7.py" in line:  # 3 steps at log_every 5: the last step's line, once
            assert [x.split(" epoch")[0] for x in steps] == [f"step {pre['steps']}/{pre['steps']}"], steps
        assert f"run directory: {runs}/" in out, (line, out[-2000:])  # the submit dir, not Ray's copy
        assert len([x for x in ours if x.startswith("run directory:")]) == 1
