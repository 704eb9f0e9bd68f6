#!/usr/bin/env bash
# The prepared GPU check: one table, at most 8 minutes on one H100/H200-class GPU (bench/gpu_check.py
# says what each row measures). Run it where the project's stack is installed (the image of
# infra/Dockerfile, or `make setup`), from any directory:
#     bash bench/gpu_check.sh [--json OUT.json]
#     bash bench/gpu_check.sh --dry-run      # the same script on CPU with a tiny model (tests run it)
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=${PYTHON:-python3}; fi
export PYTHONUNBUFFERED=1 RAY_USAGE_STATS_ENABLED=0
exec "$PY" bench/gpu_check.py "$@"
