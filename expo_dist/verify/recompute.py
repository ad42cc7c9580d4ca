"""Recompute an output's tensors from the input models (the values half of `expo-dist verify`).

What each tensor must be comes from the same planner the merge uses (plan.make_plan, with the alpha rules the
manifest recorded); extrapolated elements are recomputed in float64 and rounded once (kernel.round_f64_to), copied
elements (non-float tensors, vocabulary rows the aligned model added) must equal the aligned model's bytes. Data is
read in chunks of elements with positional reads, so memory stays bounded whatever the tensor size.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable

import numpy as np

from ..errors import ExpoError
from ..formats.dtypes import NUMPY_NAMES, is_float, itemsize, torch_dtype
from ..formats.folder import side_files
from ..formats.reader import LocalReader
from ..planning.plan import COPY, EXTRAPOLATE, Segment, make_plan, natural_key, tensor_sources
from ..planning.rules import Rule, alphas_for
from ..settings import HUB_ATTEMPTS
from ..sources import s3
from ..sources.fetch import local_path  # a Hub input's weight file is named by an hf:// ref: its file in this cache
from ..sources.index import ModelIndex, index_model
from .location import Output, open_output
from .verdict import Report

CHUNK_ELEMS = 1 << 20  # elements per read: ~40 MB of buffers (two float64 inputs, their raw bytes, the result)
DEFAULT_SAMPLE = 8


class _Files:
    """The input and output files, each open once for positional reads (formats.reader.LocalReader); an s3://
    object is read by ranged GETs."""

    def __init__(self, hub_attempts: int = HUB_ATTEMPTS):
        self.readers: dict[str, LocalReader] = {}
        self.hub_attempts = hub_attempts

    def pread(self, path: str, offset: int, n: int) -> bytearray:
        if s3.is_s3(path):
            buf = bytearray(n)
            s3.read_into(path, memoryview(buf), offset)
            return buf
        r = self.readers.get(path)
        if r is None:
            r = self.readers[path] = LocalReader(local_path(path, attempts=self.hub_attempts), path)
        buf = bytearray(n)
        r.read_into(memoryview(buf), offset)
        return buf

    def close(self) -> None:
        for r in self.readers.values():
            r.close()
        self.readers.clear()


def check_values(out_idx: ModelIndex, sft_root: str, aligned_root: str, alpha: float, report: Report,
                 say: Callable[[str], None], rules: list[Rule] = (), sample: int | None = DEFAULT_SAMPLE,
                 seed: int = 0, chunk_elems: int = CHUNK_ELEMS,
                 detail: Callable[[str], None] = lambda msg: None, hub_attempts: int = HUB_ATTEMPTS,
                 output: Output | None = None) -> None:
    """Recompute tensors from the inputs, with the per-tensor alpha rules the merge used (its manifest's).
    sample=None: every extrapolated tensor. hub_attempts: tries of each Hub request (Settings.hub_attempts).
    output: where the output's side files are read (default: the folder out_idx.root)."""
    report.with_inputs = True
    sft = index_model(sft_root, hub_attempts=hub_attempts)
    aligned = index_model(aligned_root, hub_attempts=hub_attempts)
    big = 1 << 62  # one shard, one task: each tensor's segments in plain element order
    plan = make_plan(tensor_sources(sft), tensor_sources(aligned), alpha_for=alphas_for((alpha,), list(rules)),
                     sft_config=sft.config,
                     aligned_config=aligned.config, max_task_bytes=big, max_shard_size=big)
    want = {n: d for n, d in plan.decisions.items() if d.op != "dropped-tied"}
    have = out_idx.tensors
    for name in sorted(set(want) - set(have), key=natural_key):
        report.problems.append(f"tensor {name!r} ({want[name].op}) is missing from the output")
    for name in sorted(set(have) - set(want), key=natural_key):
        report.problems.append(f"tensor {name!r} is in the output but not in the plan for these inputs")
    for name in sorted(set(want) & set(have), key=natural_key):
        d, ref = want[name], have[name]
        if (ref.dtype, ref.shape) != (d.dtype, d.shape):
            report.problems.append(f"tensor {name!r}: output has {ref.dtype}{list(ref.shape)}, "
                                   f"expected {d.dtype}{list(d.shape)}")
    output = output if output is not None else open_output(out_idx.root)
    for fname in side_files(aligned.root):
        mine = output.join(fname)
        with open(os.path.join(aligned.root, fname), "rb") as f:
            theirs = f.read()
        try:
            if output.read(fname, len(theirs)) != theirs:
                report.problems.append(f"{mine}: differs from the aligned model's {fname}")
        except FileNotFoundError:
            report.problems.append(f"{mine}: missing (the aligned model has {fname})")
        except (OSError, ExpoError) as e:
            report.problems.append(f"{mine}: unreadable ({getattr(e, 'strerror', None) or e})")

    begin = {n: e.begin for sh in plan.shards for n, e in sh.layout.tensors.items()}
    segs: dict[str, list[Segment]] = {}
    for task in plan.tasks:
        for seg in task.segments:
            segs.setdefault(seg.tensor, []).append(seg)
    names = [n for n in sorted(segs, key=natural_key)
             if n in have and (have[n].dtype, have[n].shape) == (want[n].dtype, want[n].shape)]
    extrap = [n for n in names if any(s.op == EXTRAPOLATE for s in segs[n])]
    chosen = set(extrap)
    if sample is not None and sample < len(extrap):
        chosen = set(random.Random(seed).sample(extrap, sample))
    files = _Files(hub_attempts)
    try:
        for name in names:
            ref = have[name]
            do_copy = [s for s in segs[name] if s.op == COPY]
            do_ext = [s for s in segs[name] if s.op == EXTRAPOLATE] if name in chosen else []
            if not do_copy and not do_ext:
                continue
            bad = 0
            first_bad = ""
            for seg in do_copy + do_ext:
                first = (seg.out_offset - begin[name]) // itemsize(seg.out_dtype)
                n_bad, where = _check_segment(files, seg, ref.file, ref.entry.begin, first, chunk_elems, report)
                if n_bad and not first_bad:
                    first_bad = where
                bad += n_bad
            report.copies += bool(do_copy)
            report.recomputed += bool(do_ext)
            kind = " and ".join(k for k, on in (("copied", do_copy), ("extrapolated", do_ext)) if on)
            if bad:
                report.problems.append(f"tensor {name!r}: {bad} {kind} element(s) differ from "
                                       f"{'the float64 reference' if do_ext else 'the aligned model'}; {first_bad}")
            else:
                detail(f"{name}: {kind} elements exact")
    finally:
        files.close()
    say(f"checked {report.recomputed} of {len(extrap)} extrapolated tensor(s) "
        f"({'all' if sample is None else f'sample of {sample}, seed {seed}'}) and the copied elements of "
        f"{report.copies} tensor(s): {report.elements} elements")
    if report.nonfinite_in:
        say(f"warning: the inputs hold {report.nonfinite_in} NaN/Inf element(s) in the checked ranges")
    if report.nonfinite_out:
        say(f"warning: the output holds {report.nonfinite_out} NaN/Inf element(s) in the checked ranges")


def _check_segment(files: _Files, seg: Segment, out_file: str, out_begin: int, first: int, chunk: int,
                   report: Report) -> tuple[int, str]:
    """Compare one segment of the output, chunk by chunk. Returns (elements that differ, first difference).

    Copied elements are compared as bytes, whatever their dtype (every safetensors dtype: FP8 and unsigned
    integers too); only extrapolated ones, always a kernel float, are computed with torch."""
    import torch

    from ..runtime.kernel import round_f64_to

    asz, ssz, osz = itemsize(seg.a_dtype), itemsize(seg.s_dtype), itemsize(seg.out_dtype)
    odt = seg.out_dtype
    floating = is_float(odt)
    bad, where = 0, ""
    for lo in range(0, seg.count, chunk):
        k = min(chunk, seg.count - lo)
        a_raw = files.pread(seg.a_file, seg.a_offset + lo * asz, k * asz)
        got_raw = files.pread(out_file, out_begin + (first + lo) * osz, k * osz)
        if seg.op == COPY:
            exp_raw = bytes(a_raw)
            if floating:
                report.nonfinite_in += int(_nonfinite_mask(a_raw, odt).sum())
        else:
            a = torch.frombuffer(a_raw, dtype=torch_dtype(seg.a_dtype)).to(torch.float64)
            s = torch.frombuffer(files.pread(seg.s_file, seg.s_offset + lo * ssz, k * ssz),
                                 dtype=torch_dtype(seg.s_dtype)).to(torch.float64)
            report.nonfinite_in += int((~torch.isfinite(a)).sum()) + int((~torch.isfinite(s)).sum())
            exp_raw = round_f64_to(a + seg.alpha * (a - s), torch_dtype(odt)).view(torch.uint8).numpy().tobytes()
        report.elements += k
        if floating:
            report.nonfinite_out += int(_nonfinite_mask(got_raw, odt).sum())
        if bytes(got_raw) == exp_raw:
            continue
        got = np.frombuffer(bytes(got_raw), dtype=np.uint8).reshape(-1, osz)
        exp = np.frombuffer(exp_raw, dtype=np.uint8).reshape(-1, osz)
        diff = (got != exp).any(axis=1)
        if floating:  # any NaN stands for any NaN (payloads and signs of NaN carry no value)
            diff &= ~(_nan_mask(got_raw, odt) & _nan_mask(exp_raw, odt))
        n = int(diff.sum())
        if n and not where:
            i = int(np.flatnonzero(diff)[0])
            where = (f"first at element {first + lo + i}: output {_value(got[i], odt)}, "
                     f"expected {_value(exp[i], odt)}")
        bad += n
    return bad, where


def _nan_mask(raw, dtype: str) -> np.ndarray:
    """NaN elements of raw little-endian data of a float dtype, from the bits (no torch dtype needed)."""
    if dtype == "BF16":
        u = np.frombuffer(bytes(raw), dtype="<u2")
        return (u & 0x7FFF) > 0x7F80
    if dtype == "F8_E4M3":  # e4m3fn: S.1111.111 is NaN; there is no infinity
        u = np.frombuffer(bytes(raw), dtype=np.uint8)
        return (u & 0x7F) == 0x7F
    if dtype == "F8_E5M2":  # IEEE-like: exponent all ones, mantissa non-zero
        u = np.frombuffer(bytes(raw), dtype=np.uint8)
        return ((u & 0x7C) == 0x7C) & ((u & 0x03) != 0)
    return np.isnan(np.frombuffer(bytes(raw), dtype=NUMPY_NAMES[dtype]))


def _nonfinite_mask(raw, dtype: str) -> np.ndarray:
    """NaN and infinite elements of raw little-endian data of a float dtype."""
    if dtype == "BF16":
        u = np.frombuffer(bytes(raw), dtype="<u2")
        return (u & 0x7F80) == 0x7F80
    if dtype == "F8_E4M3":
        return _nan_mask(raw, dtype)
    if dtype == "F8_E5M2":
        u = np.frombuffer(bytes(raw), dtype=np.uint8)
        return (u & 0x7C) == 0x7C
    return ~np.isfinite(np.frombuffer(bytes(raw), dtype=NUMPY_NAMES[dtype]))


def _value(raw_elem: np.ndarray, dtype: str) -> str:
    """One element for a problem line: its value where numpy can read the dtype, else its bytes in hex."""
    data = raw_elem.tobytes()
    if dtype in NUMPY_NAMES and dtype != "BOOL":
        return repr(np.frombuffer(data, dtype=NUMPY_NAMES[dtype])[0].item())
    if dtype == "BF16":
        return repr(float(np.frombuffer(b"\0\0" + data, dtype="<f4")[0]))
    return "0x" + data[::-1].hex()
