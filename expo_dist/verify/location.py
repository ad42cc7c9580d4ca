"""Where the output is that `expo-dist verify` reads: a local folder (LocalOutput) or an s3://bucket/prefix
(S3Output, through sources.s3), behind one small interface: how a file is named, whether the merge left its work
folder, a small file whole (JSON, side files), and a weight file's size and checksums, streamed in bounded chunks
(positional reads of a local file; ranged GETs of an object).
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import zlib
from dataclasses import dataclass

from ..errors import ExpoError
from ..formats.folder import WORK
from ..formats.reader import LocalReader, pread_into
from ..sources import s3

HASH_CHUNK = 16 << 20  # bytes per read while checksumming a local file
S3_CHUNK = 64 << 20  # bytes per ranged GET while checksumming an object
MAX_JSON = 256 << 20  # an index or manifest: kilobytes to a few megabytes

# What reading a damaged output's metadata can raise besides ExpoError (wrong JSON types where the readers expect
# others, nesting too deep for the JSON parser, numbers too long to read, bytes that are not UTF-8): each is a
# FAILED verdict naming the file, never a traceback.
DAMAGE = (ValueError, TypeError, KeyError, IndexError, AttributeError, RecursionError, OverflowError, struct.error)


def damage(e: BaseException) -> str:
    text = str(e).splitlines()[0][:120] if str(e) else ""
    return f"{e.__class__.__name__}: {text}" if text else e.__class__.__name__


@dataclass
class Digest:
    size: int
    crc32: int  # zlib.crc32 of the whole file
    sha256: str | None  # hex, when asked for
    stored_crc32: str | None = None  # S3's own ChecksumCRC32 of the object (None: a local file, or none kept)


class LocalOutput:
    """A merge's output folder on this machine."""

    def __init__(self, text: str):
        self.where = os.path.abspath(os.path.expanduser(text))

    def check(self) -> None:
        if not os.path.isdir(self.where):
            raise ExpoError(f"{self.where}: not a folder (give the merge's --out folder)")

    def join(self, name: str) -> str:
        return os.path.join(self.where, name)

    def unfinished(self) -> str | None:
        return f"{self.join(WORK)} exists" if os.path.isdir(self.join(WORK)) else None

    def read(self, name: str, limit: int) -> bytes:
        """At most limit + 1 bytes of a small file; FileNotFoundError, OSError."""
        with open(self.join(name), "rb") as f:
            return f.read(limit + 1)

    def digest(self, name: str, sha: bool) -> Digest:
        path = self.join(name)
        h, crc, n = hashlib.sha256() if sha else None, 0, 0
        view = memoryview(bytearray(HASH_CHUNK))
        with LocalReader(path) as r:
            while k := pread_into(r.fd, view, n, path, ExpoError, need=0):
                crc = zlib.crc32(view[:k], crc)
                if h is not None:
                    h.update(view[:k])
                n += k
        return Digest(n, crc, h.hexdigest() if h is not None else None)


class S3Output:
    """A merge's output under an s3:// prefix: objects listed, read whole or by ranged GETs."""

    def __init__(self, text: str):
        s3.split(text)  # a valid bucket and key, or one line
        self.where = s3.prefix(text)

    def check(self) -> None:
        s3.check_bucket(self.where, "verifying")
        if not s3.list_top(self.where) and self.unfinished() is None:
            raise ExpoError(f"{self.where}: no objects under this prefix (give the merge's --out prefix)")

    def join(self, name: str) -> str:
        return s3.join(self.where, name)

    def unfinished(self) -> str | None:
        bucket, key = s3.split(self.join(WORK))
        try:
            found = s3.client().list_objects_v2(Bucket=bucket, Prefix=key + "/", MaxKeys=1).get("KeyCount", 0)
        except s3.s3_exceptions() as e:
            raise s3.s3_error(e, self.join(WORK), "listing") from None
        return f"{self.join(WORK)}/ holds objects" if found else None

    def read(self, name: str, limit: int) -> bytes:
        url = self.join(name)
        bucket, key = s3.split(url)
        try:
            body = s3.client().get_object(Bucket=bucket, Key=key)["Body"]
            try:
                return body.read(limit + 1)
            finally:
                body.close()
        except s3.s3_exceptions() as e:
            if s3.error_code(e) in ("NoSuchKey", "404", "NotFound"):
                raise FileNotFoundError(url) from None
            raise s3.s3_error(e, url, "reading") from None

    def digest(self, name: str, sha: bool) -> Digest:
        """Size, CRC-32 (and sha256) of the object streamed by ranged GETs of S3_CHUNK bytes, and the checksum S3
        stored for it (HeadObject with ChecksumMode=ENABLED)."""
        url = self.join(name)
        bucket, key = s3.split(url)
        try:
            head = s3.client().head_object(Bucket=bucket, Key=key, ChecksumMode="ENABLED")
        except s3.s3_exceptions() as e:
            raise s3.s3_error(e, url, "reading") from None
        size = int(head["ContentLength"])
        h, crc = hashlib.sha256() if sha else None, 0
        view = memoryview(bytearray(min(S3_CHUNK, size)))
        for off in range(0, size, S3_CHUNK):
            part = view[:min(S3_CHUNK, size - off)]
            s3.read_into(url, part, off)
            crc = zlib.crc32(part, crc)
            if h is not None:
                h.update(part)
        return Digest(size, crc, h.hexdigest() if h is not None else None, head.get("ChecksumCRC32"))


Output = LocalOutput | S3Output


def open_output(text: str) -> Output:
    return S3Output(text) if s3.is_s3(text) else LocalOutput(text)


def read_json(out: Output, name: str) -> tuple[object, str | None]:
    """(document, None), or (None, why it cannot be read) for a missing, unreadable or damaged JSON file."""
    try:
        raw = out.read(name, MAX_JSON)
        if len(raw) > MAX_JSON:
            return None, f"larger than {MAX_JSON} bytes, far more than any the merge writes"
        return json.loads(raw.decode("utf-8")), None
    except FileNotFoundError:
        return None, "missing"
    except OSError as e:
        return None, f"unreadable ({e.strerror or e.__class__.__name__})"
    except ExpoError as e:
        return None, f"unreadable ({e})"
    except DAMAGE as e:
        return None, f"not valid JSON ({damage(e)})"
