"""Checks a launcher runs before training starts, with one-line errors: S3 reachable with credentials
(before Ray), the warm-up against the run's length (a warning), the cluster's resources (after
connecting, before fit: an impossible request used to loop on "worker group startup timed out")."""

from __future__ import annotations

import math
import os

from data_prep.storage import s3_endpoint, split_s3

from pipeline.config import TrainConfig

S3_KEYS = ("data.root", "run.storage", "model.init_from", "data.source")


def check_model_name(cfg: TrainConfig) -> None:
    from models import list_models  # imports torch (~2 s): here, not in validate(), which --help runs

    names = list_models()
    if cfg.model.name not in names:
        import difflib

        near = difflib.get_close_matches(cfg.model.name, names, n=3)
        hint = f"; did you mean {' or '.join(near)}?" if near else f"; models: {', '.join(names)}"
        raise ValueError(f"model.name {cfg.model.name!r} is not a model{hint}")


def check_s3(cfg: TrainConfig, timeout_s: float = 5.0) -> None:
    """One cheap request (LIST of at most one key) per bucket the config names, with short timeouts and
    one attempt: a missing credential or an unreachable endpoint is one line within seconds, where the
    trainer's own client (10 adaptive retries) took 16-25 s and printed three chained tracebacks."""
    import boto3
    from botocore.config import Config
    from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError, ProfileNotFound

    endpoint = s3_endpoint(cfg.data.s3_endpoint or None)
    where = f"endpoint {endpoint}" if endpoint else "AWS's default endpoint"
    seen = set()
    for key in S3_KEYS:
        section, name = key.split(".")
        url = str(getattr(getattr(cfg, section), name))
        if not url.startswith("s3://"):
            continue
        bucket, prefix = split_s3(url)
        if bucket in seen:
            continue
        seen.add(bucket)
        client = boto3.session.Session().client("s3", endpoint_url=endpoint, config=Config(
            connect_timeout=timeout_s, read_timeout=timeout_s, retries={"max_attempts": 1, "mode": "standard"}))  # fmt: skip
        try:
            client.list_objects_v2(Bucket=bucket, Prefix=prefix, MaxKeys=1)  # with the prefix: ListBucket may be scoped to it
        except ProfileNotFound as e:
            raise ValueError(f"{key}={url}: {e} (AWS_PROFILE)") from None
        except NoCredentialsError:
            raise ValueError(f"{key}={url}: no AWS credentials found: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
                             "(or AWS_PROFILE) where the launcher runs") from None  # fmt: skip
        except ClientError as e:
            code = e.response.get("Error", {}).get("Code", "")
            if code == "NoSuchBucket":
                raise ValueError(f"{key}={url}: bucket {bucket!r} does not exist at {where}") from None
            if code in ("AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
                raise ValueError(f"{key}={url}: access denied to bucket {bucket!r} ({code}): check the AWS credentials") from None
            raise ValueError(f"{key}={url}: S3 refused the bucket listing ({code})") from None
        except BotoCoreError as e:  # EndpointConnectionError, ConnectTimeoutError, ...
            raise ValueError(f"{key}={url}: cannot reach S3 at {where} ({type(e).__name__}); check AWS_ENDPOINT_URL "
                             "(or data.s3_endpoint) and the network") from None  # fmt: skip


def warmup_warning(cfg: TrainConfig, manifest: dict) -> str | None:
    """The warm-up longer than the run: the learning rate never reaches its peak (an 8-step demo run once
    ended at 0.11 of its 0.4 peak without a word)."""
    if cfg.run.mode != "train" or cfg.schedule.train_flops or not cfg.optim.warmup_epochs:
        return None
    split = manifest.get("splits", {}).get(cfg.data.train_split)
    if not split:
        return None
    n, g = split["samples"], cfg.schedule.global_batch
    steps = max(1, math.ceil((cfg.schedule.epochs * n if cfg.schedule.epochs else cfg.schedule.samples) / g))
    warmup = cfg.optim.warmup_epochs * n / g
    if warmup < steps:
        return None
    return (f"optim.warmup_epochs={cfg.optim.warmup_epochs:g} is {warmup:.0f} steps, the run only {steps}: the learning rate "
            f"ends at {steps / warmup:.2f} of its peak {cfg.peak_lr:g}; lower optim.warmup_epochs or train longer")  # fmt: skip


def check_resources(cfg: TrainConfig) -> None:
    """After connecting: the workers the config asks for fit the cluster's total resources. An
    autoscaling cluster that adds nodes on demand (infra/cluster-aws.yaml, infra/kuberay: worker groups
    start at 0) has fewer live resources than it will have: its submissions set NFNET_SKIP_RESOURCE_CHECK=1
    (infra/runtime_env_autoscaling.yaml, the RayJob's runtimeEnvYAML)."""
    import ray

    if os.environ.get("NFNET_SKIP_RESOURCE_CHECK") == "1":
        return
    have = ray.cluster_resources()
    r = cfg.run
    # An elastic run starts at run.min_workers and grows when nodes join: only the minimum must fit now.
    n, key = (r.min_workers, "run.min_workers") if cfg.elastic else (r.num_workers, "run.num_workers")
    need = {"CPU": n * r.cpus_per_worker, **({"GPU": n} if r.use_gpu else {})}
    short = {k: (v, have.get(k, 0)) for k, v in need.items() if have.get(k, 0) < v}
    if not short:
        return
    asked = f"{key}={n} x ({r.cpus_per_worker} CPU{', 1 GPU' if r.use_gpu else ''})"
    lacks = ", ".join(f"{v:g} {k} (the cluster has {h:g})" for k, (v, h) in short.items())
    fixes = []
    if "GPU" in short and not have.get("GPU"):
        fixes.append("--set run.use_gpu=false on a CPU cluster")
    fits = int(min(have.get(k, 0) // (r.cpus_per_worker if k == "CPU" else 1) for k in need))
    if fits and cfg.elastic:
        ok = [w for w in range(1, fits + 1) if cfg.slots % w == 0]
        fixes.append(f"--set run.min_workers={ok[-1]}" if ok else "no elastic size fits")
    elif fits:
        fixes.append(f"--set run.num_workers={fits} or fewer (global_batch must stay divisible by micro_batch x workers)")
    fixes.append("add nodes (an autoscaling cluster: NFNET_SKIP_RESOURCE_CHECK=1)")
    raise ValueError(f"{asked} needs {lacks}: {'; '.join(fixes)}")
