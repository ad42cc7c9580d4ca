"""The io_floor phase: read both inputs and write the output's size, as fast as this machine's disk allows."""

from __future__ import annotations

import mmap
import os
import threading
import time

from expo_dist.runtime.fileio import open_direct
from expo_dist.testing.measure import evict

IO_BLOCK = 16 << 20


def _open(path: str, flags: int, direct: bool) -> tuple[int, bool]:
    """A descriptor, with O_DIRECT when asked and the file system allows it (as the workers open theirs)."""
    fd = open_direct(path, flags) if direct else None
    return (fd, True) if fd is not None else (os.open(path, flags, 0o644), False)


def _read_all(files: list[str], out: list, k: int, direct: bool = False) -> None:
    buf = mmap.mmap(-1, IO_BLOCK)  # page-aligned, as O_DIRECT needs
    view = memoryview(buf)
    total = 0
    for f in files:
        fd, _ = _open(f, os.O_RDONLY, direct)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
            off = 0
            while True:
                n = os.preadv(fd, [view], off)
                off += n
                if n < IO_BLOCK:  # the end of the file (a direct read returns the last partial block short)
                    break
            total += off
        finally:
            os.close(fd)
    out[k] = total


def _write_fsync(path: str, size: int, out: list, k: int, direct: bool = False) -> None:
    block = mmap.mmap(-1, IO_BLOCK)
    block.write(os.urandom(IO_BLOCK))  # not zeros: a compressing filesystem would cheat
    view = memoryview(block)
    fd, direct = _open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, direct)
    try:
        left = size
        while left:
            n = min(left, IO_BLOCK)
            if direct and n % 4096:  # the last partial block through the page cache, as the merge does
                os.close(fd)
                fd, _ = _open(path, os.O_WRONLY, False)
            left -= os.pwrite(fd, view[:n], size - left)
        os.fsync(fd)
    finally:
        os.close(fd)
    out[k] = size


def run(sft_files: list[str], aligned_files: list[str], out_size: int, path: str,
        overlap: bool, direct: bool = False) -> dict:
    """Read both inputs (one thread each, at once) + write out_size bytes and fsync; seconds of each part.
    direct: with O_DIRECT (the disk's own speed, without the page cache), where the file system allows it."""
    got = [0, 0, 0]
    readers = [threading.Thread(target=_read_all, args=(fs, got, k, direct))
               for k, fs in enumerate((sft_files, aligned_files))]
    writer = threading.Thread(target=_write_fsync, args=(path, out_size, got, 2, direct))
    t0 = time.perf_counter()
    for t in readers:
        t.start()
    if overlap:
        writer.start()
    for t in readers:
        t.join()
    t_read = time.perf_counter() - t0
    if not overlap:
        writer.start()
    writer.join()
    total = time.perf_counter() - t0
    evict(path)
    os.unlink(path)
    return {"seconds": total, "read_seconds": t_read, "write_seconds": total - t_read if not overlap else None,
            "bytes_read": got[0] + got[1], "bytes_written": got[2]}
