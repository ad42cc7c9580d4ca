#!/usr/bin/env bash
# The main job on one machine: generate a small SFT/aligned Llama pair, merge it with expo-dist on the
# embedded Ray, and check the result by loading it with transformers. A second run reuses the install and the
# generated pair and merges again.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=$(bash scripts/setup.sh)
BIN=$(dirname "$PY")
DEMO=${DEMO_DIR:-demo}
if [ ! -f "$DEMO/pair/.done" ]; then
    rm -rf "$DEMO/pair"
    "$PY" scripts/make_pair.py "$DEMO/pair" --hidden-size 256 --intermediate-size 688 --layers 4 --vocab 4096 \
        --sft-shard-bytes 4MB --aligned-shard-bytes 3MB >/dev/null
    touch "$DEMO/pair/.done"
fi
"$BIN/expo-dist" merge --config configs/demo.yaml --out "$DEMO/expo" --overwrite
"$PY" scripts/check_output.py "$DEMO/pair/sft" "$DEMO/pair/aligned" "$DEMO/expo"
