"""PyTorch `.bin` checkpoints (torch.save's zip format), indexed from their headers without running pickle code.

torch.save (torch >= 1.6) writes a zip archive whose members are all stored uncompressed (ZIP_STORED):

    <prefix>/data.pkl      the pickled object. For a state dict: an OrderedDict name -> tensor, each tensor a call
                           torch._utils._rebuild_tensor_v2(storage, storage_offset, size, stride, ...) (or _v3 with a
                           dtype argument) whose storage is a persistent id ('storage', storage type, key, location,
                           numel)
    <prefix>/data/<key>    the raw bytes of storage <key>, little endian, C order
    <prefix>/byteorder     "little" (absent before torch 2.1: little endian then too in practice)

We read the zip central directory, unpickle data.pkl with an unpickler (unpickle.py) that knows only the handful of
globals a
state dict uses and builds *descriptions* instead of tensors (every other global is refused, so nothing in the
file ever runs), and read each storage's local file header to learn where its bytes start. A tensor that is one
contiguous run of its storage is then an absolute byte range of the .bin file, the same thing a safetensors header
gives, and the workers read it with the same positional reads. Nothing here imports torch.
"""

from __future__ import annotations

import errno
import io
import lzma
import struct
import zipfile
import zlib

from ..errors import ExpoError
from .dtypes import itemsize
from .jsonsafe import one_line, shown
from .reader import LocalReader, Reader
from .safetensors import FileHeader, TensorEntry, nbytes_of
from .unpickle import SafeUnpickler, unpickle_state_dict

MAX_PICKLE = 256 << 20  # data.pkl of a state dict is ~200 bytes per tensor; refuse anything absurd
LEGACY_MAGIC = 0x1950A86A20F9469CFC6C  # torch.save before 1.6 (_use_new_zipfile_serialization=False)
# what zipfile raises on a damaged archive or member (bad records, bad extra fields, names that are not UTF-8,
# unsupported or corrupt compression, CRC mismatch, sizes beyond the file)
ZIP_ERRORS = (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, ValueError, EOFError, struct.error,
              NotImplementedError, zlib.error, lzma.LZMAError, OverflowError, IndexError)


class _FileLike(io.RawIOBase):
    """A read-only, seekable file object over a Reader, for zipfile's central directory parsing."""

    def __init__(self, reader: Reader):
        self.r, self.pos = reader, 0

    def readable(self):
        return True

    def seekable(self):
        return True

    def tell(self):
        return self.pos

    def seek(self, offset, whence=0):
        base = {0: 0, 1: self.pos, 2: self.r.size}[whence]
        if base + offset < 0:  # as a real file: zipfile reads this as "no such record here"
            raise OSError(errno.EINVAL, "negative seek position")
        self.pos = base + offset
        return self.pos

    def read(self, n=-1):
        if n is None or n < 0:
            n = self.r.size - self.pos
        n = max(0, min(n, self.r.size - self.pos))
        data = self.r.read(self.pos, n) if n else b""
        self.pos += len(data)
        return data

    def readinto(self, b):
        data = self.read(len(b))
        b[: len(data)] = data
        return len(data)


# ---- the zip container --------------------------------------------------------------------------------------


def _refuse_legacy(reader: Reader) -> None:
    head = reader.read(0, 64)
    if head[:4] == b"PK\x03\x04":
        return
    if head[:2] == b"\x80\x02":
        try:
            magic = SafeUnpickler(io.BytesIO(head)).load()
        except Exception:
            magic = None
        if magic == LEGACY_MAGIC:
            raise ExpoError(
                f"{reader.display}: a legacy (torch < 1.6, non-zip) checkpoint; expo_dist reads only the zip format. "
                "Re-save it with a current torch (torch.save(torch.load(path, weights_only=True), path)) or convert "
                "it to safetensors")
    raise ExpoError(f"{reader.display}: not a torch.save zip archive (no zip signature); re-download it, or give "
                    "safetensors weights")


def _read_member(zf: zipfile.ZipFile, zi: zipfile.ZipInfo, limit: int, display: str) -> bytes:
    """At most `limit` bytes of a small member (data.pkl, byteorder), through zipfile: a damaged member is one line."""
    if zi.flag_bits & 0x1:
        raise ExpoError(f"{display}: zip member {one_line(zi.filename, 80)} is encrypted; not a torch.save checkpoint")
    try:
        with zf.open(zi) as f:
            return f.read(limit)
    except ZIP_ERRORS as e:
        raise ExpoError(f"{display}: cannot read zip member {one_line(zi.filename, 80)} ({e.__class__.__name__}: "
                        f"{one_line(str(e), 100)}); the file is corrupt") from None


