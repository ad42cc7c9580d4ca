#!/usr/bin/env python
"""Make a synthetic SFT/aligned Llama pair: OUT_DIR/sft and OUT_DIR/aligned (paths printed on stdout)."""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from expo_dist.testing import synth  # noqa: E402

DEFAULTS = dict(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2, vocab_size=256,
                tie_word_embeddings=False)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("out_dir")
    p.add_argument("--preset", choices=["mistral7b"], help="Mistral-7B shapes (8 layers unless --layers)")
    p.add_argument("--hidden-size", type=int, dest="hidden_size")
    p.add_argument("--intermediate-size", type=int, dest="intermediate_size")
    p.add_argument("--layers", type=int, dest="num_layers")
    p.add_argument("--heads", type=int, dest="num_heads")
    p.add_argument("--kv-heads", type=int, dest="num_kv_heads")
    p.add_argument("--vocab", type=int, dest="vocab_size")
    p.add_argument("--extra-vocab", type=int, default=0, help="rows added to the aligned model's vocabulary")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--tie", action="store_const", const=True, dest="tie_word_embeddings",
                   help="tie word embeddings (no lm_head.weight)")
    p.add_argument("--nonfloat-buffer", action="store_true", help=f"add int64 {synth.BUFFER_NAME}")
    p.add_argument("--sft-shard-bytes", type=synth.parse_size, help="max shard size, e.g. 10MB, 64MiB")
    p.add_argument("--aligned-shard-bytes", type=synth.parse_size, help="max shard size, e.g. 7MB")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--delta-scale", type=float, default=0.01)
    a = p.parse_args(argv)

    kw = dict(DEFAULTS)
    if a.preset == "mistral7b":
        kw.update(synth.mistral7b_shapes_kwargs())
    for k in DEFAULTS:
        if getattr(a, k) is not None:
            kw[k] = getattr(a, k)
    t0 = time.perf_counter()
    try:
        dirs = synth.make_pair(a.out_dir, extra_vocab=a.extra_vocab, dtype=a.dtype,
                               nonfloat_buffer=a.nonfloat_buffer, sft_shard_bytes=a.sft_shard_bytes,
                               aligned_shard_bytes=a.aligned_shard_bytes, seed=a.seed, delta_scale=a.delta_scale,
                               **kw)
    except (ValueError, OSError) as e:
        print(f"make_pair: {e}", file=sys.stderr)
        return 2
    print(f"make_pair: wrote {dirs[0]} and {dirs[1]} in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    for d in dirs:
        print(d)
    return 0


if __name__ == "__main__":
    sys.exit(main())
