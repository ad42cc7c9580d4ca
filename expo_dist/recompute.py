"""Recompute an output's tensors from the input models (the values half of `expo-dist verify`).

What each tensor must be comes from the same planner the merge uses (plan.make_plan, with the alpha rules the
manifest recorded); extrapolated elements are recomputed in float64 and rounded once (kernel.round_f64_to), copied
elements (non-float tensors, vocabulary rows the aligned model added) must equal the aligned model's bytes. Data is
read in chunks of elements with positional reads, so memory stays bounded whatever the tensor size.
"""

from __future__ import annotations

import json
import os
import random
from typing import TYPE_CHECKING, Callable

from .dtypes import itemsize, torch_dtype
from .errors import ExpoError
from .fetch import local_path  # a Hub input's weight file is named by an hf:// ref: its file in this cache
from .fileio import pread_into
from .finalize import MANIFEST, side_files
from .index import ModelIndex, index_model
from .plan import COPY, EXTRAPOLATE, Segment, make_plan, natural_key
from .rules import alphas_for, parse_rules

if TYPE_CHECKING:
    from .verify import Report

CHUNK_ELEMS = 1 << 20  # elements per read: ~40 MB of buffers (two float64 inputs, their raw bytes, the result)
DEFAULT_SAMPLE = 8


class _Files:
    """Positional reads through a few cached descriptors."""

    def __init__(self):
        self.fds: dict[str, int] = {}

    def pread(self, path: str, offset: int, n: int) -> bytearray:
        fd = self.fds.get(path)
        if fd is None:
            fd = self.fds[path] = os.open(local_path(path), os.O_RDONLY)
        buf = bytearray(n)
        pread_into(fd, memoryview(buf), offset, path, ExpoError)
        return buf

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()




def _manifest_rules(out: str):
    """The per-tensor alpha rules the merge recorded in its manifest (none for older manifests)."""
    try:
        with open(os.path.join(out, MANIFEST), encoding="utf-8") as f:
            return parse_rules(json.load(f).get("alpha_rules") or None)
    except (OSError, ValueError):
        return []


def _sources(index: ModelIndex):
    from .merge import sources

    return sources(index)


def check_values(out_idx: ModelIndex, sft_root: str, aligned_root: str, alpha: float, report: Report,
                 say: Callable[[str], None], sample: int | None = DEFAULT_SAMPLE, seed: int = 0,
                 chunk_elems: int = CHUNK_ELEMS, detail: Callable[[str], None] = lambda msg: None) -> None:
    """Recompute tensors from the inputs. sample=None: every extrapolated tensor."""
    report.with_inputs = True
    sft, aligned = index_model(sft_root), index_model(aligned_root)
    big = 1 << 62  # one shard, one task: each tensor's segments in plain element order
    plan = make_plan(_sources(sft), _sources(aligned), alpha_for=alphas_for((alpha,), _manifest_rules(out_idx.root)),
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
    for fname in side_files(aligned.root):
        mine = os.path.join(out_idx.root, fname)
        with open(os.path.join(aligned.root, fname), "rb") as f:
            theirs = f.read()
        if not os.path.exists(mine):
            report.problems.append(f"{mine}: missing (the aligned model has {fname})")
        else:
            with open(mine, "rb") as f:
                if f.read() != theirs:
                    report.problems.append(f"{mine}: differs from the aligned model's {fname}")

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
    files = _Files()
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
    """Compare one segment of the output, chunk by chunk. Returns (elements that differ, first difference)."""
    import torch

    from .kernel import round_f64_to

    asz, ssz, osz = itemsize(seg.a_dtype), itemsize(seg.s_dtype), itemsize(seg.out_dtype)
    odt = torch_dtype(seg.out_dtype)
    floating = odt.is_floating_point
    bad, where = 0, ""
    for lo in range(0, seg.count, chunk):
        k = min(chunk, seg.count - lo)
        a_raw = files.pread(seg.a_file, seg.a_offset + lo * asz, k * asz)
        got_raw = files.pread(out_file, out_begin + (first + lo) * osz, k * osz)
        if seg.op == COPY:
            exp_raw = bytes(a_raw)
            if floating:
                report.nonfinite_in += _nonfinite(a_raw, odt)
        else:
            a = torch.frombuffer(a_raw, dtype=torch_dtype(seg.a_dtype)).to(torch.float64)
            s = torch.frombuffer(files.pread(seg.s_file, seg.s_offset + lo * ssz, k * ssz),
                                 dtype=torch_dtype(seg.s_dtype)).to(torch.float64)
            report.nonfinite_in += int((~torch.isfinite(a)).sum()) + int((~torch.isfinite(s)).sum())
            exp_raw = round_f64_to(a + seg.alpha * (a - s), odt).view(torch.uint8).numpy().tobytes()
        report.elements += k
        if floating:
            report.nonfinite_out += _nonfinite(got_raw, odt)
        if bytes(got_raw) == exp_raw:
            continue
        got = torch.frombuffer(got_raw, dtype=torch.uint8).view(-1, osz)
        exp = torch.frombuffer(bytearray(exp_raw), dtype=torch.uint8).view(-1, osz)
        diff = (got != exp).any(dim=1)
        if floating:  # any NaN stands for any NaN (payloads and signs of NaN carry no value)
            g, e = got.reshape(-1).view(odt), exp.reshape(-1).view(odt)
            diff &= ~(torch.isnan(g) & torch.isnan(e))
        n = int(diff.sum())
        if n and not where:
            i = int(diff.nonzero()[0])
            if floating:
                gv, ev = got.reshape(-1).view(odt)[i].item(), exp.reshape(-1).view(odt)[i].item()
            else:
                gv, ev = got[i].tolist(), exp[i].tolist()
            where = f"first at element {first + lo + i}: output {gv!r}, expected {ev!r}"
        bad += n
    return bad, where


def _nonfinite(raw: bytearray, dtype) -> int:
    import torch

    t = torch.frombuffer(raw, dtype=dtype)
    return int((~torch.isfinite(t)).sum())
