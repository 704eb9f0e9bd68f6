"""infra/ and configs/: every config and manifest loads, and holds the fields our code relies on."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
INFRA = REPO / "infra"


def _yaml(path: Path):
    docs = list(yaml.safe_load_all(path.read_text()))
    return docs[0] if len(docs) == 1 else docs


def test_runtime_env_is_valid_and_its_excludes_keep_the_upload_small(tmp_path):
    """Pack a copy of the repository with 60 MiB of data, runs, checkpoints and a venv in it, the
    way `ray job submit --runtime-env infra/runtime_env.yaml` does (Ray's own packer), ignoring
    .gitignore: the excludes alone keep the package small and the code complete."""
    from ray._private.runtime_env.packaging import create_package
    from ray.runtime_env import RuntimeEnv

    env = _yaml(INFRA / "runtime_env.yaml")
    RuntimeEnv(**env)  # Ray's validation of every field
    assert env["working_dir"] == "."
    assert all(isinstance(v, str) for v in env["env_vars"].values())  # Ray rejects non-strings at submit time
    assert {"OMP_NUM_THREADS", "NCCL_SOCKET_IFNAME"} <= set(env["env_vars"])
    tracked = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True, text=True, check=True)
    copy = tmp_path / "repo"
    for rel in tracked.stdout.split():
        if (REPO / rel).is_file():
            (copy / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / rel, copy / rel)
    for junk in ("data/fm/train-000000.tar", "runs/x/checkpoint_0/state.safetensors", ".venv/lib/torch.so", ".git/objects/pack/p.pack",
                 "checkpoints/a.pth", "runs/sweep/results.parquet"):  # fmt: skip
        (copy / junk).parent.mkdir(parents=True, exist_ok=True)
        (copy / junk).write_bytes(os.urandom(10 * 2**20))
    pkg = tmp_path / "pkg.zip"
    create_package(str(copy), pkg, include_gitignore=False, excludes=env["excludes"])
    names = zipfile.ZipFile(pkg).namelist()
    assert pkg.stat().st_size < 5 * 2**20, f"{pkg.stat().st_size / 2**20:.1f} MiB"
    for needed in ("launch/pretrain_f7.py", "pipeline/train/run.py", "models/variants.py", "data_prep/pack.py", "configs/sweeps/demo.yaml"):
        assert needed in names
    assert not [n for n in names if n.startswith(("data/", "runs/", ".venv/", ".git/", "checkpoints/"))]


def test_cluster_launcher_config_validates_against_rays_schema():
    import jsonschema
    import ray

    cfg = _yaml(INFRA / "cluster-aws.yaml")
    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    jsonschema.validate(cfg, schema)
    types = cfg["available_node_types"]
    assert cfg["head_node_type"] in types
    gpu = [t for t in types.values() if t["resources"].get("GPU", 0) > 0]
    assert gpu and all(t["max_workers"] >= 1 for t in gpu)
    # The f7 preset's workers fit: GPUs per node x nodes >= run.num_workers, CPUs per worker too.
    from pipeline.config import resolve

    f7 = resolve("f7")
    node = gpu[0]["resources"]
    assert node["GPU"] * gpu[0]["max_workers"] >= f7.run.num_workers
    assert node["CPU"] >= node["GPU"] * f7.run.cpus_per_worker
    setup = " ".join(cfg["setup_commands"])
    assert "pip install -q -r requirements.lock" in setup and "--no-deps -e ." in setup
    assert cfg["file_mounts"]["/home/ubuntu/nfnet"] == "."
    for cmd in cfg["head_start_ray_commands"] + cfg["worker_start_ray_commands"]:
        assert "ray stop" in cmd or "PATH=/home/ubuntu/nfnet/.venv/bin:$PATH ray start" in cmd  # the venv's ray, python and ninja


def _containers(pod_spec: dict) -> list[dict]:
    return pod_spec["template"]["spec"]["containers"]


def test_kuberay_manifests_run_our_launcher_with_our_image():
    cluster, job = _yaml(INFRA / "kuberay" / "raycluster.yaml"), _yaml(INFRA / "kuberay" / "rayjob-pretrain-f7.yaml")
    assert (cluster["apiVersion"], cluster["kind"], job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayCluster", "ray.io/v1", "RayJob")
    import ray

    dockerfile = (INFRA / "Dockerfile").read_text()
    workdir = next(ln.split()[1] for ln in dockerfile.splitlines() if ln.startswith("WORKDIR"))
    assert "pip install -q -r requirements.lock" in dockerfile and "python3.11" in dockerfile
    images = set()
    for spec in (cluster["spec"], job["spec"]["rayClusterSpec"]):
        assert spec["rayVersion"] == ray.__version__  # the image's Ray must equal the cluster's
        groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
        for g in groups:
            for c in _containers(g):
                images.add(c["image"])
                assert c.get("workingDir", workdir) == workdir
        gpus = [int(_containers(g)[0]["resources"]["limits"]["nvidia.com/gpu"]) for g in spec["workerGroupSpecs"]]
        assert all(g == 8 for g in gpus)
        assert spec["headGroupSpec"]["rayStartParams"]["dashboard-host"] == "0.0.0.0"
    images.add(job["spec"]["submitterPodTemplate"]["spec"]["containers"][0]["image"])
    assert len(images) == 1
    # The RayJob's workers add up to the f7 preset's 64 GPU workers.
    from pipeline.config import resolve
    from ray.runtime_env import RuntimeEnv

    w = job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]
    assert w["replicas"] * 8 == resolve("f7").run.num_workers
    RuntimeEnv(**yaml.safe_load(job["spec"]["runtimeEnvYAML"]))
    # The entrypoint is our launcher with arguments it accepts: resolve them without Ray.
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[:2] == ["python", "launch/pretrain_f7.py"]
    out = subprocess.run([sys.executable, *argv[1:], "--print-config"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    cfg = json.loads(out.stdout.split("resolved config:\n", 1)[1])
    assert cfg["model"]["name"] == "nfnet_f7" and cfg["run"]["storage"].startswith("s3://") and cfg["data"]["root"].startswith("s3://")


@pytest.mark.parametrize("spec", sorted(p.name for p in (REPO / "configs" / "sweeps").glob("*.yaml")))
def test_sweep_specs_resolve_every_point(spec):
    from pipeline.sweep.spec import finetune_config, load_spec, point_config, points

    s = load_spec(str(REPO / "configs" / "sweeps" / spec))
    pts = points(s)
    assert len(pts) == sum(len(b.lr or s.lr_grid) for b in s.budgets) * len(s.models) * len(s.seeds)
    assert len({p.name for p in pts}) == len(pts)
    for p in pts:
        cfg = point_config(s, p)
        assert cfg.run.max_failures == 0 and cfg.optim.lr_base == p.lr and cfg.run.name == p.name
    if s.finetune.preset:
        ft = finetune_config(s, pts[0], "/runs/x")
        assert ft.model.init_from == "/runs/x/export" and ft.model.reset_head


def test_sweep_spec_errors_name_the_field(tmp_path):
    from pipeline.sweep.spec import load_spec

    p = tmp_path / "s.yaml"
    p.write_text("name: x\nmodels: [nfnet_pico]\nbudgets: [{epochs: 1, samples: 10}]\n")
    with pytest.raises(ValueError, match=r"budgets\[0\]: a budget sets exactly one of"):
        load_spec(str(p))
    p.write_text("name: x\nmodels: [{name: nfnet_pico, widht_mult: 2}]\nbudgets: [{epochs: 1}]\n")
    with pytest.raises(ValueError, match=r"models\[0\]: unknown field\(s\) \['widht_mult'\]"):
        load_spec(str(p))
    p.write_text("name: x\nmodels: [nfnet_pico]\nbudgets: [{epochs: 1}]\nfinetune: {select: best}\n")
    with pytest.raises(ValueError, match="finetune.select must be"):
        load_spec(str(p))


def test_every_preset_resolves():
    from pipeline.config import PRESETS, resolve

    for name in PRESETS:
        cfg = resolve(name)
        assert cfg.schedule.global_batch == cfg.schedule.micro_batch * cfg.accum_steps * cfg.run.num_workers
    with pytest.raises(ValueError, match="run.placement must be"):
        resolve("demo", ["run.placement=ANYWHERE"])
