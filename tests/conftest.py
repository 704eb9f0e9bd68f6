"""Shared fixtures: a real S3-protocol server (moto) and a real local Ray cluster (`ray start`)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

VENV_BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parents[1]
# Every Ray cluster the suite starts uses token authentication (Ray >= 2.59's default for local
# clusters), and Ray fixes a process's mode when its internals are first imported: a test module that
# imports ray.train at collection (tests/test_elastic.py) would otherwise pin 'disabled' for the session.
os.environ["RAY_AUTH_MODE"] = "token"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_moto() -> tuple[subprocess.Popen, str]:
    """moto's S3 server on 127.0.0.1:<free port>, started and answering; returns (process, endpoint)."""
    port = free_port()
    exe = shutil.which("moto_server", path=str(VENV_BIN)) or "moto_server"
    proc = subprocess.Popen([exe, "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 20
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return proc, f"http://127.0.0.1:{port}"
        except OSError:
            if time.time() > deadline or proc.poll() is not None:
                proc.kill()
                raise RuntimeError("moto_server did not start")
            time.sleep(0.1)


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3 server on 127.0.0.1:<free port>; yields its endpoint URL. It ignores credentials,
    but boto3 wants some, so dummy ones are set for the session."""
    proc, endpoint = start_moto()
    saved = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL")}
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1", AWS_ENDPOINT_URL=endpoint)
    yield endpoint
    proc.terminate()
    proc.wait(timeout=10)
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture
def s3_bucket(s3_server):
    """A fresh bucket name on the moto server."""
    import uuid

    from data_prep.storage import s3_client

    name = f"test-{uuid.uuid4().hex[:12]}"
    s3_client(s3_server).create_bucket(Bucket=name)
    return name


@pytest.fixture(scope="session")
def ray_cluster(s3_server):
    """A real single-node Ray cluster started with `ray start`; yields its GCS address.
    The dashboard and job server bind to 127.0.0.1 only. It starts after the S3 server so its
    workers inherit the (dummy) AWS environment, as workers on a real cluster inherit theirs."""
    port, dash = free_port(), free_port()
    # Token authentication, as Ray >= 2.59 does for local clusters, with the token in Ray's default
    # file; this process (ray.init) and the cluster must agree on the mode.
    os.environ["RAY_AUTH_MODE"] = "token"
    env = dict(os.environ, PATH=f"{VENV_BIN}:{os.environ.get('PATH', '')}", RAY_USAGE_STATS_ENABLED="0")
    ray = str(VENV_BIN / "ray")
    subprocess.run([ray, "get-auth-token", "--generate"], env=env, capture_output=True, check=True)
    subprocess.run([ray, "stop", "--force"], env=env, capture_output=True)
    subprocess.run([ray, "start", "--head", "--port", str(port), "--num-cpus", "2", "--node-ip-address", "127.0.0.1",
                    "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash), "--disable-usage-stats"],
                   env=env, check=True, capture_output=True)  # fmt: skip
    address = f"127.0.0.1:{port}"
    yield {"address": address, "dashboard": f"http://127.0.0.1:{dash}", "env": env}
    subprocess.run([ray, "stop", "--force"], env=env, capture_output=True)
