#!/usr/bin/env bash
# Install expo_dist and what its tests and demo need into the current Python.
# torch goes first, pinned, when none is present: an open range would pull a multi-GB CUDA build here.
# On a GPU cluster install the torch build you want first; expo_dist itself accepts torch>=2.1.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch" 2>/dev/null; then
    PIP_ROOT_USER_ACTION=ignore "$PY" -m pip install -q "torch==${EXPO_TORCH_VERSION:-2.13.0}"
fi
PIP_ROOT_USER_ACTION=ignore "$PY" -m pip install -q -e ".[${EXPO_EXTRAS:-test}]"
"$PY" -c "import expo_dist, torch, ray, safetensors, transformers, huggingface_hub, psutil" \
    || { echo "setup: expo_dist's dependencies did not install" >&2; exit 1; }
