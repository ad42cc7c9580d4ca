"""Positional reads and writes of whole byte ranges, with the errors a user can act on."""

from __future__ import annotations

import errno
import os

from .errors import ExpoError, MergeFailed


def pread_into(fd: int, view: memoryview, offset: int, path: str, error: type[ExpoError] = MergeFailed) -> None:
    """Fill view from the file at offset; a file that ends first is an error naming it."""
    done = 0
    while done < len(view):
        n = os.preadv(fd, [view[done:]], offset + done)
        if n == 0:
            raise error(f"{path}: unexpected end of file at byte {offset + done} (file changed or truncated?)")
        done += n


def pwrite_all(fd: int, view: memoryview, offset: int, path: str) -> None:
    """Write all of view at offset; a full or read-only disk is one line naming the file."""
    done = 0
    try:
        while done < len(view):
            done += os.pwrite(fd, view[done:], offset + done)
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise MergeFailed(f"{path}: no space left on the output disk; free space (need the full output size) "
                              "and rerun the same command to resume") from None
        if e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
            raise MergeFailed(f"{path}: output is not writable ({e.strerror})") from None
        raise
