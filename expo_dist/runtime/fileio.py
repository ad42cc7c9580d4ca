"""Positional writes of whole byte ranges with the errors a user can act on, direct I/O, the page cache, and
atomic writes of small files (the one place for them). Positional reads: formats.reader.pread_into.

Direct I/O (O_DIRECT) moves data between the disk and our buffers without the page cache. It needs the file
offset, the length and the buffer address to be multiples of the block size (ALIGN covers every common
device). The io setting (Settings.io: --io, else EXPO_IO) chooses: "auto" (the default) uses it on local
block-device file systems (ext4, xfs, btrfs) and the page cache elsewhere (network and parallel file systems,
tmpfs); "direct" tries it everywhere (falling back per file where it is refused); "buffered" never uses it.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import os

from ..errors import MergeFailed
from ..planning.windows import ALIGN  # the block size: windows are cut to it
from ..settings import check

DIRECT_FS = {"ext2", "ext3", "ext4", "xfs", "btrfs"}


def aligned_empty(n: int, pin: bool = False):
    """A numpy uint8 array of n bytes whose first byte is ALIGN-aligned in memory. pin: in page-locked memory
    from torch's CUDA host allocator (for asynchronous copies to a GPU); the array keeps that tensor alive."""
    import numpy as np

    if pin:
        import torch

        raw = torch.empty(n + ALIGN, dtype=torch.uint8, pin_memory=True).numpy()
    else:
        raw = np.empty(n + ALIGN, dtype=np.uint8)
    skip = -raw.ctypes.data % ALIGN
    return raw[skip: skip + n]


def io_mode(mode: str | None = None) -> str:
    """The I/O mode given (Settings.io), checked; None: auto."""
    return check("io", mode or "auto", "--io")


@functools.lru_cache(maxsize=256)
def fs_type(folder: str) -> str:
    """The type of the file system holding folder, from /proc/self/mounts (longest mount point that holds it)."""
    best, kind = "", ""
    try:
        with open("/proc/self/mounts", encoding="utf-8") as f:
            for line in f:
                parts = line.split()
                if len(parts) < 3:
                    continue
                mnt = parts[1].replace("\\040", " ")
                if (folder == mnt or folder.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best):
                    best, kind = mnt, parts[2]
    except OSError:
        return ""
    return kind


def direct_ok(path: str, mode: str | None = None) -> bool:
    """Whether to try O_DIRECT for this file (see the module's docstring)."""
    mode = io_mode(mode)
    if mode != "auto" or not hasattr(os, "O_DIRECT"):
        return mode == "direct" and hasattr(os, "O_DIRECT")
    return fs_type(os.path.dirname(os.path.realpath(path))) in DIRECT_FS


_LIBC = None


def _libc():
    global _LIBC
    if _LIBC is None:
        import ctypes
        import ctypes.util

        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.mmap.restype = ctypes.c_void_p
        libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                              ctypes.c_long]
        libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
        _LIBC = libc
    return _LIBC


def resident_prefix(fd: int, offset: int, n: int) -> int:
    """How many bytes from offset on are in the page cache already (whole pages, counted from the page that
    holds offset; the answer can run past offset + n). Asks mincore(2) on a mapping that is never touched, so
    it reads nothing from the disk. 0 where that cannot be asked."""
    import ctypes
    import mmap

    page = mmap.PAGESIZE
    start = offset // page * page
    length = offset + n - start
    if n <= 0:
        return 0
    try:
        libc = _libc()
        addr = libc.mmap(None, length, mmap.PROT_READ, mmap.MAP_SHARED, fd, start)
        if addr in (None, ctypes.c_void_p(-1).value):
            return 0
        try:
            pages = -(-length // page)
            vec = (ctypes.c_ubyte * pages)()
            if libc.mincore(addr, length, vec) != 0:
                return 0
            k = next((i for i, v in enumerate(bytes(vec)) if not v & 1), pages)
        finally:
            libc.munmap(addr, length)
    except (OSError, AttributeError):
        return 0
    return max(0, start + k * page - offset)


def open_direct(path: str, flags: int) -> int | None:
    """An O_DIRECT descriptor, or None where the file system refuses O_DIRECT (EINVAL)."""
    try:
        return os.open(path, flags | os.O_DIRECT)
    except OSError as e:
        if e.errno == errno.EINVAL:
            return None
        raise


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


@contextlib.contextmanager
def atomic_file(path: str):
    """A file to write that appears at path whole or not at all: written under path + ".tmp", fsynced, then renamed
    over path (a symlink at either name is replaced, never followed)."""
    tmp = path + ".tmp"
    with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644), "wb") as f:
        yield f
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write(path: str, data: bytes) -> None:
    """Write a small file whole or not at all (see atomic_file)."""
    with atomic_file(path) as f:
        f.write(data)


def fsync_dir(path: str) -> None:
    """Make the names in a folder durable (after renames into it)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
