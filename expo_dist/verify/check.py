"""`expo-dist verify`: check a merged output folder; with the input models, recompute its tensors.

Without inputs: the weight index (every tensor mapped to the file that holds it, total_size), every file's
safetensors header and size (formats.safetensors.read_header), and the sha256 and size of every weight file against
expo_manifest.json. With --sft/--aligned (α from --alpha or the manifest) the tensors are recomputed from the
inputs (recompute.py): copies are always checked; extrapolated tensors are sampled (--sample N, seeded) or all
checked (--full).
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import sys
from collections.abc import Callable

from ..errors import ExpoError
from ..formats.folder import INDEX, MANIFEST, WORK
from ..formats.reader import LocalReader, pread_into
from ..planning.plan import natural_key
from ..planning.rules import parse_alpha, parse_rules, show_value
from ..settings import HUB_ATTEMPTS
from ..sources.index import ModelIndex, index_model
from .recompute import CHUNK_ELEMS, DEFAULT_SAMPLE, check_values
from .verdict import Report, printable

HASH_CHUNK = 16 << 20
MAX_JSON = 256 << 20  # an index or manifest: kilobytes to a few megabytes


def _sha256(path: str) -> tuple[str, int]:
    h, n = hashlib.sha256(), 0
    view = memoryview(bytearray(HASH_CHUNK))
    with LocalReader(path) as r:
        while k := pread_into(r.fd, view, n, path, ExpoError, need=0):
            h.update(view[:k])
            n += k
    return h.hexdigest(), n


# What reading a damaged output's metadata can raise besides ExpoError (wrong JSON types where the readers expect
# others, nesting too deep for the JSON parser, numbers too long to read, bytes that are not UTF-8): each is a
# FAILED verdict naming the file, never a traceback.
DAMAGE = (ValueError, TypeError, KeyError, IndexError, AttributeError, RecursionError, OverflowError, struct.error)


def _damage(e: BaseException) -> str:
    text = str(e).splitlines()[0][:120] if str(e) else ""
    return f"{e.__class__.__name__}: {text}" if text else e.__class__.__name__


def read_json(path: str) -> tuple[object, str | None]:
    """(document, None), or (None, why it cannot be read) for a missing, unreadable or damaged JSON file."""
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_JSON + 1)
        if len(raw) > MAX_JSON:
            return None, f"larger than {MAX_JSON} bytes, far more than any the merge writes"
        return json.loads(raw.decode("utf-8")), None
    except FileNotFoundError:
        return None, "missing"
    except OSError as e:
        return None, f"unreadable ({e.strerror or e.__class__.__name__})"
    except DAMAGE as e:
        return None, f"not valid JSON ({_damage(e)})"


def read_manifest(out: str) -> tuple[dict | None, str | None]:
    """The output's manifest as a JSON object, or (None, why not)."""
    doc, why = read_json(os.path.join(out, MANIFEST))
    if why is None and not isinstance(doc, dict):
        doc, why = None, "not a JSON object"
    return doc, why


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
    except DAMAGE as e:  # a reader met a damaged file it did not expect: the output is not sound
        report.problems.append(f"{out}: index or headers damaged ({_damage(e)})")
        return None
    report.files, report.tensors, report.total_size = len(idx.files), len(idx.tensors), idx.total_bytes
    index_path = os.path.join(out, INDEX)
    if os.path.exists(index_path):
        doc, why = read_json(index_path)
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
    manifest_path = os.path.join(out, MANIFEST)
    manifest, why = read_manifest(out)
    if why == "missing":
        report.problems.append(f"{manifest_path}: missing; cannot check the weight files' sha256")
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
        report.problems.append(f"{os.path.join(out, name)}: not listed in {MANIFEST}")
    for name in sorted(names & set(recorded), key=natural_key):
        rec = recorded[name]
        path = os.path.join(out, name)
        if not isinstance(rec, dict):
            report.problems.append(f"{manifest_path}: the entry of {name} is not a JSON object")
            continue
        digest, size = _sha256(path)
        if rec.get("size") is not None and (type(rec.get("size")) is not int or rec.get("size") != size):
            report.problems.append(f"{path}: {size} bytes, the manifest says {_short(rec.get('size'))}")
        if rec.get("sha256") != digest:
            report.problems.append(f"{path}: sha256 {digest[:16]}... differs from the manifest's "
                                   f"{_short(rec.get('sha256'))[:16]}... (file changed or corrupt)")
        else:
            report.hashed += 1
        say(f"{name}: {size} bytes, sha256 {digest[:16]}... ok" if rec.get("sha256") == digest else
            f"{name}: {size} bytes, sha256 {digest[:16]}... MISMATCH")
    return idx


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


def _manifest_rules(out: str) -> list:
    """The per-tensor alpha rules the merge recorded in its manifest (none for older manifests; a manifest
    that cannot be read is a problem check_structure reports)."""
    manifest, _ = read_manifest(out)
    if manifest is None:
        return []
    return parse_rules(manifest.get("alpha_rules") or None, f"{os.path.join(out, MANIFEST)}: alpha_rules")


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
    """Check the output folder; recompute tensors when sft and aligned are given (sample=None: all; Hub inputs:
    hub_attempts tries of each request, Settings.hub_attempts).

    Problems, warnings and a summary go to say() (default: stderr); per-file and per-tensor lines only
    when verbose. The caller prints report.verdict()."""
    if say is None:
        def say(msg: str) -> None:
            print(printable(f"expo-dist verify: {msg}"), file=sys.stderr)
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
            manifest, _ = read_manifest(out)
            alpha = manifest.get("alpha") if manifest is not None else None
            if alpha is None:
                raise ExpoError(f"give --alpha: {os.path.join(out, MANIFEST)} does not say which alpha")
            alpha = parse_alpha(alpha, f"{os.path.join(out, MANIFEST)}: alpha")
            say(f"alpha {alpha} (from {MANIFEST})")
        alpha = parse_alpha(alpha)
        check_values(idx, _source(sft), _source(aligned), alpha, report, say, rules=_manifest_rules(out),
                     sample=sample, seed=seed, chunk_elems=chunk_elems, detail=detail, hub_attempts=hub_attempts)
    for p in report.problems:
        say(f"problem: {p}")
    return report
