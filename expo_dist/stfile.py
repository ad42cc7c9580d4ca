"""The safetensors file format: reading and validating headers, laying out new files.

All byte arithmetic about where a tensor lives in a safetensors file is here and nowhere else.
A file is: 8-byte little-endian header length N, N bytes of JSON, then the data section
(tensors in C order, little endian, contiguous with no holes or overlaps).
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass

from .dtypes import DTYPES, itemsize
from .errors import ExpoError

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


def read_header(path: str) -> FileHeader:
    """Read and validate a safetensors header without touching the tensor data."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        raise ExpoError(f"{path}: file not found")
    except OSError as e:
        raise ExpoError(f"{path}: cannot open ({e.strerror})")
    try:
        size = os.fstat(fd).st_size
        head = os.pread(fd, 8, 0)
        if len(head) < 8:
            raise ExpoError(f"{path}: not a safetensors file (shorter than 8 bytes); re-download or regenerate it")
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER or 8 + n > size:
            raise ExpoError(f"{path}: header length {n} goes beyond the file's {size} bytes (truncated or not safetensors)")
        raw = os.pread(fd, n, 8)
    finally:
        os.close(fd)
    return parse_header(path, raw, size)


def parse_header(path: str, raw: bytes, size: int) -> FileHeader:
    data_start = 8 + len(raw)
    try:
        doc = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ExpoError(f"{path}: header is not valid JSON ({e.__class__.__name__}); the file is corrupt")
    if not isinstance(doc, dict):
        raise ExpoError(f"{path}: header is not a JSON object; the file is corrupt")
    metadata = doc.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise ExpoError(f"{path}: __metadata__ must map strings to strings")
    entries = []
    for name, info in doc.items():
        try:
            dtype, shape, (lo, hi) = info["dtype"], info["shape"], info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise ExpoError(f"{path}: tensor {name!r} lacks dtype/shape/data_offsets")
        if dtype not in DTYPES:
            raise ExpoError(f"{path}: tensor {name!r} has unknown dtype {dtype!r}")
        if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
            raise ExpoError(f"{path}: tensor {name!r} has an invalid shape {shape!r}")
        if not (isinstance(lo, int) and isinstance(hi, int) and 0 <= lo <= hi):
            raise ExpoError(f"{path}: tensor {name!r} has invalid data_offsets {[lo, hi]!r}")
        want = math.prod(shape) * itemsize(dtype)
        if hi - lo != want:
            raise ExpoError(
                f"{path}: tensor {name!r} shape {shape} x {dtype} needs {want} bytes but data_offsets span {hi - lo}"
            )
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


# safetensors sorts by its Dtype enum, descending, then by name; item sizes never grow along this order
_ST_ORDER = ("U64", "I64", "F64", "F32", "U32", "I32", "BF16", "F16", "U16", "I16", "F8_E4M3", "F8_E5M2",
             "I8", "U8", "BOOL")


def alignment_order(items: list[tuple[str, str, tuple[int, ...]]]) -> list[tuple[str, str, tuple[int, ...]]]:
    """The order safetensors itself writes: larger dtype first (keeps every tensor aligned), then name."""
    return sorted(items, key=lambda t: (_ST_ORDER.index(t[1]), t[0]))


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
