"""The one pair factory of the tests (fixture `pair_factory` in conftest.py).

    pair_factory(kind="tiny", *, private=False, **overrides) -> (sft_dir, aligned_dir)
    pair_factory.bin(folder, shard_tensors=None, *, private=False) -> bin_dir

kind names a shape (KINDS); overrides are expo_dist.testing.synth.make_pair's keyword arguments (seed, dtype,
extra_vocab, nonfloat_buffer, tie_word_embeddings, shard sizes, ...). A pair is generated once per session for
the same resolved arguments (synth's defaults filled in, so `num_layers=2` and no num_layers ask for the same
pair) and shared: generation takes seconds on a small machine, and the generator is deterministic, so sharing
changes no byte a test sees. Shared pairs are read-only by contract: a test (or fixture) that changes its
inputs asks for private=True and gets its own copy. Every hand-out re-checks the shared folders against what
was generated (names, sizes, mtimes), so a test that modified a shared pair fails the next one to ask for it
instead of silently weakening it.

bin() re-saves a model folder as pytorch .bin (synth.to_bin: shard_tensors None → one pytorch_model.bin, else
that many tensors per shard), cached the same way.
"""

from __future__ import annotations

import inspect
import os
import pathlib
import shutil

from expo_dist.testing import synth

# Named shapes; everything else is an override. Sizes: bf16 data per model.
KINDS: dict[str, dict] = {
    # synth's defaults: hidden 64, intermediate 128, 2 layers, 4/2 heads, vocab 256; one model.safetensors (~210 KB)
    "tiny": {},
    # tiny, sharded differently per model (7 and 10 shards): shard boundaries that do not line up
    "sharded": dict(sft_shard_bytes=40_000, aligned_shard_bytes=27_000),
    # tiny in 2 shards per model, at different boundaries
    "two-shards": dict(sft_shard_bytes=150_000, aligned_shard_bytes=110_000),
    # tiny with tie_word_embeddings (no lm_head.weight)
    "tied": dict(tie_word_embeddings=True),
    # the smallest Llama the generator makes (one layer, vocab 16) with a non-float buffer: for fuzzing (~4 KB)
    "micro": dict(hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2, num_kv_heads=1, vocab_size=16,
                  nonfloat_buffer=True),
    # ~8 MB: enough 1 MiB tasks for several workers and nodes; 3 MB / 2 MB shards
    "small": dict(hidden_size=256, intermediate_size=768, num_layers=4, num_heads=8, num_kv_heads=4, vocab_size=2048,
                  sft_shard_bytes=3_000_000, aligned_shard_bytes=2_000_000),
    # ~19 MB whose large tensors are several MiB, so 1 MiB tasks cut each into several; 7 MB / 5 MB shards
    "mid": dict(hidden_size=512, intermediate_size=1536, num_layers=2, num_heads=8, num_kv_heads=4, vocab_size=3000,
                sft_shard_bytes=7_000_000, aligned_shard_bytes=5_000_000),
}

DEFAULTS = {n: p.default for n, p in inspect.signature(synth.make_pair).parameters.items()
            if p.kind is inspect.Parameter.KEYWORD_ONLY}


def _state(folders) -> tuple:
    """What a folder holds, cheaply: every entry's path, kind, size and mtime (links not followed)."""
    out = []
    for top in folders:
        for dirpath, dirnames, filenames in os.walk(top):
            dirnames.sort()
            for name in sorted(filenames) + dirnames:
                p = os.path.join(dirpath, name)
                st = os.lstat(p)
                out.append((p, st.st_mode, st.st_size, st.st_mtime_ns))
    return tuple(out)


class PairFactory:
    def __init__(self, tmp_path_factory):
        self._tmp = tmp_path_factory
        self._root: pathlib.Path | None = None
        self._pairs: dict[tuple, tuple[pathlib.Path, pathlib.Path]] = {}
        self._bins: dict[tuple, pathlib.Path] = {}
        self._states: dict[tuple[pathlib.Path, ...], tuple] = {}

    # ---- the API ----

    def __call__(self, kind: str = "tiny", *, private: bool = False, **overrides) -> tuple[pathlib.Path, pathlib.Path]:
        kw = self.arguments(kind, **overrides)
        key = tuple(sorted(kw.items()))
        pair = self._pairs.get(key)
        if pair is None:
            folder = self._fresh(f"{kind}-{len(self._pairs)}")
            pair = tuple(synth.make_pair(folder, **kw))
            self._pairs[key] = pair
            self._states[pair] = _state(pair)
        else:
            self._check(pair)
        if not private:
            return pair
        own = self._tmp.mktemp(f"{kind}-own")
        return tuple(pathlib.Path(shutil.copytree(p, own / p.name)) for p in pair)

    def bin(self, folder, shard_tensors: int | None = None, *, private: bool = False) -> pathlib.Path:
        key = (os.path.realpath(folder), shard_tensors)
        out = self._bins.get(key)
        if out is None:
            src = pathlib.Path(folder)
            out = synth.to_bin(src, self._fresh(f"bin-{len(self._bins)}") / f"{src.name}-bin", shard_tensors)
            self._bins[key] = out
            self._states[(out,)] = _state([out])
        else:
            self._check((out,))
        if not private:
            return out
        return pathlib.Path(shutil.copytree(out, self._tmp.mktemp("bin-own") / out.name))

    @staticmethod
    def arguments(kind: str = "tiny", **overrides) -> dict:
        """make_pair's full keyword arguments for this kind and these overrides."""
        if kind not in KINDS:
            raise ValueError(f"unknown pair kind {kind!r}: one of {', '.join(KINDS)}")
        unknown = set(overrides) - set(DEFAULTS)
        if unknown:
            raise TypeError(f"make_pair has no argument(s) {sorted(unknown)}")
        return {**DEFAULTS, **KINDS[kind], **overrides}

    # ---- bookkeeping ----

    def _fresh(self, name: str) -> pathlib.Path:
        if self._root is None:
            self._root = self._tmp.mktemp("pairs", numbered=True)
        d = self._root / name
        d.mkdir()
        return d

    def _check(self, folders) -> None:
        if _state(folders) != self._states[folders]:
            raise AssertionError(f"a test changed the shared pair {[str(f) for f in folders]}: a test that "
                                 "modifies its inputs must ask pair_factory(..., private=True) for its own copy")

    def check_all(self) -> None:
        for folders in self._states:
            self._check(folders)
