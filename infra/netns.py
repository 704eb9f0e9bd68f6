"""Two (or more) "hosts" on one machine: network namespaces joined by a veth pair, a Ray head in
the first, a Ray worker node in the second, moto's S3 server on the head's address. Used by
tests/test_multinode.py and bench/scaling_efficiency.py --netns. Needs root and iproute2.

Traps (../shared/docs/stack-notes.md): the veth has the same name in both namespaces and
GLOO_SOCKET_IFNAME names it (gloo otherwise binds to the hostname's 127.0.0.1); each namespace
gets a default route so Ray finds a process's node address; `ray stop` is never used to clean up
(it stops every Ray process on the machine), the namespaces' processes are killed instead.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
IFACE = "nfveth"  # the same name in both namespaces: GLOO_SOCKET_IFNAME must name it on every host
GCS_PORT, S3_PORT = 6390, 9010


def sh(*cmd: str, check: bool = True, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=check, capture_output=True, text=True, **kw)


def can_create_namespaces() -> str | None:
    """None when this machine can build the hosts, else why not."""
    if os.geteuid() != 0 or not shutil.which("ip"):
        return "building hosts with network namespaces needs root and iproute2"
    name = f"nf-probe-{uuid.uuid4().hex[:6]}"
    probe = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"this machine cannot create network namespaces: {probe.stderr.strip()}"
    sh("ip", "netns", "del", name)
    return None


class Hosts:
    """Namespaces A (head, S3) and B (worker node); commands run inside them with `ip netns exec`."""

    def __init__(self):
        tag = uuid.uuid4().hex[:6]
        self.ns = {"a": f"nfa-{tag}", "b": f"nfb-{tag}"}
        octet = 64 + int(tag[:2], 16) % 128
        self.ip = {"a": f"10.{octet}.7.1", "b": f"10.{octet}.7.2"}
        self.temp = f"/tmp/ray-mn-{tag}"  # this cluster's Ray session files, apart from the test session's cluster
        self.s3 = f"http://{self.ip['a']}:{S3_PORT}"
        self.address = f"{self.ip['a']}:{GCS_PORT}"
        self.env = dict(
            os.environ, PATH=f"{VENV_BIN}:{os.environ.get('PATH', '')}", RAY_AUTH_MODE="token", RAY_USAGE_STATS_ENABLED="0",
            GLOO_SOCKET_IFNAME=IFACE, DS_ACCELERATOR="cpu", AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
            AWS_DEFAULT_REGION="us-east-1", AWS_ENDPOINT_URL=self.s3, RAY_ADDRESS=self.address, PYTHONUNBUFFERED="1",
            RAY_DEDUP_LOGS="0",  # Ray folds lines that differ only in numbers: tests read every step line
        )  # fmt: skip
        self.procs: list[subprocess.Popen] = []

    def run(self, host: str, *cmd: str, timeout: int = 600, check: bool = True) -> subprocess.CompletedProcess:
        out = subprocess.run(["ip", "netns", "exec", self.ns[host], *cmd], env=self.env, capture_output=True, text=True,
                             timeout=timeout, cwd=REPO)  # fmt: skip
        if check and out.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed in {host}:\n{out.stdout[-4000:]}\n{out.stderr[-4000:]}")
        return out

    def popen(self, host: str, *cmd: str, env: dict | None = None, **kw) -> subprocess.Popen:
        p = subprocess.Popen(["ip", "netns", "exec", self.ns[host], *cmd], env={**self.env, **(env or {})}, cwd=REPO, **kw)
        self.procs.append(p)
        return p

    def up(self) -> None:
        a, b = self.ns["a"], self.ns["b"]
        sh("ip", "netns", "add", a)
        sh("ip", "netns", "add", b)
        va, vb = f"v{a[-6:]}a", f"v{a[-6:]}b"
        sh("ip", "link", "add", va, "type", "veth", "peer", "name", vb)
        for host, v in (("a", va), ("b", vb)):
            ns = self.ns[host]
            sh("ip", "link", "set", v, "netns", ns)
            sh("ip", "-n", ns, "link", "set", v, "name", IFACE)
            sh("ip", "-n", ns, "addr", "add", f"{self.ip[host]}/24", "dev", IFACE)
            sh("ip", "-n", ns, "link", "set", IFACE, "up")
            sh("ip", "-n", ns, "link", "set", "lo", "up")
            # A default route: Ray finds a process's node address by routing towards a public IP.
            sh("ip", "-n", ns, "route", "add", "default", "dev", IFACE)
        self.popen("a", str(VENV_BIN / "moto_server"), "-H", self.ip["a"], "-p", str(S3_PORT), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        # The GCS declares a silent node dead after 3 failed 1 s health checks (Ray's defaults: 5 of 3 s,
        # each up to 10 s), so the elastic tests' lost host is noticed in seconds, not a minute.
        health = '{"health_check_period_ms": 1000, "health_check_timeout_ms": 1000, "health_check_failure_threshold": 3}'
        self.run("a", str(VENV_BIN / "ray"), "start", "--head", "--port", str(GCS_PORT), "--node-ip-address", self.ip["a"],
                 "--include-dashboard", "false", f"--system-config={health}", *self._common, "--temp-dir", self.temp,
                 timeout=120)  # fmt: skip
        self.python("a", "from data_prep.storage import s3_client; s3_client().create_bucket(Bucket='mnode')")
        self.start_node("b")

    _common = ["--num-cpus", "1", "--object-store-memory", "300000000", "--disable-usage-stats"]

    def alive_nodes(self) -> int:
        """Nodes the head's GCS counts as alive."""
        out = self.python("a", "import ray; ray.init(); print(sum(n['Alive'] for n in ray.nodes()))").stdout
        return int(out.split()[-1])

    def wait_nodes(self, n: int, timeout: float = 90) -> float:
        """Wait until the GCS counts n alive nodes; returns the seconds waited."""
        t0 = time.time()
        while (have := self.alive_nodes()) != n:
            if time.time() - t0 > timeout:
                raise RuntimeError(f"the cluster has {have} alive nodes after {timeout:.0f} s, expected {n}")
            time.sleep(1)
        return time.time() - t0

    def start_node(self, host: str, wait: bool = True) -> None:
        """A Ray worker node in `host`'s namespace, joined to the head (a fresh node id each time)."""
        before = self.alive_nodes() if wait else 0
        self.run(host, str(VENV_BIN / "ray"), "start", "--address", self.address, "--node-ip-address", self.ip[host],
                 *self._common, "--temp-dir", self.temp, timeout=120)  # fmt: skip
        if wait:
            self.wait_nodes(before + 1)

    def stop_node(self, host: str) -> None:
        """Take `host` away for good: SIGKILL every process in its namespace (raylet, workers), as a machine
        that loses power. Not `ray stop`, which stops every Ray process on this machine."""
        for pid in self.pids(host):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def python(self, host: str, code: str, timeout: int = 120) -> subprocess.CompletedProcess:
        return self.run(host, sys.executable, "-c", code, timeout=timeout)

    def pids(self, host: str) -> list[int]:
        out = sh("ip", "netns", "pids", self.ns[host], check=False).stdout
        return [int(p) for p in out.split()]

    def down(self) -> None:
        # Not `ray stop`: it stops every Ray process on the machine, the test session's cluster included.
        for p in self.procs:
            p.kill()
        for host in ("b", "a"):
            for pid in self.pids(host):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        time.sleep(1)
        for host in ("a", "b"):
            sh("ip", "netns", "del", self.ns[host], check=False)
        sh("ip", "link", "del", f"v{self.ns['a'][-6:]}a", check=False)  # when up() stopped before moving it
        shutil.rmtree(self.temp, ignore_errors=True)
