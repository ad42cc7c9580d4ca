"""sha256 of an output file, computed in a background thread that follows the file's write frontier.

The driver tells the hasher how far the file is finished (a contiguous prefix) as tasks complete; the
thread hashes those bytes while they are still in the page cache, so sealing a file at the end costs
only the last stretch instead of a second full read.
"""

from __future__ import annotations

import hashlib
import os
import threading

CHUNK = 16 << 20


class FileHasher:
    def __init__(self, path: str):
        self.path = path
        self.sha = hashlib.sha256()
        self.pos = 0
        self.target = 0
        self.size: int | None = None  # set by finish()
        self.error: BaseException | None = None
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

    def _loop(self) -> None:
        try:
            fd = os.open(self.path, os.O_RDONLY)
            try:
                buf = bytearray(CHUNK)
                view = memoryview(buf)
                while True:
                    with self.cond:
                        while self.pos >= self.target and not (self.size is not None and self.pos >= self.size):
                            self.cond.wait()
                        if self.size is not None and self.pos >= self.size:
                            return
                        end = self.target
                    while self.pos < end:
                        n = os.preadv(fd, [view[: min(CHUNK, end - self.pos)]], self.pos)
                        if n == 0:
                            raise OSError(f"{self.path}: ended at byte {self.pos} while hashing")
                        self.sha.update(view[:n])
                        self.pos += n
            finally:
                os.close(fd)
        except BaseException as e:  # reported by finish()
            self.error = e
