"""Positional reads of one file: the one place input bytes are read by offset.

Reader is what the header parsers (safetensors.read_header, torchzip.read_bin_header) read through: LocalReader
for a file on this machine, sources.hub.HubReader for a file on the Hub (HTTP range requests). pread_into fills a
buffer from a descriptor; the workers' task runner, verify's recomputation and LocalReader all use it.
"""

from __future__ import annotations

import os
from typing import Protocol

from ..errors import ExpoError, MergeFailed


class Reader(Protocol):
    """Positional reads of one file, local or remote."""

    display: str  # how errors name the file
    size: int

    def read(self, offset: int, n: int) -> bytes: ...

    def close(self) -> None: ...


def pread_into(fd: int, view: memoryview, offset: int, path: str, error: type[ExpoError] = MergeFailed,
               need: int | None = None) -> int:
    """Fill view from the file at offset; a file that ends first is an error naming it. With need: the file
    may end after the first `need` bytes (a direct read of whole blocks past the end of the file). Returns
    how many bytes were read."""
    need = len(view) if need is None else need
    done = 0
    while done < len(view):
        n = os.preadv(fd, [view[done:]], offset + done)
        done += n
        if done >= need and (n == 0 or done < len(view)):
            return done  # the file ends here, after everything needed
        if n == 0:
            raise error(f"{path}: unexpected end of file at byte {offset + done} (file changed or truncated?)")
    return done


class LocalReader:
    """A file on this machine, open for positional reads (a context manager)."""

    def __init__(self, path: str, display: str | None = None):
        self.path, self.display = path, display or path
        try:
            self.fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            raise ExpoError(f"{self.display}: file not found") from None
        except OSError as e:
            raise ExpoError(f"{self.display}: cannot open ({e.strerror})") from None
        self.size = os.fstat(self.fd).st_size

    def read(self, offset: int, n: int) -> bytes:
        """Up to n bytes at offset: fewer at the end of the file, none outside it."""
        if offset < 0 or offset >= self.size:  # a crafted zip can point anywhere, even below 0 or past 2^63
            return b""
        buf = bytearray(min(n, self.size - offset))
        got = pread_into(self.fd, memoryview(buf), offset, self.display, ExpoError, need=0)
        return bytes(buf[:got])

    def read_into(self, view: memoryview, offset: int) -> None:
        """Exactly len(view) bytes at offset; a file that ends first is an ExpoError naming it."""
        pread_into(self.fd, view, offset, self.display, ExpoError)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
