"""Submit a launcher as a Ray job with the project's runtime env, recording where you submitted from.

    python launch/submit.py [--address http://HEAD:8265] -- python launch/pretrain_f7.py --preset demo ...

Equivalent to `ray job submit --address ADDR --runtime-env-json ... -- CMD` with infra/runtime_env.yaml
(working_dir ".", its excludes and env_vars) plus NFNET_SUBMIT_DIR / NFNET_SUBMIT_HOST: the launcher
then resolves relative paths (data.root, run.storage, ...) against this directory when the job runs on
this machine (a local cluster), and refuses them on a remote one instead of writing into Ray's
temporary copy of the working directory. The address defaults to RAY_ADDRESS, else the local
cluster's dashboard (http://127.0.0.1:8265). With RAY_AUTH_MODE=token (a local `make cluster`), the
token file ~/.ray/auth_token is used as `ray job submit` finds it.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def runtime_env(submit_dir: str) -> dict:
    import yaml

    env = yaml.safe_load((ROOT / "infra" / "runtime_env.yaml").read_text())
    env["working_dir"] = str(ROOT)
    env.setdefault("env_vars", {}).update(NFNET_SUBMIT_DIR=submit_dir, NFNET_SUBMIT_HOST=socket.gethostname())
    return env


def main(argv: list[str]) -> int:
    if "--" not in argv:
        print("usage: python launch/submit.py [--address URL] -- python launch/<launcher>.py [args]", file=sys.stderr)
        return 2
    ours, cmd = argv[: argv.index("--")], argv[argv.index("--") + 1 :]
    address = os.environ.get("RAY_ADDRESS") or "http://127.0.0.1:8265"
    if ours[:1] == ["--address"] and len(ours) == 2:
        address = ours[1]
    elif len(ours) == 1 and ours[0].startswith("--address="):
        address = ours[0].split("=", 1)[1]
    elif ours:
        print(f"error: unknown arguments {ours}; usage: python launch/submit.py [--address URL] -- CMD", file=sys.stderr)
        return 2
    env_json = json.dumps(runtime_env(os.getcwd()))
    ray = Path(sys.executable).with_name("ray")  # this interpreter's Ray, whatever PATH says
    return subprocess.call([str(ray) if ray.exists() else "ray", "job", "submit", "--address", address,
                            "--runtime-env-json", env_json, "--", *cmd])  # fmt: skip


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
