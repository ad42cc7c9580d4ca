#!/usr/bin/env bash
# The test suite, with everything it needs installed first (into the active virtualenv, else ./.venv).
# Arguments go to pytest, e.g. `bash scripts/test.sh -m "not slow"` for the fast lane.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=$(bash scripts/setup.sh)
export PATH="$(dirname "$PY"):$PATH"   # expo-dist and ray for the subprocess, ray job and Slurm tests
"$PY" -m pytest tests -q "$@"
