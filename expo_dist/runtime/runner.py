"""Run one task: read the input byte ranges, compute, write the output byte range. No Ray here.

A task's output range is cut into windows (windows.py). Three stages overlap: a reader thread fills the
input slots of window w+1 with positional reads while the calling thread computes window w and a writer
thread writes window w-1 (positional writes, CRC-32). Memory is Settings.slots (2) slots of fixed size, whatever
the size of the model or of the task.

Direct I/O (fileio.direct_ok: local block-device file systems, or Settings.io "direct"): large reads and the
block-aligned middle of each write bypass the page cache, which on many machines moves data several times
faster than the page cache does, and leaves the cache to the OS's other users. For that, every byte sits in
the slot buffers at an address congruent to its file offset modulo ALIGN, window ends are ALIGN-aligned,
and only the partial blocks at a task's two ends are written through the page cache (a neighbouring task
may share those blocks; no block is ever written both ways at once). Without direct I/O, writes go through
the page cache with early writeback (sync_file_range), so the dirty pages never pile up.
"""

from __future__ import annotations

import os
import threading
import zlib
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from ..errors import MergeFailed
from ..formats.dtypes import itemsize
from ..formats.reader import pread_into
from ..planning.plan import COPY, EXTRAPOLATE, Task
from ..planning.windows import ALIGN, CHUNK_BYTES, Run, Window, align_down, align_up, windows
from ..settings import Settings
from ..sources import s3
from ..sources.fetch import local_path
from ..sources.s3 import is_s3
from . import ckernel
from .fileio import aligned_empty, direct_ok, io_mode, open_direct, pwrite_all, resident_prefix
from .s3parts import PartSink, PartTarget
from .slots import Slot, TaskResult, joined_runs

WRITEBACK_LAG = 4  # windows: wait for the writeback of the range written this many windows ago
DIRECT_MIN = 256 << 10  # bytes: shorter reads go through the page cache (neighbouring small tensors)

try:
    from ._ckernel import start_writeback
except ImportError:  # pragma: no cover - no C extension: leave writeback to the OS
    start_writeback = None


