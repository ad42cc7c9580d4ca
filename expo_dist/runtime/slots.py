"""A task runner's memory and what it reports: the window slots (fixed size, grown only for wider inputs), the
reads of a window (joined where one ranged GET can replace several), and a task's result."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..planning.windows import ALIGN, Run, Window
from ..sources.s3 import is_s3
from .fileio import aligned_empty


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


class Slot:
    def __init__(self, chunk: int, pin: bool, n_out: int):
        self.pin = pin
        self.a = aligned_empty(chunk + 2 * ALIGN, pin)
        self.s = aligned_empty(chunk + 2 * ALIGN, pin)
        self.o = [aligned_empty(chunk + 2 * ALIGN, pin) for _ in range(n_out)]

    def fit(self, win: Window) -> None:
        """Inputs can be wider than the output (float32 SFT into bf16), and runs are placed block-aligned:
        grow the input buffers when a window needs more."""
        if win.a_bytes > self.a.size:
            self.a = aligned_empty(win.a_bytes, self.pin)
        if win.s_bytes > self.s.size:
            self.s = aligned_empty(win.s_bytes, self.pin)


def joined_runs(runs: list[Run]) -> list[Run]:
    """Runs of an object in object storage that follow each other in the object and in the slot, joined into one
    (one ranged GET instead of one per tensor piece); local runs as they are."""
    out: list[Run] = []
    for r in runs:
        p = out[-1] if out else None
        if (p is not None and is_s3(r.path) and r.path == p.path and r.which == p.which and r.off == p.off + p.n
                and r.at == p.at + p.n):
            out[-1] = Run(p.which, p.path, p.off, p.at, p.n + r.n)
        else:
            out.append(r)
    return out
