"""The pair phase: reuse --pair, or generate one (synthetic Llama/Mistral shapes) in the work folder."""

from __future__ import annotations

import json
import os
import shutil
import time

from expo_dist.testing.measure import model_bytes, nbytes, parse_shard_bytes, weight_files

from .context import Bench, Pair, log, remove

MEMORY_SHAPE = dict(hidden_size=4096, intermediate_size=4096, num_layers=1, num_heads=32, num_kv_heads=8,
                    vocab_size=131072, tie_word_embeddings=False)  # embed_tokens and lm_head: 1 GiB each in bf16
TINY_SHAPE = dict(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
                  vocab_size=256, tie_word_embeddings=False)
OVERRIDES = ("hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads", "vocab_size")


def shape_kwargs(args) -> dict:
    from expo_dist.testing import synth

    if args.memory:
        kw = dict(MEMORY_SHAPE)
    elif args.preset == "tiny":
        kw = dict(TINY_SHAPE)
    else:
        kw = synth.mistral7b_shapes_kwargs(num_layers=8)
    for k in OVERRIDES:
        if getattr(args, k) is not None:
            kw[k] = getattr(args, k)
    if args.tie:
        kw["tie_word_embeddings"] = True
    return kw


def reusable(folder: str | None) -> bool:
    return bool(folder) and all(os.path.isdir(os.path.join(folder, d)) and weight_files(os.path.join(folder, d))
                                for d in ("sft", "aligned"))


def check_disk(b: Bench) -> None:
    """Refuse at once when the pair, the outputs and the floor's file cannot fit."""
    args = b.args
    if args.pair and os.path.isdir(os.path.join(args.pair, "sft")):
        return
    outputs = 3 + (len(args.sweep.split()) if args.sweep else 0) + (2 * b.repeat if args.s3 else 0)  # s3: floor+merge
    need = model_bytes(shape_kwargs(args), args.dtype) * outputs * 1.05
    free = shutil.disk_usage(args.pair and os.path.dirname(os.path.abspath(args.pair)) or b.workdir).free
    if need > free:
        raise SystemExit(f"bench: needs ~{need / 1e9:.1f} GB of disk, {free / 1e9:.1f} GB free there")


def run(b: Bench) -> Pair:
    """The pair: reused from --pair if it holds one, else generated (into --pair, or the work folder)."""
    args = b.args
    if reusable(args.pair):
        sft, aligned = os.path.join(args.pair, "sft"), os.path.join(args.pair, "aligned")
        desc = {"source": f"reused {args.pair}"}
        try:
            cfg = json.load(open(os.path.join(aligned, "config.json")))
            desc.update({k: cfg.get(k) for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                                 "vocab_size", "tie_word_embeddings")})
        except (OSError, ValueError):
            pass
        return _described(Pair(sft, aligned, desc, generated=False))
    kw = shape_kwargs(args)
    target = args.pair or os.path.join(b.workdir, "pair")
    shard = parse_shard_bytes(args.shard_bytes)
    sft, aligned, gen = generate(target, kw, args.dtype, shard, args.seed)
    desc = {"source": "generated", "shape": kw, "dtype": args.dtype, "sft_shard_bytes": shard[0],
            "aligned_shard_bytes": shard[1], "generate_seconds": round(gen, 2)}
    return _described(Pair(sft, aligned, desc, generated=True))


def generate(target: str, kw: dict, dtype: str, shard: tuple, seed: int = 0, who: str = "bench"):
    """synth.make_pair into target, logged: (sft_dir, aligned_dir, seconds). Also gpu_check's pair."""
    from expo_dist.testing import synth

    log(f"generating a pair in {target}: {model_bytes(kw, dtype) / 1e9:.2f} GB per model ({kw}, {dtype}, "
        f"shards sft {shard[0]} / aligned {shard[1]} bytes)", who)
    t0 = time.perf_counter()
    sft, aligned = synth.make_pair(target, dtype=dtype, sft_shard_bytes=shard[0], aligned_shard_bytes=shard[1],
                                   seed=seed, **kw)
    gen = time.perf_counter() - t0
    log(f"pair generated in {gen:.1f}s", who)
    return str(sft), str(aligned), gen


def _described(p: Pair) -> Pair:
    p.sft_files, p.aligned_files = weight_files(p.sft), weight_files(p.aligned)
    p.desc.update(sft=p.sft, aligned=p.aligned, sft_bytes=nbytes(p.sft_files), aligned_bytes=nbytes(p.aligned_files),
                  sft_files=len(p.sft_files), aligned_files=len(p.aligned_files))
    return p


def largest_tensor(folder: str) -> int:
    """Largest tensor's bytes in a model folder, from the safetensors headers."""
    best = 0
    for f in weight_files(folder):
        with open(f, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(n))
        for k, v in header.items():
            if k != "__metadata__":
                best = max(best, v["data_offsets"][1] - v["data_offsets"][0])
    return best


def cleanup(b: Bench) -> None:
    """Remove the work folder; keep a generated pair where --keep or --pair asks for it."""
    args, generated = b.args, b.pair is not None and b.pair.generated
    if generated and args.keep and not args.pair:
        for name in os.listdir(b.workdir):
            if name != "pair":
                remove(os.path.join(b.workdir, name))
        log(f"pair kept: {os.path.join(b.workdir, 'pair')} (reuse with --pair; delete it when done)")
    else:
        shutil.rmtree(b.workdir, ignore_errors=True)
    if args.pair and generated:
        log(f"pair kept: {args.pair} (--pair); delete it when done")
