"""Run one task: read the input byte ranges, compute, write the output byte range. No Ray here.

Memory is fixed by the chunk size, whatever the size of the model or of the task: inputs are read
with positional reads into preallocated buffers, output bytes gather in one buffer and are written
with large positional writes.
"""

from __future__ import annotations

import errno
import os
import zlib
from collections import OrderedDict
from dataclasses import dataclass, field

import torch

from .dtypes import itemsize, torch_dtype
from .errors import MergeFailed
from .kernel import Kernel
from .plan import COPY, Segment, Task

CHUNK_BYTES = 16 << 20  # output bytes per chunk


@dataclass
class TaskResult:
    task: int
    nbytes: int
    crc32: int
    differs: list[str] = field(default_factory=list)  # non-float tensors whose SFT bytes differ
    nonfinite_out: int = 0


def _pread_into(fd: int, view: memoryview, offset: int, path: str) -> None:
    done = 0
    while done < len(view):
        n = os.preadv(fd, [view[done:]], offset + done)
        if n == 0:
            raise MergeFailed(f"{path}: unexpected end of file at byte {offset + done} (file changed or truncated?)")
        done += n


def _pwrite_all(fd: int, view: memoryview, offset: int, path: str) -> None:
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


class Runner:
    def __init__(self, out_dir: str, device: str = "cpu", chunk_bytes: int = CHUNK_BYTES, max_fds: int = 64):
        self.out_dir = out_dir
        self.device = torch.device(device)
        self.kernel = Kernel(self.device)
        self.chunk = chunk_bytes
        # host buffers: raw input bytes (up to float64 sources: 4x a bf16 output chunk) and output bytes
        self.buf_a = torch.empty(chunk_bytes * 4, dtype=torch.uint8, pin_memory=self._pin())
        self.buf_s = torch.empty(chunk_bytes * 4, dtype=torch.uint8, pin_memory=self._pin())
        self.buf_o = torch.empty(chunk_bytes, dtype=torch.uint8, pin_memory=self._pin())
        self.fds: OrderedDict[str, int] = OrderedDict()
        self.max_fds = max_fds

    def _pin(self) -> bool:
        return self.device.type == "cuda"

    def _fd(self, path: str, write: bool = False) -> int:
        key = ("w:" if write else "r:") + path
        fd = self.fds.pop(key, None)
        if fd is None:
            try:
                fd = os.open(path, os.O_WRONLY if write else os.O_RDONLY)
            except OSError as e:
                raise MergeFailed(f"{path}: cannot open ({e.strerror})") from None
            if len(self.fds) >= self.max_fds:
                os.close(self.fds.popitem(last=False)[1])
        self.fds[key] = fd
        return fd

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()

    def run(self, task: Task) -> TaskResult:
        out_path = os.path.join(self.out_dir, task.file)
        ofd = self._fd(out_path, write=True)
        res = TaskResult(task.id, task.nbytes, 0)
        crc = 0
        pos = task.begin  # file offset of buf_o[0]
        fill = 0
        for seg in task.segments:
            assert seg.out_offset == pos + fill, "segments of a task are contiguous"
            osz = itemsize(seg.out_dtype)
            per = max(1, min(self.chunk // osz, (len(self.buf_a) // itemsize(seg.a_dtype)),
                             len(self.buf_s) // itemsize(seg.s_dtype)))
            done = 0
            while done < seg.count:
                room = (self.chunk - fill) // osz
                if room == 0:
                    crc = self._flush(ofd, out_path, pos, fill, crc)
                    pos, fill = pos + fill, 0
                    continue
                k = min(per, seg.count - done, room)
                self._compute(seg, done, k, fill, res)
                fill += k * osz
                done += k
        crc = self._flush(ofd, out_path, pos, fill, crc)
        assert pos + fill == task.end
        res.crc32 = crc
        return res

    def _flush(self, ofd: int, path: str, pos: int, fill: int, crc: int) -> int:
        if fill:
            view = memoryview(self.buf_o.numpy())[:fill]
            _pwrite_all(ofd, view, pos, path)
            crc = zlib.crc32(view, crc)
        return crc

    def _read(self, buf: torch.Tensor, path: str, offset: int, nbytes: int) -> torch.Tensor:
        view = memoryview(buf.numpy())[:nbytes]
        _pread_into(self._fd(path), view, offset, path)
        return buf[:nbytes]

    def _compute(self, seg: Segment, first: int, k: int, at: int, res: TaskResult) -> None:
        asz, ssz, osz = itemsize(seg.a_dtype), itemsize(seg.s_dtype), itemsize(seg.out_dtype)
        a_raw = self._read(self.buf_a, seg.a_file, seg.a_offset + first * asz, k * asz)
        out_raw = self.buf_o[at: at + k * osz]
        if seg.op == COPY:
            out_raw.copy_(a_raw)
            if seg.s_file is not None:
                s_raw = self._read(self.buf_s, seg.s_file, seg.s_offset + first * ssz, k * ssz)
                if not torch.equal(s_raw, a_raw) and seg.tensor not in res.differs:
                    res.differs.append(seg.tensor)
            return
        s_raw = self._read(self.buf_s, seg.s_file, seg.s_offset + first * ssz, k * ssz)
        dev = self.device
        a = a_raw.to(dev, non_blocking=True).view(torch_dtype(seg.a_dtype))
        s = s_raw.to(dev, non_blocking=True).view(torch_dtype(seg.s_dtype))
        if dev.type == "cpu":
            out = out_raw.view(torch_dtype(seg.out_dtype))
            self.kernel.extrapolate(a, s, seg.alpha, out)
        else:
            out = torch.empty(k, dtype=torch_dtype(seg.out_dtype), device=dev)
            self.kernel.extrapolate(a, s, seg.alpha, out)
            out_raw.copy_(out.view(torch.uint8))
        if not bool(torch.isfinite(out).all()):
            res.nonfinite_out += int((~torch.isfinite(out)).sum())
