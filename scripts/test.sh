#!/usr/bin/env bash
# The test suite, with everything it needs installed first.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
python3 -m pytest tests -q "$@"
