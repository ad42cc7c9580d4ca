"""The resume journal in OUT/.expo/: the plan's fingerprint and one line per finished task.

A rerun trusts a journal line only after re-reading the task's byte range and matching its CRC-32,
so a line written before a power loss whose data never reached the disk is simply redone.
"""

from __future__ import annotations

import json
import os
import zlib

from ..errors import ExpoError
from ..formats.reader import LocalReader
from ..planning.plan import Plan
from ..runtime.fileio import atomic_write

CHUNK = 16 << 20
PLAN = "plan.json"  # the plan's fingerprint
JOURNAL = "journal.jsonl"  # one line per finished task


class Journal:
    def __init__(self, wdir: str):
        self.wdir = wdir
        self.plan_path = os.path.join(wdir, PLAN)
        self.path = os.path.join(wdir, JOURNAL)
        self.fd: int | None = None

    def exists(self) -> bool:
        return os.path.exists(self.plan_path)

    def fingerprint(self) -> str | None:
        try:
            with open(self.plan_path, encoding="utf-8") as f:
                return json.load(f).get("fingerprint")
        except (OSError, json.JSONDecodeError):
            return None

    def start(self, fingerprint: str) -> None:
        os.makedirs(self.wdir, exist_ok=True)
        if os.path.exists(self.path):
            os.unlink(self.path)
        atomic_write(self.plan_path, json.dumps({"fingerprint": fingerprint}).encode())

    def entries(self) -> dict[int, list[int]]:
        out: dict[int, list[int]] = {}
        try:
            with open(self.path, encoding="utf-8") as f:
                for line in f:
                    try:
                        rec = json.loads(line)
                        crcs = rec["crc32s"] if "crc32s" in rec else [rec["crc32"]]
                        out[int(rec["task"])] = [int(c) for c in crcs]
                    except (ValueError, KeyError, TypeError):
                        continue  # a line torn by a crash
        except FileNotFoundError:
            pass
        return out

    def verified_done(self, plan: Plan, wdirs: list[str] | None = None) -> set[int]:
        """Tasks the journal lists whose bytes check out in every output's staged file, each of the right size
        and header (finalize.create_shards keeps exactly those files and recreates the others)."""
        wdirs = wdirs or [self.wdir]
        done = set()
        recorded = self.entries()
        intact = {s.file for s in plan.shards
                  if all(_intact(os.path.join(w, s.file), s.layout) for w in wdirs)}
        for task in plan.tasks:
            crcs = recorded.get(task.id)
            if crcs is None or len(crcs) != len(wdirs) or task.file not in intact:
                continue
            if all(_crc_of(os.path.join(w, task.file), task.begin, task.end) == c for w, c in zip(wdirs, crcs)):
                done.add(task.id)
        return done

    def record(self, task, result) -> None:
        if self.fd is None:
            self.fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
            size = os.fstat(self.fd).st_size
            if size and os.pread(self.fd, 1, size - 1) != b"\n":
                os.write(self.fd, b"\n")  # end a line torn by a crash, or the next record would join it
        line = json.dumps({"task": task.id, "file": task.file, "begin": task.begin, "end": task.end,
                           "crc32s": list(result.crc32s)}) + "\n"
        os.write(self.fd, line.encode())

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def _intact(path: str, layout) -> bool:
    try:
        with open(path, "rb") as f:
            return os.fstat(f.fileno()).st_size == layout.size and f.read(len(layout.header)) == layout.header
    except OSError:
        return False


def _crc_of(path: str, begin: int, end: int) -> int | None:
    """CRC-32 of bytes [begin, end) of a staged file; None where the file is missing or too short."""
    try:
        r = LocalReader(path)
    except ExpoError:
        return None
    with r:
        if r.size < end:
            return None
        crc, pos = 0, begin
        while pos < end:
            data = r.read(pos, min(CHUNK, end - pos))
            if not data:
                return None
            crc = zlib.crc32(data, crc)
            pos += len(data)
        return crc