def _local_data_start(reader: Reader, zi: zipfile.ZipInfo) -> int:
    """Absolute offset of a member's bytes: its local header's fixed part, name and extra field come first."""
    what = one_line(zi.filename, 80)
    head = reader.read(zi.header_offset, 30)
    if len(head) < 30 or head[:4] != b"PK\x03\x04":
        raise ExpoError(f"{reader.display}: zip member {what} has no local header at byte {zi.header_offset}; "
                        "the file is corrupt or truncated")
    flags, method = struct.unpack("<HH", head[6:10])
    n, m = struct.unpack("<HH", head[26:30])
    name = reader.read(zi.header_offset + 30, n)
    if name.decode("utf-8" if flags & 0x800 else "cp437", "replace") != zi.filename:
        raise ExpoError(f"{reader.display}: zip member {what}: local header names {shown(name, 80)}; the file is "
                        "corrupt")
    if method != zipfile.ZIP_STORED:
        raise ExpoError(f"{reader.display}: zip member {what} is compressed; expo_dist reads tensors in place "
                        "and needs them stored (as torch.save writes them)")
    return zi.header_offset + 30 + n + m


def read_bin_header(reader: Reader) -> FileHeader:
    """Index one torch.save zip checkpoint: every tensor's dtype, shape and absolute byte range in the file."""
    display = reader.display
    _refuse_legacy(reader)
    try:
        zf = zipfile.ZipFile(_FileLike(reader))
        infos = {zi.filename: zi for zi in zf.infolist()}
    except ZIP_ERRORS as e:
        raise ExpoError(f"{display}: not a readable zip archive ({e.__class__.__name__}: {one_line(str(e), 100)}); "
                        "the file is truncated or corrupt") from None
    pkls = [n for n in infos if n.endswith("data.pkl") and n.count("/") <= 1]
    if len(pkls) != 1:
        raise ExpoError(f"{display}: a zip archive without exactly one data.pkl; not a torch.save checkpoint")
    prefix = pkls[0][: -len("data.pkl")]
    pkl = infos[pkls[0]]
    if pkl.file_size > MAX_PICKLE:
        raise ExpoError(f"{display}: data.pkl is {pkl.file_size} bytes; too large for a state dict")
    data = _read_member(zf, pkl, MAX_PICKLE + 1, display)
    order = infos.get(prefix + "byteorder")
    if order is not None:
        bo = _read_member(zf, order, 16, display).strip()
        if bo != b"little":
            raise ExpoError(f"{display}: saved with byte order {bo.decode(errors='replace')!r}; only little endian "
                            "checkpoints can be read in place")
    descs = unpickle_state_dict(data, display)

    starts: dict[str, tuple[int, int]] = {}  # storage key -> (absolute data start, bytes)
    members = {}
    for key in {d.storage.key for d in descs.values()}:
        zi = infos.get(prefix + "data/" + key)
        if zi is None:
            raise ExpoError(f"{display}: data.pkl refers to storage {key!r}, which the archive lacks; file is corrupt")
        members[key] = zi
    keys = sorted(members, key=lambda k: members[k].header_offset)
    prefetch = getattr(reader, "prefetch", None)
    if prefetch is not None:  # remote files: fetch the local headers in parallel
        prefetch([members[k].header_offset for k in keys])
    for key in keys:
        zi = members[key]
        what = one_line(zi.filename, 80)
        if zi.flag_bits & 0x1:
            raise ExpoError(f"{display}: encrypted zip members are not supported")
        if zi.compress_type != zipfile.ZIP_STORED:
            raise ExpoError(f"{display}: storage {what} is compressed; expo_dist reads tensors in place and "
                            "needs them stored (as torch.save writes them)")
        begin = _local_data_start(reader, zi)
        if begin + zi.file_size > reader.size:
            raise ExpoError(f"{display}: storage {what} runs past the end of the file; file is truncated")
        starts[key] = (begin, zi.file_size)

    tensors = {}
    for name, d in descs.items():
        begin, nbytes = starts[d.storage.key]
        if d.storage.nbytes > nbytes:
            raise ExpoError(f"{display}: storage of {name!r} should hold {d.storage.nbytes} bytes, the archive has "
                            f"{nbytes}; file is corrupt")
        want, stride = 1, []
        for n in reversed(d.shape):
            stride.append(want)
            want *= n
        stride.reverse()
        if want > 1 and any(s != c for s, c, n in zip(d.stride, stride, d.shape) if n != 1):
            raise ExpoError(
                f"{display}: tensor {name!r} (shape {shown(list(d.shape), 80)}) is stored non-contiguously "
                f"(stride {shown(list(d.stride), 80)}), so it is not one byte range of the file; re-save the "
                "checkpoint with contiguous tensors (e.g. {k: v.contiguous() for k, v in sd.items()}) or convert it "
                "to safetensors")
        size, span = itemsize(d.dtype), nbytes_of(d.shape, d.dtype)
        lo = begin + d.offset * size
        if span is None or lo + span > begin + nbytes:
            raise ExpoError(f"{display}: tensor {name!r} runs past the end of its storage; file is corrupt")
        tensors[name] = TensorEntry(name, d.dtype, tuple(d.shape), lo, lo + span)
    return FileHeader(display, 0, reader.size, {"format": "pt", "container": "torch-zip"}, tensors)


def read_bin_file(path: str, display: str | None = None) -> FileHeader:
    with LocalReader(path, display) as r:
        return read_bin_header(r)
