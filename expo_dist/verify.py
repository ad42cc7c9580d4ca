"""`expo-dist verify`: check a merged output folder; with the input models, recompute its tensors.

Without inputs: the weight index (every tensor mapped to the file that holds it, total_size), every file's
safetensors header and size (stfile.read_header), and the sha256 and size of every weight file against
expo_manifest.json. With --sft/--aligned (α from --alpha or the manifest) the tensors are recomputed from the
inputs (recompute.py): copies are always checked; extrapolated tensors are sampled (--sample N, seeded) or all
checked (--full).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from dataclasses import dataclass, field
from typing import Callable

from .errors import ExpoError
from .finalize import INDEX, MANIFEST, WORK
from .index import ModelIndex, index_model
from .plan import natural_key
from .recompute import CHUNK_ELEMS, DEFAULT_SAMPLE, check_values
from .spec import parse_alpha

HASH_CHUNK = 16 << 20


@dataclass
class Report:
    out: str
    problems: list[str] = field(default_factory=list)
    files: int = 0
    tensors: int = 0
    total_size: int = 0
    hashed: int = 0  # weight files whose sha256 matched the manifest
    recomputed: int = 0  # tensors whose extrapolated elements were recomputed
    copies: int = 0  # tensors with copied elements checked
    elements: int = 0
    nonfinite_in: int = 0  # NaN/Inf elements in the inputs of the checked ranges
    nonfinite_out: int = 0  # NaN/Inf elements in the output of the checked ranges
    with_inputs: bool = False

    @property
    def ok(self) -> bool:
        return not self.problems

    def verdict(self) -> str:
        if not self.ok:
            more = f" (and {len(self.problems) - 1} more)" if len(self.problems) > 1 else ""
            return f"verify: FAILED {self.out}: {self.problems[0]}{more}"
        msg = (f"verify: OK {self.out}: {self.files} file(s), {self.tensors} tensors, {self.total_size} bytes, "
               f"sha256 of {self.hashed} file(s) match the manifest")
        if self.with_inputs:
            msg += (f"; {self.recomputed} extrapolated tensor(s) recomputed and {self.copies} copied tensor(s) "
                    f"compared, {self.elements} elements, all exact")
            if self.nonfinite_in or self.nonfinite_out:
                msg += f"; NaN/Inf: {self.nonfinite_in} in the inputs, {self.nonfinite_out} in the output"
        else:
            msg += "; values not recomputed (give --sft and --aligned)"
        return msg


def _sha256(path: str) -> tuple[str, int]:
    h, n = hashlib.sha256(), 0
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(HASH_CHUNK)
        view = memoryview(buf)
        while True:
            k = f.readinto(view)
            if not k:
                break
            h.update(view[:k])
            n += k
    return h.hexdigest(), n


def check_structure(out: str, report: Report, say: Callable[[str], None]) -> ModelIndex | None:
    """Index, headers, sizes, total_size, manifest checksums. Returns the output's index if it could be read."""
    if os.path.isdir(os.path.join(out, WORK)):
        report.problems.append(f"{os.path.join(out, WORK)} exists: the merge did not finish; rerun the same "
                               "merge command to complete it")
    try:
        idx = index_model(out)  # weight_map vs shards, file names, files exist, headers, sizes, duplicates
    except ExpoError as e:
        report.problems.append(str(e))
        return None
    report.files, report.tensors, report.total_size = len(idx.files), len(idx.tensors), idx.total_bytes
    index_path = os.path.join(out, INDEX)
    if os.path.exists(index_path):
        with open(index_path, encoding="utf-8") as f:
            total = (json.load(f).get("metadata") or {}).get("total_size")
        if total != idx.total_bytes:
            report.problems.append(f"{index_path}: metadata.total_size is {total!r}, the tensors hold "
                                   f"{idx.total_bytes} bytes")
    for path, header in idx.files.items():
        if header.metadata.get("format") != "pt":
            report.problems.append(f"{path}: header __metadata__ lacks format=pt (transformers needs it)")
    manifest_path = os.path.join(out, MANIFEST)
    try:
        with open(manifest_path, encoding="utf-8") as f:
            manifest = json.load(f)
        recorded = manifest["files"]
        assert isinstance(recorded, dict)
    except FileNotFoundError:
        report.problems.append(f"{manifest_path}: missing; cannot check the weight files' sha256")
        return idx
    except (OSError, ValueError, KeyError, TypeError, AssertionError) as e:
        report.problems.append(f"{manifest_path}: unreadable ({e.__class__.__name__}: {e})")
        return idx
    names = {os.path.basename(p) for p in idx.files}
    for name in sorted(set(recorded) - names):
        report.problems.append(f"{manifest_path}: lists {name}, which is not part of the weights")
    for name in sorted(names - set(recorded)):
        report.problems.append(f"{os.path.join(out, name)}: not listed in {MANIFEST}")
    for name in sorted(names & set(recorded), key=natural_key):
        rec = recorded[name] or {}
        path = os.path.join(out, name)
        digest, size = _sha256(path)
        if rec.get("size") not in (None, size):
            report.problems.append(f"{path}: {size} bytes, the manifest says {rec.get('size')}")
        if rec.get("sha256") != digest:
            report.problems.append(f"{path}: sha256 {digest[:16]}... differs from the manifest's "
                                   f"{str(rec.get('sha256'))[:16]}... (file changed or corrupt)")
        else:
            report.hashed += 1
        say(f"{name}: {size} bytes, sha256 {digest[:16]}... ok" if rec.get("sha256") == digest else
            f"{name}: {size} bytes, sha256 {digest[:16]}... MISMATCH")
    return idx


