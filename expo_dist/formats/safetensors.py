"""The safetensors file format: reading and validating headers, laying out new files.

All byte arithmetic about where a tensor lives in a safetensors file is here and nowhere else.
A file is: 8-byte little-endian header length N, N bytes of JSON, then the data section
(tensors in C order, little endian, contiguous with no holes or overlaps).
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass

from ..errors import ExpoError
from . import jsonsafe
from .dtypes import ST_ORDER, itemsize, known
from .reader import LocalReader, Reader

MAX_HEADER = 100 * 1024 * 1024  # safetensors' own limit


@dataclass(frozen=True)
class TensorEntry:
    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int  # absolute byte offset in the file
    end: int  # absolute, exclusive

    @property
    def nbytes(self) -> int:
        return self.end - self.begin

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class FileHeader:
    path: str
    data_start: int
    size: int
    metadata: dict
    tensors: dict[str, TensorEntry]


def read_header(source: str | Reader) -> FileHeader:
    """Read and validate a safetensors header without touching the tensor data: of a local file (a path), or
    through any Reader (a Hub file by range requests)."""
    if isinstance(source, str):
        with LocalReader(source) as r:
            return read_header(r)
    r = source
    head = r.read(0, 8)
    if len(head) < 8:
        raise ExpoError(f"{r.display}: not a safetensors file (shorter than 8 bytes); re-download or regenerate it")
    (n,) = struct.unpack("<Q", head)
    if n > MAX_HEADER or 8 + n > r.size:
        raise ExpoError(f"{r.display}: header length {n} goes beyond the file's {r.size} bytes (truncated or not "
                        "safetensors)")
    return parse_header(r.display, r.read(8, n), r.size)


MAX_INT = 1 << 63  # every size, offset and shape entry fits an int64, as in torch and safetensors
_CONTROL = {chr(c) for c in (*range(32), *range(127, 160))}


def bad_name(name: object) -> bool:
    """A tensor name no model has: not a string, or holding control characters (they would break one-line errors)."""
    return not isinstance(name, str) or any(c in _CONTROL for c in name)


def valid_dims(shape: object) -> bool:
    """A list or tuple of non-negative int64 sizes (booleans are not sizes, though Python counts them as ints)."""
    return isinstance(shape, (list, tuple)) and all(type(d) is int and 0 <= d < MAX_INT for d in shape)


def nbytes_of(shape, dtype: str) -> int | None:
    """Bytes of a tensor of this shape and dtype; None when that is beyond any file (a crafted shape)."""
    n = itemsize(dtype)
    for d in shape:
        n *= d
        if n >= MAX_INT:
            return None if 0 not in shape else 0
    return n


def parse_header(path: str, raw: bytes, size: int) -> FileHeader:
    data_start = 8 + len(raw)
    doc = jsonsafe.loads(raw, f"{path}: header is not valid JSON", "the file is corrupt")
    if not isinstance(doc, dict):
        raise ExpoError(f"{path}: header is not a JSON object; the file is corrupt")
    metadata = doc.pop("__metadata__", None)
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise ExpoError(f"{path}: __metadata__ must map strings to strings, not {jsonsafe.shown(metadata, 60)}")
    entries = []
    for name, info in doc.items():
        if bad_name(name):
            raise ExpoError(f"{path}: tensor name {name!r} holds control characters; the file is corrupt")
        if not isinstance(info, dict) or not all(k in info for k in ("dtype", "shape", "data_offsets")):
            raise ExpoError(f"{path}: tensor {name!r} lacks dtype/shape/data_offsets")
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if not known(dtype):
            raise ExpoError(f"{path}: tensor {name!r} has unknown dtype {jsonsafe.shown(dtype, 60)}")
        if not isinstance(shape, list) or not valid_dims(shape):
            raise ExpoError(f"{path}: tensor {name!r} has an invalid shape {jsonsafe.shown(shape, 60)} "
                            "(a list of non-negative integers)")
        if not (isinstance(offsets, list) and len(offsets) == 2 and valid_dims(offsets)
                and offsets[0] <= offsets[1]):
            raise ExpoError(f"{path}: tensor {name!r} has invalid data_offsets {jsonsafe.shown(offsets, 60)}")
        lo, hi = offsets
        want = nbytes_of(shape, dtype)
        if want != hi - lo:
            raise ExpoError(f"{path}: tensor {name!r} shape {jsonsafe.shown(shape, 60)} x {dtype} needs "
                            f"{'more than 2^63' if want is None else want} bytes but data_offsets span {hi - lo}")
        entries.append(TensorEntry(name, dtype, tuple(shape), data_start + lo, data_start + hi))
    entries.sort(key=lambda e: (e.begin, e.end))
    pos = data_start
    for e in entries:
        if e.begin < pos:
            raise ExpoError(f"{path}: tensor {e.name!r} overlaps the tensor before it")
        if e.begin > pos:
            raise ExpoError(f"{path}: hole of {e.begin - pos} bytes before tensor {e.name!r}")
        pos = e.end
    if pos != size:
        what = "is truncated" if pos > size else "has trailing bytes"
        raise ExpoError(
            f"{path}: file {what}: header says {pos} bytes, file has {size}; re-download or regenerate it"
        )
    return FileHeader(path, data_start, size, metadata, {e.name: e for e in entries})


@dataclass(frozen=True)
class Layout:
    """Where each tensor goes in a new safetensors file."""

    header: bytes  # the 8-byte length and the padded JSON
    tensors: dict[str, TensorEntry]
    size: int




def alignment_order(items: list[tuple[str, str, tuple[int, ...]]]) -> list[tuple[str, str, tuple[int, ...]]]:
    """The order safetensors itself writes: larger dtype first (keeps every tensor aligned), then name."""
    return sorted(items, key=lambda t: (ST_ORDER.index(t[1]), t[0]))


def layout(items: list[tuple[str, str, tuple[int, ...]]], metadata: dict[str, str] | None = None) -> Layout:
    """Lay out tensors (name, dtype, shape) in the given order; the header is padded to a multiple of 8."""
    doc: dict = {"__metadata__": dict(metadata or {"format": "pt"})}
    rel = []
    pos = 0
    for name, dtype, shape in items:
        n = math.prod(shape) * itemsize(dtype)
        doc[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [pos, pos + n]}
        rel.append((name, dtype, tuple(shape), pos, pos + n))
        pos += n
    raw = json.dumps(doc, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    header = struct.pack("<Q", len(raw)) + raw
    start = len(header)
    tensors = {r[0]: TensorEntry(r[0], r[1], r[2], start + r[3], start + r[4]) for r in rel}
    return Layout(header, tensors, start + pos)
