"""How one task's output range is cut into windows, and where each byte sits in a worker's buffers (pure code).

A window holds up to CHUNK_BYTES of output; it ends on an ALIGN boundary (when the chunk allows), so that its
whole blocks can be written with direct I/O. Its input bytes are gathered in runs, one read each: consecutive
pieces that continue each other in the same file share a run, and each run sits in the buffer at an address
congruent to its file offset modulo ALIGN, so the block-aligned superset of the range can be read straight in.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..formats.dtypes import itemsize
from .plan import Task

ALIGN = 4096  # bytes: the block of direct I/O (covers every common device); runtime.fileio reads and writes by it
CHUNK_BYTES = 16 << 20  # output bytes per window


def align_up(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def align_down(n: int) -> int:
    return n // ALIGN * ALIGN


@dataclass
class Piece:
    """A run of one segment's elements inside one window, and where its bytes sit in the slot buffers."""

    seg: object
    first: int  # element index within the segment
    count: int
    out_at: int  # byte offset in the window's output (the buffer holds it at Window.out_base + out_at)
    a_at: int  # byte offset in the slot's aligned-input buffer
    s_at: int  # byte offset in the slot's SFT-input buffer (-1: no SFT bytes)


@dataclass
class Run:
    """One read: n bytes of a file from offset off, into the slot buffer `which` ("a" or "s") at `at`
    (at == off mod ALIGN, so the block-aligned superset of the range can be read straight into the buffer)."""

    which: str
    path: str
    off: int
    at: int
    n: int


@dataclass
class Window:
    pos: int  # absolute output offset
    nbytes: int
    pieces: list[Piece]
    a_bytes: int  # extent of the aligned-input buffer this window needs (runs, their alignment, block tails)
    s_bytes: int
    limit: int = 0  # the most output bytes it may hold (its end then falls on an ALIGN boundary)
    runs: list[Run] = field(default_factory=list)

    @property
    def out_base(self) -> int:
        return self.pos % ALIGN


def _limit(pos: int, chunk: int) -> int:
    """Output bytes for a window at pos: chunk, trimmed so the window ends on a block boundary."""
    return chunk - (pos + chunk) % ALIGN if chunk >= 2 * ALIGN else chunk


def _place(win: Window, which: str, path: str, off: int, n: int) -> int:
    """Where n bytes of path at off go in the window's `which` buffer: after the previous run when they
    continue it in the file, else at the next position congruent to off modulo ALIGN."""
    prev = next((r for r in reversed(win.runs) if r.which == which), None)
    if prev is not None and prev.path == path and prev.off + prev.n == off:
        prev.n += n
        at = prev.at + prev.n - n
    else:
        start = align_up(prev.at + prev.n) if prev is not None else 0
        at = start + off % ALIGN
        win.runs.append(Run(which, path, off, at, n))
    end = align_up(at + n)  # a direct read fills whole blocks
    if which == "a":
        win.a_bytes = max(win.a_bytes, end)
    else:
        win.s_bytes = max(win.s_bytes, end)
    return at


def windows(task: Task, chunk: int) -> list[Window]:
    out: list[Window] = []
    cur: Window | None = None
    for seg in task.segments:
        osz, asz, ssz = itemsize(seg.out_dtype), itemsize(seg.a_dtype), itemsize(seg.s_dtype)
        done = 0
        while done < seg.count:
            if cur is None or cur.nbytes + osz > cur.limit:
                pos = cur.pos + cur.nbytes if cur else task.begin
                cur = Window(pos, 0, [], 0, 0, _limit(pos, chunk))
                out.append(cur)
            k = min(seg.count - done, (cur.limit - cur.nbytes) // osz)
            a_at = _place(cur, "a", seg.a_file, seg.a_offset + done * asz, k * asz)
            s_at = _place(cur, "s", seg.s_file, seg.s_offset + done * ssz, k * ssz) if seg.s_file is not None else -1
            cur.pieces.append(Piece(seg, done, k, cur.nbytes, a_at, s_at))
            cur.nbytes += k * osz
            done += k
    return out
