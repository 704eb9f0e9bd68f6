"""Build and run the Ray Train TorchTrainer for a TrainConfig (pretraining and fine-tuning)."""

from __future__ import annotations

import json
import os

from data_prep.storage import Store, s3_endpoint, split_s3

from pipeline.config import TrainConfig, validate


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


def save_config(cfg: TrainConfig) -> str:
    """The resolved config, saved in the run directory (local or s3://)."""
    root = cfg.run.storage if cfg.run.storage.startswith("s3://") else os.path.abspath(cfg.run.storage)
    store = Store(f"{root.rstrip('/')}/{cfg.run.name}", cfg.data.s3_endpoint or None)
    store.write_bytes_atomic("config.json", json.dumps(cfg.to_dict(), indent=1).encode())
    return store.url("config.json")


def fit(cfg: TrainConfig, train_loop=None):
    """Run training to completion; a run with the same (storage, name) resumes from its latest checkpoint.
    `train_loop` replaces the function every worker runs (default: run.train_loop_per_worker); tests
    wrap it to watch the workers' collectives."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from .run import train_loop_per_worker

    validate(cfg)  # batch identity, mode, SAM x ZeRO: before any worker starts
    env = {"DS_ACCELERATOR": "cpu"} if not cfg.run.use_gpu else {}
    trainer = TorchTrainer(
        train_loop or train_loop_per_worker,
        train_loop_config={"train": cfg.to_dict()},
        torch_config=TorchConfig(backend="nccl" if cfg.run.use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=cfg.run.num_workers, use_gpu=cfg.run.use_gpu, placement_strategy=cfg.run.placement,
                                     resources_per_worker={"CPU": cfg.run.cpus_per_worker, **({"GPU": 1} if cfg.run.use_gpu else {})}),  # fmt: skip
        run_config=RunConfig(
            name=cfg.run.name,
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.schedule.keep_checkpoints),
            failure_config=FailureConfig(max_failures=cfg.run.max_failures),
            worker_runtime_env={"env_vars": env} if env else None,
            **storage_args(cfg.run.storage, cfg.data.s3_endpoint or None),
        ),
    )
    return trainer.fit()
