"""Build and run the Ray Train TorchTrainer for a TrainConfig (pretraining and fine-tuning)."""

from __future__ import annotations

import json
import os
import uuid

from data_prep.manifest import MANIFEST
from data_prep.storage import Store, s3_endpoint, split_s3

from pipeline.config import TrainConfig, check_objective, check_resume_config, format_changes, validate


def storage_args(storage: str, endpoint: str | None) -> dict:
    """RunConfig storage: a local absolute path, or an S3 bucket through pyarrow's S3FileSystem."""
    if not storage.startswith("s3://"):
        return {"storage_path": os.path.abspath(storage)}
    import pyarrow.fs

    ep = s3_endpoint(endpoint)
    kw = {}
    if ep:
        scheme, _, host = ep.partition("://")
        kw = {"endpoint_override": host, "scheme": scheme}
    bucket, prefix = split_s3(storage)
    # Credentials come from the standard AWS environment; they are never put into the config.
    return {"storage_path": f"{bucket}/{prefix}".rstrip("/"), "storage_filesystem": pyarrow.fs.S3FileSystem(**kw)}


def _run_store(cfg: TrainConfig) -> Store:
    root = cfg.run.storage if cfg.run.storage.startswith("s3://") else os.path.abspath(cfg.run.storage)
    return Store(f"{root.rstrip('/')}/{cfg.run.name}", cfg.data.s3_endpoint or None)


def _has_checkpoint(store: Store) -> bool:
    """Whether a re-submission would resume: Ray Train writes checkpoint_manager_snapshot.json when it
    registers a checkpoint (what ray.train.get_checkpoint restores from; a directory half-written by a
    crash is never registered), and a checkpoint_* directory is still there."""
    if not store.exists("checkpoint_manager_snapshot.json"):
        return False
    if not store.s3:
        names = os.listdir(store.root) if os.path.isdir(store.root) else []
        return any(n.startswith("checkpoint_") and os.path.isdir(os.path.join(store.root, n)) for n in names)
    # Directories only (CommonPrefixes): the snapshot file shares the prefix. Store.list would page
    # through every file of every checkpoint.
    prefix = f"{store.prefix}/checkpoint_" if store.prefix else "checkpoint_"
    page = store.client.list_objects_v2(Bucket=store.bucket, Prefix=prefix, Delimiter="/", MaxKeys=2)
    return bool(page.get("CommonPrefixes"))


def check_resubmission(cfg: TrainConfig) -> list[str]:
    """Refuse, before any worker starts, to continue a run directory's checkpoints under a config that
    defines another run (pipeline.config.check_resume_config: one line naming the changed keys); print
    the allowed changes. Returns those keys. Compares with the config.json of the previous submission,
    so it must run before save_config overwrites it (save_config calls it first; fit calls it again for
    callers that do not save the config)."""
    if cfg.run.mode == "eval":  # evaluates model.init_from; never resumes the run directory's checkpoints
        return []
    store = _run_store(cfg)
    if not store.exists("config.json") or not _has_checkpoint(store):
        return []  # a new run, or one that never got to a checkpoint: it starts from scratch
    saved = json.loads(store.read_bytes("config.json"))
    if saved.get("run", {}).get("mode") == "eval":
        return []  # an evaluation under this name overwrote config.json: the checkpoints' config is unknown
    current = cfg.to_dict()
    allowed = check_resume_config(saved, current, store.root)
    if allowed:
        print(f"run {cfg.run.name!r}: continuing with changes that do not alter what it computes: "
              f"{format_changes(saved, current, allowed, limit=len(allowed))}", flush=True)  # fmt: skip
    return allowed


def check_data_objective(cfg: TrainConfig) -> None:
    """In the driver, before any worker starts: refuse a multi-label pack under optim.objective=softmax
    (pipeline.config.check_objective). Reads manifest.json alone, not the offsets sidecar that
    load_manifest also loads; a missing manifest is left to the workers' load_manifest to report."""
    if not cfg.data.root:
        return
    store = Store(cfg.data.root, cfg.data.s3_endpoint or None)
    data = store.read_if_exists(MANIFEST)
    if data is not None:
        check_objective(cfg, json.loads(data), store.url(MANIFEST))


