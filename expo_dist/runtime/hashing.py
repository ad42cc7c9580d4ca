"""sha256 of an output file, computed in a background thread that follows the file's write frontier.

The driver tells the hasher how far the file is finished (a contiguous prefix) as tasks complete; the
thread hashes those bytes while the merge goes on (from the page cache when the file was written through
it, with direct reads of whole blocks when it was written directly), so sealing a file at the end costs
only the last stretch instead of a second full read.
"""

from __future__ import annotations

import hashlib
import mmap
import os
import threading

from ..planning.windows import align_down, align_up
from .fileio import direct_ok, open_direct

CHUNK = 16 << 20


class FileHasher:
    def __init__(self, path: str, io: str | None = None):
        self.path, self.io = path, io
        self.sha = hashlib.sha256()
        self.pos = 0
        self.target = 0
        self.size: int | None = None  # set by finish()
        self.error: BaseException | None = None
        self.direct = False
        self.cond = threading.Condition()
        self.thread = threading.Thread(target=self._loop, name=f"sha256 {os.path.basename(path)}", daemon=True)
        self.thread.start()

    def advance(self, upto: int) -> None:
        with self.cond:
            if upto > self.target:
                self.target = upto
                self.cond.notify_all()

    def finish(self, size: int) -> str:
        """Hash up to size (the whole file) and return the hex digest."""
        with self.cond:
            self.size = size
            self.target = max(self.target, size)
            self.cond.notify_all()
        self.thread.join()
        if self.error:
            raise self.error
        return self.sha.hexdigest()

    def _span(self) -> int | None:
        """Where the next read may go up to (None: done). Direct reads stop at a block boundary until the end."""
        final = self.size is not None
        if final and self.pos >= self.size:
            return None
        end = self.size if final else self.target
        return end if final or not self.direct else align_down(end)

    def _loop(self) -> None:
        try:
            fd = open_direct(self.path, os.O_RDONLY) if direct_ok(self.path, self.io) else None
            self.direct = fd is not None
            if fd is None:
                fd = os.open(self.path, os.O_RDONLY)
            try:
                buf = mmap.mmap(-1, CHUNK)  # page-aligned, as direct reads need
                view = memoryview(buf)
                while True:
                    with self.cond:
                        while (limit := self._span()) is not None and limit <= self.pos:
                            self.cond.wait()
                    if limit is None:
                        return
                    while self.pos < limit:
                        want = min(CHUNK, limit - self.pos)
                        n = os.preadv(fd, [view[: align_up(want) if self.direct else want]], self.pos)
                        got = min(n, want)
                        if got <= 0:
                            raise OSError(f"{self.path}: ended at byte {self.pos} while hashing")
                        self.sha.update(view[:got])
                        self.pos += got
                view.release()
                buf.close()
            finally:
                os.close(fd)
        except BaseException as e:  # reported by finish()
            self.error = e