class Runner:
    """Runs tasks into one output folder, or into several (one per alpha of a sweep, same layout)."""

    def __init__(self, out_dirs: str | list[str], device: str = "cpu", chunk_bytes: int = CHUNK_BYTES,
                 max_fds: int = 64, cache_dir: str | None = None, direct_min: int = DIRECT_MIN,
                 settings: Settings | None = None, kernel=None, pins: dict[str, str] | None = None):
        """settings: io, slots, writeback, kernel, hub_attempts (settings.Settings; the defaults when None).
        pins: s3:// input -> the ETag it was planned from (every ranged GET asks for that object: If-Match)."""
        self.pins = dict(pins or {})
        self.settings = settings = settings if settings is not None else Settings()
        self.cache_dir = cache_dir  # this node's Hugging Face cache, for hf:// inputs
        self.out_dirs = [out_dirs] if isinstance(out_dirs, str) else list(out_dirs)
        # an s3:// output (s3parts.PartTarget per output): each task is gathered and uploaded as one part
        self.sink = PartSink(self.out_dirs, aligned_empty) if isinstance(self.out_dirs[0], PartTarget) else None
        self.device = str(device)
        # CPU with the C kernel: raw bytes in numpy buffers, no torch at all. Otherwise (a GPU, or no C
        # kernel, or Settings.kernel "torch") the torch ops of kernel.Kernel; or the kernel given (a kernel.Kernel
        # on this device: the tests give one that writes wrong bytes, to see the worker's self-check catch it).
        use_c = settings.kernel != "torch"
        self.c_path = kernel is None and self.device == "cpu" and use_c and ckernel.available()
        self.kernel = kernel
        if not self.c_path and kernel is None:
            import torch

            from .kernel import Kernel

            if self.device == "cpu":
                torch.set_num_threads(1)  # one worker per core
            self.kernel = Kernel(torch.device(self.device), use_c=use_c)
        self.chunk = max(8, chunk_bytes)
        self.direct_min = direct_min
        self.io_mode = io_mode(settings.io)
        self.writeback = settings.writeback
        self.hub_attempts = settings.hub_attempts
        pin = self.device.startswith("cuda")
        self.n_slots = settings.slots
        self.slots = [Slot(self.chunk, pin, len(self.out_dirs)) for _ in range(self.n_slots)]
        self.max_fds = max_fds
        self.local = threading.local()  # each reader thread keeps its own descriptors (never closed under another)
        self.all_rfds: list[OrderedDict] = []
        self.wfds: OrderedDict[tuple[str, bool], int] = OrderedDict()  # used by the writer thread only
        self.lock = threading.Lock()
        self.no_direct: set[str] = set()  # files where O_DIRECT was refused: page cache from then on
        self.direct_files: dict[str, bool] = {}  # file -> direct I/O wanted for it (fileio.direct_ok)
        self.reader = ThreadPoolExecutor(max(1, self.n_slots - 1), thread_name_prefix="expo-read")
        self.writer = ThreadPoolExecutor(1, thread_name_prefix="expo-write")
        self.written: list[tuple[int, int, int]] = []
        self.io = {"direct_read": 0, "cached_read": 0, "direct_write": 0, "cached_write": 0, "s3_read": 0,
                   "s3_write": 0}  # bytes

    def _fd(self, path: str, write: bool = False, direct: bool = False) -> int | None:
        """A cached descriptor; with direct=True an O_DIRECT one, or None where the file system refuses it."""
        fds = self.wfds if write else self._rfds()
        key = (path, direct)
        fd = fds.pop(key, None)
        if fd is None:
            local = path if write else local_path(path, self.cache_dir, self.hub_attempts)
            flags = os.O_WRONLY if write else os.O_RDONLY
            try:
                fd = open_direct(local, flags) if direct else os.open(local, flags)
            except OSError as e:
                raise MergeFailed(f"{path}: cannot open ({e.strerror})") from None
            if fd is None:
                self.no_direct.add(path)
                return None
            if not write and not direct and hasattr(os, "posix_fadvise"):
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
            if len(fds) >= self.max_fds:
                old = fds.popitem(last=False)[1]
                if write:  # (the writer's own list: only the writer thread evicts write descriptors)
                    self.written = [w for w in self.written if w[0] != old]
                os.close(old)
        fds[key] = fd
        return fd

    def _rfds(self) -> OrderedDict:
        fds = getattr(self.local, "rfds", None)
        if fds is None:
            fds = self.local.rfds = OrderedDict()
            with self.lock:
                self.all_rfds.append(fds)
        return fds

    def _count(self, key: str, n: int) -> None:
        with self.lock:
            self.io[key] += n

    def _direct(self, path: str, n: int) -> bool:
        """Whether this read or write of n bytes goes direct: decided once per file (n aside)."""
        if n < self.direct_min or path in self.no_direct:
            return False
        ok = self.direct_files.get(path)
        if ok is None:
            ok = self.direct_files[path] = direct_ok(local_path(path, self.cache_dir, self.hub_attempts),
                                                          self.io_mode)
        return ok

    def close(self) -> None:
        self.reader.shutdown()
        self.writer.shutdown()
        for fds in (*self.all_rfds, self.wfds):
            for fd in fds.values():
                os.close(fd)
            fds.clear()

    def run(self, task: Task) -> TaskResult:
        k_out = len(self.out_dirs)
        res = TaskResult(task.id, task.nbytes, [0] * k_out)
        if self.sink is not None:
            res.crc32s[:] = self.sink.begin(task.file, task.begin, task.end)  # (part 1: its header first)
            out_paths = []
        else:
            out_paths = [os.path.join(d, task.file) for d in self.out_dirs]
        wins = windows(task, self.chunk)
        n = self.n_slots
        reads = {w: self.reader.submit(self._read, wins[w], self.slots[w % n]) for w in range(min(n, len(wins)))}
        writes = {}
        crc = res.crc32s
        try:
            for w, win in enumerate(wins):
                slot = self.slots[w % n]
                reads.pop(w).result()
                if w - n in writes:
                    writes.pop(w - n).result()  # slot's output buffer is free again
                self._compute(win, slot, res)
                if w + n < len(wins):
                    reads[w + n] = self.reader.submit(self._read, wins[w + n], self.slots[(w + n) % n])
                writes[w] = self.writer.submit(self._write, out_paths, win, slot, crc)
            for f in writes.values():
                f.result()
            if self.sink is not None:
                self.sink.finish(task.file, crc)
                self._count("s3_write", self.sink.size * k_out)
        finally:  # never leave a thread writing into a slot the next task will use
            for f in list(reads.values()) + list(writes.values()):
                f.exception()
        assert sum(w.nbytes for w in wins) == task.nbytes
        return res

    def _read(self, win: Window, slot: Slot) -> None:
        slot.fit(win)
        views = {"a": memoryview(slot.a), "s": memoryview(slot.s)}
        for r in joined_runs(win.runs):
            view = views[r.which]
            if is_s3(r.path):  # one ranged GET straight into the slot
                s3.read_into(r.path, view[r.at: r.at + r.n], r.off, MergeFailed, self.pins.get(r.path))
                self._count("s3_read", r.n)
                continue
            if self._direct(r.path, r.n):
                fd = self._fd(r.path, direct=True)
                if fd is not None:
                    # what the page cache already holds (a file just downloaded or written) comes from there;
                    # the rest, from the first block not wholly cached, straight from the disk
                    got = self._cached_part(r, view)
                    if got < r.n:
                        lo, hi = align_down(r.off + got), align_up(r.off + r.n)
                        b = r.at - (r.off - lo)
                        pread_into(fd, view[b: b + hi - lo], lo, r.path, need=r.off + r.n - lo)
                    self._count("cached_read", got)
                    self._count("direct_read", r.n - got)
                    continue
            pread_into(self._fd(r.path), view[r.at: r.at + r.n], r.off, r.path)
            self._count("cached_read", r.n)

    def _cached_part(self, r: Run, view: memoryview) -> int:
        """Read the leading part of a run that the page cache holds (fileio.resident_prefix: no disk I/O to
        find out) through the cache; how many bytes that was."""
        fd = self._fd(r.path)
        got = min(r.n, resident_prefix(fd, r.off, r.n))
        if got:
            pread_into(fd, view[r.at: r.at + got], r.off, r.path)
        return got

    def _compute(self, win: Window, slot: Slot, res: TaskResult) -> None:
        base = win.out_base
        for p in win.pieces:
            seg = p.seg
            asz, ssz, osz = itemsize(seg.a_dtype), itemsize(seg.s_dtype), itemsize(seg.out_dtype)
            a_raw = slot.a[p.a_at: p.a_at + p.count * asz]
            outs_raw = [o[base + p.out_at: base + p.out_at + p.count * osz] for o in slot.o]
            if seg.op == COPY:
                for out_raw in outs_raw:
                    out_raw[:] = a_raw
                if p.s_at >= 0 and seg.tensor not in res.differs:
                    if not np.array_equal(slot.s[p.s_at: p.s_at + p.count * ssz], a_raw):
                        res.differs.append(seg.tensor)
                continue
            assert seg.op == EXTRAPOLATE and len(seg.alphas) == len(outs_raw)
            s_raw = slot.s[p.s_at: p.s_at + p.count * ssz]
            if self.c_path:
                for alpha, out_raw in zip(seg.alphas, outs_raw):
                    res.nonfinite_out += ckernel.extrapolate(a_raw, seg.a_dtype, s_raw, seg.s_dtype, out_raw,
                                                             seg.out_dtype, alpha)
                res.nonfinite_in += (ckernel.count_nonfinite(a_raw, seg.a_dtype)
                                     + ckernel.count_nonfinite(s_raw, seg.s_dtype))
            else:  # the torch ops (kernel.Kernel.extrapolate_raw): on the GPU (pinned buffers) or the CPU
                bad_out, bad_in = self.kernel.extrapolate_raw(a_raw, seg.a_dtype, s_raw, seg.s_dtype, outs_raw,
                                                              seg.out_dtype, seg.alphas)
                res.nonfinite_out += bad_out
                res.nonfinite_in += bad_in

    def _write(self, paths: list[str], win: Window, slot: Slot, crc: list[int]) -> None:
        """The window's bytes: its whole blocks directly, its partial blocks (at a task's ends, which a
        neighbouring task may share) through the page cache."""
        pos, end, base = win.pos, win.pos + win.nbytes, win.out_base
        if self.sink is not None:  # into the task's part buffers (uploaded when the task is done)
            for k in range(len(self.out_dirs)):
                view = memoryview(slot.o[k])[base: base + win.nbytes]
                crc[k] = zlib.crc32(view, crc[k])
                self.sink.put(k, pos, view)
            return
        for k, path in enumerate(paths):
            view = memoryview(slot.o[k])[base: base + win.nbytes]
            crc[k] = zlib.crc32(view, crc[k])
            lo, hi = align_up(pos), align_down(end)  # (windows end on block boundaries, but the task need not)
            fd = self._fd(path, write=True, direct=True) if hi - lo >= ALIGN and self._direct(path, hi - lo) else None
            if fd is None:
                lo = hi = end  # all through the page cache
            else:
                pwrite_all(fd, view[lo - pos: hi - pos], lo, path)
                self.io["direct_write"] += hi - lo
            for a, b in ((pos, lo), (hi, end)):
                if b > a:
                    cfd = self._fd(path, write=True)
                    pwrite_all(cfd, view[a - pos: b - pos], a, path)
                    self.io["cached_write"] += b - a
                    self._writeback(cfd, a, b - a)

    def _writeback(self, fd: int, pos: int, n: int) -> None:
        """Keep the disk writing from the first window on, and bound this worker's dirty pages."""
        if start_writeback is None or self.writeback == "off":
            return
        start_writeback(fd, pos, n, False)
        if self.writeback == "throttle":
            self.written.append((fd, pos, n))
            if len(self.written) > WRITEBACK_LAG:
                old = self.written.pop(0)
                try:
                    start_writeback(old[0], old[1], old[2], True)
                except OSError:  # the fd was closed meanwhile: nothing to wait for
                    pass
