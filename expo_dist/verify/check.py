"""`expo-dist verify`: check a merged output (a folder or an s3:// prefix, location.py); with the input models,
recompute its tensors.

Without inputs: the weight index (every tensor mapped to the file that holds it, total_size), every file's
safetensors header and size (formats.safetensors.read_header), and the size and checksums of every weight file
against expo_manifest.json: the sha256 of a local output's files; an s3:// output's CRC-32 (objects streamed by
ranged GETs) and the checksum S3 stored for each object. A work folder (.expo/) left there means the merge did not
finish. With --sft/--aligned (α from --alpha or the manifest) the tensors are recomputed from the
inputs (recompute.py): copies are always checked; extrapolated tensors are sampled (--sample N, seeded) or all
checked (--full).
"""

from __future__ import annotations

import base64
import os
import sys
from collections.abc import Callable

from ..errors import ExpoError
from ..formats.folder import INDEX, MANIFEST
from ..planning.plan import natural_key
from ..planning.rules import parse_alpha, parse_rules, show_value
from ..settings import HUB_ATTEMPTS
from ..sources.index import ModelIndex, index_model
from .location import DAMAGE, Output, damage, open_output, read_json
from .recompute import CHUNK_ELEMS, DEFAULT_SAMPLE, check_values
from .verdict import Report, printable


def read_manifest(out: Output) -> tuple[dict | None, str | None]:
    """The output's manifest as a JSON object, or (None, why not)."""
    doc, why = read_json(out, MANIFEST)
    if why is None and not isinstance(doc, dict):
        doc, why = None, "not a JSON object"
    return doc, why


def check_structure(out: Output, report: Report, say: Callable[[str], None]) -> ModelIndex | None:
    """Index, headers, sizes, total_size, manifest checksums. Returns the output's index if it could be read."""
    unfinished = out.unfinished()
    if unfinished:
        report.problems.append(f"{unfinished}: the merge did not finish; rerun the same merge command to complete it")
    try:
        idx = index_model(out.where)  # weight_map vs shards, file names, files exist, headers, sizes, duplicates
    except ExpoError as e:
        report.problems.append(str(e))
        return None
    except DAMAGE as e:  # a reader met a damaged file it did not expect: the output is not sound
        report.problems.append(f"{out.where}: index or headers damaged ({damage(e)})")
        return None
    report.files, report.tensors, report.total_size = len(idx.files), len(idx.tensors), idx.total_bytes
    index_path = out.join(INDEX)
    doc, why = read_json(out, INDEX)
    if why != "missing":  # a single model.safetensors has no index
        meta = doc.get("metadata") if isinstance(doc, dict) else None
        total = meta.get("total_size") if isinstance(meta, dict) else None
        if why is not None:
            report.problems.append(f"{index_path}: {why}")
        elif type(total) is not int or total != idx.total_bytes:
            report.problems.append(f"{index_path}: metadata.total_size is {_short(total)}, the tensors hold "
                                   f"{idx.total_bytes} bytes")
    for path, header in idx.files.items():
        if header.metadata.get("format") != "pt":
            report.problems.append(f"{path}: header __metadata__ lacks format=pt (transformers needs it)")
    manifest_path = out.join(MANIFEST)
    manifest, why = read_manifest(out)
    if why == "missing":
        report.problems.append(f"{manifest_path}: missing; cannot check the weight files' checksums")
        return idx
    recorded = manifest.get("files") if manifest is not None else None
    if why is None and not isinstance(recorded, dict):
        why = "has no 'files' object"
    if why is not None:
        report.problems.append(f"{manifest_path}: unreadable ({why})")
        return idx
    _check_manifest_tensors(manifest, manifest_path, idx, report)
    names = {os.path.basename(p) for p in idx.files}
    for name in sorted(set(recorded) - names):
        report.problems.append(f"{manifest_path}: lists {name[:200]!r}, which is not part of the weights")
    for name in sorted(names - set(recorded)):
        report.problems.append(f"{out.join(name)}: not listed in {MANIFEST}")
    for name in sorted(names & set(recorded), key=natural_key):
        rec = recorded[name]
        if not isinstance(rec, dict):
            report.problems.append(f"{manifest_path}: the entry of {name} is not a JSON object")
            continue
        _check_file(out, name, rec, report, say)
    return idx


def _check_file(out: Output, name: str, rec: dict, report: Report, say: Callable[[str], None]) -> None:
    """One weight file against its manifest entry: size, sha256 (local outputs), CRC-32 (s3:// outputs) and the
    checksum S3 stored for the object, each where the manifest records it."""
    path = out.join(name)
    want_sha, want_crc, want_s3 = rec.get("sha256"), rec.get("crc32"), rec.get("s3_checksum_crc32")
    if want_sha is None and want_crc is None:
        report.problems.append(f"{out.join(MANIFEST)}: records no sha256 or crc32 of {name}")
        return
    try:
        d = out.digest(name, sha=want_sha is not None)
    except ExpoError as e:
        report.problems.append(str(e))
        return
    bad = len(report.problems)
    if rec.get("size") is not None and (type(rec.get("size")) is not int or rec.get("size") != d.size):
        report.problems.append(f"{path}: {d.size} bytes, the manifest says {_short(rec.get('size'))}")
    sums = []
    if want_sha is not None:
        sums.append(f"sha256 {d.sha256[:16]}...")
        if want_sha != d.sha256:
            report.problems.append(f"{path}: sha256 {d.sha256[:16]}... differs from the manifest's "
                                   f"{_short(want_sha)[:16]}... (file changed or corrupt)")
    if want_crc is not None:
        sums.append(f"CRC-32 {d.crc32:08x}")
        if want_crc != f"{d.crc32:08x}":
            report.problems.append(f"{path}: CRC-32 {d.crc32:08x} differs from the manifest's {_short(want_crc)} "
                                   "(object changed or corrupt)")
    if d.stored_crc32 is not None and want_s3 is not None:
        # S3 keeps a multipart object's composite checksum ("base64-N", what the manifest records), or a
        # full-object one (base64 of the CRC-32 of the whole object)
        expect = want_s3 if "-" in d.stored_crc32 else base64.b64encode(d.crc32.to_bytes(4, "big")).decode()
        sums.append(f"S3 checksum {d.stored_crc32}")
        if d.stored_crc32 != expect:
            report.problems.append(f"{path}: S3's stored checksum {_short(d.stored_crc32)} differs from "
                                   f"{_short(expect)} (the manifest's or the object's)")
        else:
            report.s3_checked += 1
    ok = len(report.problems) == bad
    report.hashed += ok
    report.kinds.update(k for k, on in (("sha256", want_sha is not None), ("CRC-32", want_crc is not None)) if on)
    say(f"{name}: {d.size} bytes, {', '.join(sums)} {'ok' if ok else 'MISMATCH'}")


