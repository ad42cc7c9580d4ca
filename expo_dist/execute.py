"""Run one task: read the input byte ranges, compute, write the output byte range. No Ray here.

A task's output range is cut into windows of CHUNK_BYTES. Three stages overlap: a reader thread fills the
input slots of window w+1 with positional reads while the calling thread computes window w and a writer
thread writes window w-1 (positional writes, CRC-32, early writeback). Memory is two slots of fixed size,
whatever the size of the model or of the task.
"""

from __future__ import annotations

import os
import zlib
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from .dtypes import itemsize, torch_dtype
from .errors import MergeFailed
from .fileio import pread_into, pwrite_all
from .kernel import Kernel
from .plan import COPY, EXTRAPOLATE, Task
from .fetch import local_path

CHUNK_BYTES = 16 << 20  # output bytes per window
SLOTS = 2  # windows in flight per stage
WRITEBACK_LAG = 4  # windows: wait for the writeback of the range written this many windows ago

try:
    from ._ckernel import start_writeback
except ImportError:  # pragma: no cover - no C extension: leave writeback to the OS
    start_writeback = None
WRITEBACK = os.environ.get("EXPO_WRITEBACK", "throttle")  # throttle | async | off


@dataclass
class TaskResult:
    task: int
    nbytes: int
    crc32s: list[int]  # CRC-32 of the bytes written to each output
    differs: list[str] = field(default_factory=list)  # non-float tensors whose SFT bytes differ
    nonfinite_out: int = 0
    nonfinite_in: int = 0

    @property
    def crc32(self) -> int:
        return self.crc32s[0]


@dataclass
class Piece:
    """A run of one segment's elements inside one window, and where its bytes sit in the slot buffers."""

    seg: object
    first: int  # element index within the segment
    count: int
    out_at: int  # byte offset in the window's output buffer
    a_at: int  # byte offset in the slot's aligned-input buffer
    s_at: int  # byte offset in the slot's SFT-input buffer (-1: no SFT bytes)


@dataclass
class Window:
    pos: int  # absolute output offset
    nbytes: int
    pieces: list[Piece]
    a_bytes: int
    s_bytes: int


