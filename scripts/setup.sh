#!/usr/bin/env bash
# Install expo_dist and what its tests and demo need, then print the Python to use (stdout, one line).
#
# Where: the active virtualenv (VIRTUAL_ENV or CONDA_PREFIX) if there is one, else the project's own .venv,
# made with ${PYTHON:-python3} -m venv. A stock Debian/Ubuntu Python refuses `pip install` outside a venv
# (PEP 668), so we never install into the system interpreter.
# torch goes first, pinned, when none is present: an open range would pull a multi-GB CUDA build here.
# On a GPU cluster install the torch build you want first; expo_dist itself accepts torch>=2.1.
# A second run with the same pyproject/setup.py/extras and a working install does nothing (stamp file).
set -euo pipefail
cd "$(dirname "$0")/.."
say() { echo "setup: $*" >&2; }
if [ -n "${VIRTUAL_ENV:-}" ] && [ -x "$VIRTUAL_ENV/bin/python" ]; then
    PY="$VIRTUAL_ENV/bin/python"
elif [ -n "${CONDA_PREFIX:-}" ] && [ -x "$CONDA_PREFIX/bin/python" ]; then
    PY="$CONDA_PREFIX/bin/python"
else
    VENV="${EXPO_VENV:-$PWD/.venv}"
    if [ ! -x "$VENV/bin/python" ]; then
        BASE=${PYTHON:-python3}
        say "making a virtualenv in $VENV with $("$BASE" -c 'import sys; print(sys.executable)')"
        "$BASE" -m venv "$VENV" || {
            say "cannot make a virtualenv with $BASE; on Debian/Ubuntu: apt install python3-venv"; exit 1; }
    fi
    PY="$VENV/bin/python"
fi
EXTRAS=${EXPO_EXTRAS:-test}
STAMP="$("$PY" -c 'import sys; print(sys.prefix)')/.expo_dist-setup"
WANT="$(cat pyproject.toml setup.py expo_dist/runtime/_ckernel.c | sha256sum | cut -c1-16) $EXTRAS $PWD"
CHECK="import expo_dist, torch, ray, safetensors, transformers, huggingface_hub, psutil"
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ] && "$PY" -c "$CHECK" 2>/dev/null; then
    echo "$PY"; exit 0
fi
export PIP_ROOT_USER_ACTION=ignore PIP_DISABLE_PIP_VERSION_CHECK=1
if ! "$PY" -c "import torch" 2>/dev/null; then
    say "installing torch ${EXPO_TORCH_VERSION:-2.13.0}"
    "$PY" -m pip install -q "torch==${EXPO_TORCH_VERSION:-2.13.0}" >&2
fi
say "installing expo_dist[$EXTRAS] into $PY"
"$PY" -m pip install -q -e ".[$EXTRAS]" >&2
"$PY" -c "$CHECK" || { say "expo_dist's dependencies did not install"; exit 1; }
echo "$WANT" > "$STAMP"
echo "$PY"