def _check_manifest_tensors(manifest: dict, manifest_path: str, idx: ModelIndex, report: Report) -> None:
    """The manifest's total_size and per-tensor dtype and shape against the output's headers (where recorded)."""
    if "total_size" in manifest and (type(manifest["total_size"]) is not int
                                     or manifest["total_size"] != idx.total_bytes):
        report.problems.append(f"{manifest_path}: total_size is {_short(manifest['total_size'])}, the tensors "
                               f"hold {idx.total_bytes} bytes")
    tensors = manifest.get("tensors")
    if tensors is None:
        return
    if not isinstance(tensors, dict):
        report.problems.append(f"{manifest_path}: 'tensors' is not a JSON object")
        return
    for name in sorted(set(idx.tensors) - set(tensors), key=natural_key)[:1]:
        report.problems.append(f"{manifest_path}: does not list tensor {name!r} of the output")
    for name in sorted(set(tensors) - set(idx.tensors), key=natural_key):
        rec = tensors[name]
        if not (isinstance(rec, dict) and rec.get("op") == "dropped-tied"):
            report.problems.append(f"{manifest_path}: lists tensor {name[:200]!r}, which the output lacks")
            break
    for name in sorted(set(tensors) & set(idx.tensors), key=natural_key):
        rec, ref = tensors[name], idx.tensors[name]
        if not isinstance(rec, dict) or rec.get("dtype") != ref.dtype or rec.get("shape") != list(ref.shape):
            got = (f"{_short(rec.get('dtype'))}{_short(rec.get('shape'))}" if isinstance(rec, dict)
                   else _short(rec))
            report.problems.append(f"{manifest_path}: tensor {name!r} is {got} there, "
                                   f"{ref.dtype}{list(ref.shape)} in the output")
            break


def _manifest_rules(out: Output) -> list:
    """The per-tensor alpha rules the merge recorded in its manifest (none for older manifests; a manifest
    that cannot be read is a problem check_structure reports)."""
    manifest, _ = read_manifest(out)
    if manifest is None:
        return []
    return parse_rules(manifest.get("alpha_rules") or None, f"{out.join(MANIFEST)}: alpha_rules")


def _short(value) -> str:
    """A JSON value for a verdict line: short, and never an error (huge integers, deep nesting)."""
    return value[:80] if isinstance(value, str) else show_value(value).rsplit(" (", 1)[0]


def _source(text: str) -> str:
    """A folder that exists, as an absolute path; anything else (a Hub repo id) as given."""
    path = os.path.expanduser(str(text))
    return os.path.abspath(path) if os.path.exists(path) else str(text)


def verify(out: str, sft: str | None = None, aligned: str | None = None, alpha: float | None = None,
           sample: int | None = DEFAULT_SAMPLE, seed: int = 0, chunk_elems: int = CHUNK_ELEMS,
           verbose: bool = False, say: Callable[[str], None] | None = None,
           hub_attempts: int = HUB_ATTEMPTS) -> Report:
    """Check the output (a folder or an s3:// prefix); recompute tensors when sft and aligned are given
    (sample=None: all; Hub inputs: hub_attempts tries of each request, Settings.hub_attempts).

    Problems, warnings and a summary go to say() (default: stderr); per-file and per-tensor lines only
    when verbose. The caller prints report.verdict()."""
    if say is None:
        def say(msg: str) -> None:
            print(printable(f"expo-dist verify: {msg}"), file=sys.stderr)
    tell = say

    def detail(msg: str) -> None:
        if verbose:
            tell(msg)
    out = open_output(out)
    out.check()
    if bool(sft) != bool(aligned):
        raise ExpoError("give both --sft and --aligned to recompute the tensors, or neither")
    if sample is not None and sample < 0:
        raise ExpoError("--sample must be at least 0")
    report = Report(out.where)
    idx = check_structure(out, report, detail)
    if sft and aligned and idx is not None:
        if alpha is None:
            manifest, _ = read_manifest(out)
            alpha = manifest.get("alpha") if manifest is not None else None
            if alpha is None:
                raise ExpoError(f"give --alpha: {out.join(MANIFEST)} does not say which alpha")
            alpha = parse_alpha(alpha, f"{out.join(MANIFEST)}: alpha")
            say(f"alpha {alpha} (from {MANIFEST})")
        alpha = parse_alpha(alpha)
        check_values(idx, _source(sft), _source(aligned), alpha, report, say, rules=_manifest_rules(out),
                     sample=sample, seed=seed, chunk_elems=chunk_elems, detail=detail, hub_attempts=hub_attempts,
                     output=out)
    for p in report.problems:
        say(f"problem: {p}")
    return report