def windows(task: Task, chunk: int) -> list[Window]:
    out: list[Window] = []
    cur: Window | None = None
    for seg in task.segments:
        osz, asz, ssz = itemsize(seg.out_dtype), itemsize(seg.a_dtype), itemsize(seg.s_dtype)
        done = 0
        while done < seg.count:
            if cur is None or cur.nbytes + osz > chunk:
                cur = Window(cur.pos + cur.nbytes if cur else task.begin, 0, [], 0, 0)
                out.append(cur)
            k = min(seg.count - done, (chunk - cur.nbytes) // osz)
            has_s = seg.s_file is not None
            cur.pieces.append(Piece(seg, done, k, cur.nbytes, cur.a_bytes, cur.s_bytes if has_s else -1))
            cur.nbytes += k * osz
            cur.a_bytes += k * asz
            if has_s:
                cur.s_bytes += k * ssz
            done += k
    return out


class Slot:
    def __init__(self, chunk: int, pin: bool, n_out: int):
        self.pin = pin
        self.a = torch.empty(chunk, dtype=torch.uint8, pin_memory=pin)
        self.s = torch.empty(chunk, dtype=torch.uint8, pin_memory=pin)
        self.o = [torch.empty(chunk, dtype=torch.uint8, pin_memory=pin) for _ in range(n_out)]

    def fit(self, win: Window) -> None:
        """Inputs can be wider than the output (float32 SFT into bf16): grow the input buffers if needed."""
        if win.a_bytes > self.a.numel():
            self.a = torch.empty(win.a_bytes, dtype=torch.uint8, pin_memory=self.pin)
        if win.s_bytes > self.s.numel():
            self.s = torch.empty(win.s_bytes, dtype=torch.uint8, pin_memory=self.pin)


class Runner:
    """Runs tasks into one output folder, or into several (one per alpha of a sweep, same layout)."""

    def __init__(self, out_dirs: str | list[str], device: str = "cpu", chunk_bytes: int = CHUNK_BYTES,
                 max_fds: int = 64, cache_dir: str | None = None):
        self.cache_dir = cache_dir  # this node's Hugging Face cache, for hf:// inputs
        self.out_dirs = [out_dirs] if isinstance(out_dirs, str) else list(out_dirs)
        self.device = torch.device(device)
        self.kernel = Kernel(self.device)
        self.chunk = max(8, chunk_bytes)
        pin = self.device.type == "cuda"
        self.slots = [Slot(self.chunk, pin, len(self.out_dirs)) for _ in range(SLOTS)]
        self.max_fds = max_fds
        self.rfds: OrderedDict[str, int] = OrderedDict()  # used by the reader thread only
        self.wfds: OrderedDict[str, int] = OrderedDict()  # used by the writer thread only
        self.reader = ThreadPoolExecutor(1, thread_name_prefix="expo-read")
        self.writer = ThreadPoolExecutor(1, thread_name_prefix="expo-write")
        self.written: list[tuple[int, int, int]] = []

    def _fd(self, path: str, write: bool = False) -> int:
        fds = self.wfds if write else self.rfds
        fd = fds.pop(path, None)
        if fd is None:
            try:
                fd = os.open(path if write else local_path(path, self.cache_dir), os.O_WRONLY if write else os.O_RDONLY)
            except OSError as e:
                raise MergeFailed(f"{path}: cannot open ({e.strerror})") from None
            if not write and hasattr(os, "posix_fadvise"):
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
            if len(fds) >= self.max_fds:
                old = fds.popitem(last=False)[1]
                self.written = [w for w in self.written if w[0] != old]
                os.close(old)
        fds[path] = fd
        return fd

    def close(self) -> None:
        self.reader.shutdown()
        self.writer.shutdown()
        for fds in (self.rfds, self.wfds):
            for fd in fds.values():
                os.close(fd)
            fds.clear()

    def run(self, task: Task) -> TaskResult:
        k_out = len(self.out_dirs)
        res = TaskResult(task.id, task.nbytes, [0] * k_out)
        out_paths = [os.path.join(d, task.file) for d in self.out_dirs]
        wins = windows(task, self.chunk)
        reads = {w: self.reader.submit(self._read, wins[w], self.slots[w % SLOTS]) for w in range(min(SLOTS, len(wins)))}
        writes = {}
        crc = res.crc32s
        try:
            for w, win in enumerate(wins):
                slot = self.slots[w % SLOTS]
                reads.pop(w).result()
                if w - SLOTS in writes:
                    writes.pop(w - SLOTS).result()  # slot's output buffer is free again
                self._compute(win, slot, res)
                if w + SLOTS < len(wins):
                    reads[w + SLOTS] = self.reader.submit(self._read, wins[w + SLOTS], self.slots[(w + SLOTS) % SLOTS])
                writes[w] = self.writer.submit(self._write, out_paths, win, slot, crc)
            for f in writes.values():
                f.result()
        finally:  # never leave a thread writing into a slot the next task will use
            for f in list(reads.values()) + list(writes.values()):
                f.exception()
        assert sum(w.nbytes for w in wins) == task.nbytes
        return res

    def _read(self, win: Window, slot: Slot) -> None:
        slot.fit(win)
        a_view, s_view = memoryview(slot.a.numpy()), memoryview(slot.s.numpy())
        ops: list[list] = []  # coalesced reads: [path, file offset, view, start, end]
        for p in win.pieces:
            seg = p.seg
            wants = [(seg.a_file, seg.a_offset + p.first * itemsize(seg.a_dtype), a_view, p.a_at,
                      p.count * itemsize(seg.a_dtype))]
            if p.s_at >= 0:
                wants.append((seg.s_file, seg.s_offset + p.first * itemsize(seg.s_dtype), s_view, p.s_at,
                              p.count * itemsize(seg.s_dtype)))
            for path, off, view, at, n in wants:
                prev = next((o for o in reversed(ops) if o[2] is view), None)
                if prev and prev[0] == path and prev[1] + (prev[4] - prev[3]) == off and prev[4] == at:
                    prev[4] += n
                else:
                    ops.append([path, off, view, at, at + n])
        for path, off, view, start, end in ops:
            pread_into(self._fd(path), view[start:end], off, path)

    def _compute(self, win: Window, slot: Slot, res: TaskResult) -> None:
        dev = self.device
        for p in win.pieces:
            seg = p.seg
            asz, ssz, osz = itemsize(seg.a_dtype), itemsize(seg.s_dtype), itemsize(seg.out_dtype)
            a_raw = slot.a[p.a_at: p.a_at + p.count * asz]
            outs_raw = [o[p.out_at: p.out_at + p.count * osz] for o in slot.o]
            if seg.op == COPY:
                for out_raw in outs_raw:
                    out_raw.copy_(a_raw)
                if p.s_at >= 0 and seg.tensor not in res.differs:
                    if not torch.equal(slot.s[p.s_at: p.s_at + p.count * ssz], a_raw):
                        res.differs.append(seg.tensor)
                continue
            assert seg.op == EXTRAPOLATE and len(seg.alphas) == len(outs_raw)
            s_raw = slot.s[p.s_at: p.s_at + p.count * ssz]
            a = a_raw.to(dev, non_blocking=True).view(torch_dtype(seg.a_dtype))
            s = s_raw.to(dev, non_blocking=True).view(torch_dtype(seg.s_dtype))
            for alpha, out_raw in zip(seg.alphas, outs_raw):
                if dev.type == "cpu":
                    out = out_raw.view(torch_dtype(seg.out_dtype))
                    res.nonfinite_out += self.kernel.extrapolate(a, s, alpha, out)
                else:
                    out = torch.empty(p.count, dtype=torch_dtype(seg.out_dtype), device=dev)
                    res.nonfinite_out += self.kernel.extrapolate(a, s, alpha, out)
                    out_raw.copy_(out.view(torch.uint8))
            res.nonfinite_in += self.kernel.count_nonfinite(a) + self.kernel.count_nonfinite(s)

    def _write(self, paths: list[str], win: Window, slot: Slot, crc: list[int]) -> None:
        for k, path in enumerate(paths):
            fd = self._fd(path, write=True)
            view = memoryview(slot.o[k].numpy())[: win.nbytes]
            pwrite_all(fd, view, win.pos, path)
            crc[k] = zlib.crc32(view, crc[k])
            self._writeback(fd, win.pos, win.nbytes)

    def _writeback(self, fd: int, pos: int, n: int) -> None:
        """Keep the disk writing from the first window on, and bound this worker's dirty pages."""
        if start_writeback is None or WRITEBACK == "off":
            return
        start_writeback(fd, pos, n, False)
        if WRITEBACK == "throttle":
            self.written.append((fd, pos, n))
            if len(self.written) > WRITEBACK_LAG:
                old = self.written.pop(0)
                try:
                    start_writeback(old[0], old[1], old[2], True)
                except OSError:  # the fd was closed meanwhile: nothing to wait for
                    pass
