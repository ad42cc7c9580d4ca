"""What every phase gets: the parsed arguments, the folders, the merge's environment, the pair."""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass, field

from expo_dist.testing.measure import Cache, nbytes

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))  # this checkout (scripts/expo_bench/ -> the repository)


def log(msg: str, who: str = "bench") -> None:
    print(f"{who}: {msg}", file=sys.stderr, flush=True)


def make_workdir(prefix: str, parent: str | None) -> str:
    """A new temp folder under parent (default /var/tmp where writable: often a disk where /tmp is RAM)."""
    base = "/var/tmp" if os.path.isdir("/var/tmp") and os.access("/var/tmp", os.W_OK) else None
    return tempfile.mkdtemp(prefix=prefix, dir=parent or base)


def remove(path: str) -> None:
    if os.path.isdir(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.exists(path):
        os.unlink(path)


@dataclass
class Pair:
    """The two input models and how they came to be (desc: what the report and the JSON say about them)."""

    sft: str
    aligned: str
    desc: dict
    generated: bool
    sft_files: list[str] = field(default_factory=list)
    aligned_files: list[str] = field(default_factory=list)

    @property
    def paths(self) -> list[str]:
        return [self.sft, self.aligned]

    @property
    def in_bytes(self) -> int:
        return nbytes(self.sft_files) + nbytes(self.aligned_files)

    @property
    def out_guess(self) -> int:
        """The output's size as the I/O floor writes it: the aligned model's."""
        return nbytes(self.aligned_files)


@dataclass
class Bench:
    """One benchmark run's settings. Phases read it and return plain data; only the pair is set on it later."""

    args: argparse.Namespace
    src: str  # the expo_dist checkout the merges run
    workdir: str
    workdir_fs: str
    env: dict  # the merge subprocesses' environment
    extra: list[str]  # extra `expo-dist merge` arguments
    cache: Cache
    repeat: int
    pair: Pair | None = None

    @property
    def floor(self) -> bool:
        """Whether the rounds measure ray_startup and the I/O floor."""
        return not self.args.no_floor and not self.args.memory
