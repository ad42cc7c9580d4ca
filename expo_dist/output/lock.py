"""An exclusive lock on an output folder, held by the driver for the whole run: OUT/.expo/lock.

Two runs on one --out would otherwise both "resume" and truncate each other's staged shards. The lock is an
flock(2) on OUT/.expo/lock (the kernel drops it when the holder dies, so a killed run leaves no stale lock; Linux
NFS clients turn flock into NFS byte-range locks, which the server arbitrates across hosts). Where the file
system refuses flock (Lustre mounted without -o flock, some FUSE file systems), a lease takes its place: the
same file created with O_EXCL, holding host, pid and a heartbeat the holder renews every HEARTBEAT seconds; a
lease whose holder is a dead pid on this host, or whose heartbeat is older than STALE seconds, is taken over.
The file says who holds it, so the refusal can name the holder.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import threading
import time

from ..errors import ExpoError

NAME = "lock"
LEASE = NAME + ".lease"  # the lease file where flock is refused
HEARTBEAT = 10.0  # seconds between lease renewals (lease mode only)
STALE = 90.0  # seconds without a renewal after which a lease is taken over
_NO_FLOCK = (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL)


def _holder_text(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.loads(f.read(4096) or "{}")
        if not isinstance(doc, dict):
            raise ValueError
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(doc.get("since", 0))))
        return f"pid {int(doc.get('pid'))} on {str(doc.get('host'))[:200]}, since {since}"
    except (OSError, ValueError, TypeError, OverflowError):
        return "another expo-dist run"


def _record() -> bytes:
    now = time.time()
    return json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "since": now, "heartbeat": now}).encode()


class OutputLock:
    """Context manager; acquire() raises ExpoError naming the holder when another run holds the folder."""

    def __init__(self, wdir: str, what: str):
        self.wdir, self.what = wdir, what
        self.path = os.path.join(wdir, NAME)
        self.fd: int | None = None
        self.lease = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def acquire(self) -> OutputLock:
        os.makedirs(self.wdir, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                os.close(fd)
                if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise ExpoError(f"{self.what} is in use by {_holder_text(self.path)}: another merge is writing "
                                    "it; wait for it to end or choose another --out") from None
                if e.errno in _NO_FLOCK:
                    return self._acquire_lease()
                raise
            # the holder before us may have removed the file after we opened it: then ours locks nothing
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.path, follow_symlinks=False))
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.pwrite(fd, _record(), 0)
        self.fd = fd
        return self

    def _acquire_lease(self) -> OutputLock:
        path = os.path.join(self.wdir, LEASE)
        for _ in range(3):
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
            except FileExistsError:
                if not self._lease_stale(path):
                    raise ExpoError(f"{self.what} is in use by {_holder_text(path)}: another merge is writing "
                                    "it; wait for it to end or choose another --out") from None
                try:
                    os.unlink(path)
                except FileNotFoundError:
                    pass
                continue
            os.write(fd, _record())
            self.fd, self.lease, self.path = fd, True, path
            self._thread = threading.Thread(target=self._renew, name="expo-lease", daemon=True)
            self._thread.start()
            return self
        raise ExpoError(f"{self.what}: could not take the lease {path}; remove it if no merge is running")

    @staticmethod
    def _lease_stale(path: str) -> bool:
        try:
            with open(path, encoding="utf-8") as f:
                doc = json.loads(f.read(4096))
            host, pid, beat = doc["host"], int(doc["pid"]), float(doc["heartbeat"])
        except (OSError, ValueError, KeyError, TypeError, OverflowError):
            try:  # unreadable: stale once its file is old
                return time.time() - os.stat(path).st_mtime > STALE
            except OSError:
                return True
        if host == socket.gethostname():
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return True
            except PermissionError:
                pass
        return time.time() - beat > STALE

    def _renew(self) -> None:
        while not self._stop.wait(HEARTBEAT):
            try:
                doc = json.loads(os.pread(self.fd, 4096, 0))
                doc["heartbeat"] = time.time()
                data = json.dumps(doc).encode()
                os.ftruncate(self.fd, 0)
                os.pwrite(self.fd, data, 0)
            except (OSError, ValueError, TypeError):
                pass

    def release(self, remove: bool = False) -> None:
        """Give the lock up; remove=True also deletes the lock file (the run is finished and its work dir goes)."""
        if self.fd is None:
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=1)
        if remove or self.lease:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
        os.close(self.fd)  # closing drops the flock
        self.fd = None

    def __enter__(self) -> OutputLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
