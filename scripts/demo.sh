#!/usr/bin/env bash
# The main job on one machine: generate a small SFT/aligned Llama pair, merge it with expo-dist on the
# embedded Ray, and check the result by loading it with transformers.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
DEMO=${DEMO_DIR:-demo}
rm -rf "$DEMO"
python3 scripts/make_pair.py "$DEMO/pair" --hidden-size 256 --intermediate-size 688 --layers 4 --vocab 4096 \
    --sft-shard-bytes 4MB --aligned-shard-bytes 3MB >/dev/null
expo-dist merge --config configs/demo.yaml --out "$DEMO/expo"
python3 scripts/check_output.py "$DEMO/pair/sft" "$DEMO/pair/aligned" "$DEMO/expo"