def _source(text: str) -> str:
    """A folder that exists, as an absolute path; anything else (a Hub repo id) as given."""
    path = os.path.expanduser(str(text))
    return os.path.abspath(path) if os.path.exists(path) else str(text)


def verify(out: str, sft: str | None = None, aligned: str | None = None, alpha: float | None = None,
           sample: int | None = DEFAULT_SAMPLE, seed: int = 0, chunk_elems: int = CHUNK_ELEMS,
           verbose: bool = False, say: Callable[[str], None] | None = None) -> Report:
    """Check the output folder; recompute tensors when sft and aligned are given (sample=None: all).

    Problems, warnings and a summary go to say() (default: stderr); per-file and per-tensor lines only
    when verbose. The caller prints report.verdict()."""
    if say is None:
        def say(msg: str) -> None:
            print(f"expo-dist verify: {msg}", file=sys.stderr)
    tell = say

    def detail(msg: str) -> None:
        if verbose:
            tell(msg)
    out = os.path.abspath(os.path.expanduser(out))
    if not os.path.isdir(out):
        raise ExpoError(f"{out}: not a folder (give the merge's --out folder)")
    if bool(sft) != bool(aligned):
        raise ExpoError("give both --sft and --aligned to recompute the tensors, or neither")
    if sample is not None and sample < 0:
        raise ExpoError("--sample must be at least 0")
    report = Report(out)
    idx = check_structure(out, report, detail)
    if sft and aligned and idx is not None:
        if alpha is None:
            try:
                with open(os.path.join(out, MANIFEST), encoding="utf-8") as f:
                    alpha = json.load(f)["alpha"]
                say(f"alpha {alpha} (from {MANIFEST})")
            except (OSError, ValueError, KeyError, TypeError):
                raise ExpoError(f"give --alpha: {os.path.join(out, MANIFEST)} does not say which alpha") from None
        alpha = parse_alpha(alpha)
        check_values(idx, _source(sft), _source(aligned), alpha, report, say, sample=sample,
                     seed=seed, chunk_elems=chunk_elems, detail=detail)
    for p in report.problems:
        say(f"problem: {p}")
    return report