def save_config(cfg: TrainConfig) -> str:
    """The resolved config, saved in the run directory (local or s3://), after check_resubmission has
    compared it with the one saved there by a previous submission (which this overwrites)."""
    check_resubmission(cfg)
    store = _run_store(cfg)
    store.write_bytes_atomic("config.json", json.dumps(cfg.to_dict(), indent=1).encode())
    return store.url("config.json")


def quiet_ray_train(cfg: TrainConfig) -> None:
    """Ray Train settings for readable output; Ray propagates both from the driver's environment to its
    controller and workers, and a value the user exported wins.
    - The print patch sends each print of a worker through Ray Train's logger as well: rank 0's step
      lines appeared twice. Off, a print reaches the job's output once (Ray's log forwarding).
    - The preemption watcher (an actor reacting to node drains, for spot instances) makes Ray core log
      an error-level line about its constructor arguments on every healthy run. Off on CPU runs; GPU
      runs keep Ray's default (on), where spot preemption is what it is for."""
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    if not cfg.run.use_gpu:
        os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")


def _elastic_trainer():
    from .elastic import ElasticTrainer  # imports Ray Train internals: only for elastic runs

    return ElasticTrainer


def fit(cfg: TrainConfig, train_loop=None):
    """Run training to completion; a run with the same (storage, name) resumes from its latest checkpoint.
    `train_loop` replaces the function every worker runs (default: run.train_loop_per_worker); tests
    wrap it to watch the workers' collectives."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from .run import train_loop_per_worker

    validate(cfg)  # batch identity, mode, SAM x ZeRO: before any worker starts
    check_data_objective(cfg)  # a multi-label pack under the softmax objective
    check_resubmission(cfg)  # a changed config must not silently continue the run's checkpoints
    quiet_ray_train(cfg)
    env = {"DS_ACCELERATOR": "cpu"} if not cfg.run.use_gpu else {}
    r = cfg.run
    # Elastic: a (min, max) range; ElasticTrainer keeps Ray to the sizes that divide the step's
    # micro-batches and resizes a healthy group only at checkpoints (pipeline/train/elastic.py).
    workers = (r.min_workers, r.num_workers) if cfg.elastic else r.num_workers
    kind, extra = (TorchTrainer, {}) if not cfg.elastic else (_elastic_trainer(), {"world_sizes": cfg.world_sizes()})
    if cfg.elastic:
        print(f"elastic: {r.min_workers} to {r.num_workers} workers, at sizes {cfg.world_sizes()} "
              f"(accumulation {', '.join(str(cfg.slots // w) for w in cfg.world_sizes())})", flush=True)  # fmt: skip
    trainer = kind(
        train_loop or train_loop_per_worker,
        # "submission": tells a worker whether the checkpoint it resumes is from this fit() (a restart by
        # Ray: the gap counts as device time) or from an earlier submission (it does not).
        train_loop_config={"train": cfg.to_dict(), "submission": uuid.uuid4().hex},
        torch_config=TorchConfig(backend="nccl" if r.use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=r.use_gpu, placement_strategy=r.placement,
                                     elastic_resize_monitor_interval_s=r.resize_check_s,
                                     resources_per_worker={"CPU": r.cpus_per_worker, **({"GPU": 1} if r.use_gpu else {})}),  # fmt: skip
        **extra,
        run_config=RunConfig(
            name=cfg.run.name,
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.schedule.keep_checkpoints),
            failure_config=FailureConfig(max_failures=r.max_failures),
            worker_runtime_env={"env_vars": env} if env else None,
            **storage_args(cfg.run.storage, cfg.data.s3_endpoint or None),
        ),
    )
    return trainer.fit()
