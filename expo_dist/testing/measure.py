"""Running and measuring merges, for scripts/bench.py and scripts/gpu_check.py: the page cache, the pair's files
and sizes, a merge in a subprocess with its process tree's RSS sampled, and the machine it ran on."""

from __future__ import annotations

import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time

import psutil

from ..formats.dtypes import TORCH_NAMES, itemsize
from ..formats.folder import MANIFEST
from . import synth
from .rss import GiB, TreeSampler
from .synth import parse_size

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the checkout of this package


# ---------------------------------------------------------------------------------------------- page cache

class Cache:
    """Drops the page cache before a phase where permitted; always evicts the benchmark's own files."""

    DROP = "/proc/sys/vm/drop_caches"

    def __init__(self, enabled: bool = True, who: str = "bench"):
        self.enabled, self.who = enabled, who
        self.dropped = 0
        self.failed = 0
        self.reason = None if enabled else "disabled with --no-drop-caches"

    def drop(self, paths: list[str]) -> None:
        os.sync()
        for p in paths:
            evict(p)
        if not self.enabled:
            return
        try:
            with open(self.DROP, "w") as f:
                f.write("3\n")
            self.dropped += 1
        except OSError as e:
            self.failed += 1
            if self.reason is None:
                self.reason = f"{e.strerror or e} ({e.filename or self.DROP})"
                print(f"{self.who}: page cache NOT dropped: {self.reason}; evicting the benchmark's files with "
                      "posix_fadvise(DONTNEED) only", file=sys.stderr, flush=True)

    def status(self) -> str:
        if self.dropped and not self.failed:
            return "page cache dropped before each phase (drop_caches), benchmark files also evicted (fadvise)"
        if self.dropped:
            return (f"page cache dropped {self.dropped} times, NOT dropped {self.failed} times: {self.reason}; "
                    "benchmark files evicted (fadvise) every time")
        return f"page cache NOT dropped: {self.reason}; benchmark files evicted with posix_fadvise(DONTNEED) only"


def evict(path: str) -> None:
    """fsync and posix_fadvise(DONTNEED) every file under path (works without privileges)."""
    if not path or not os.path.exists(path):
        return
    files = [path] if os.path.isfile(path) else [os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs]
    for f in files:
        try:
            fd = os.open(f, os.O_RDONLY)
        except OSError:
            continue
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        except OSError:
            pass
        finally:
            os.close(fd)


# ------------------------------------------------------------------------------------------------ the pair

def weight_files(folder: str) -> list[str]:
    return sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.endswith(".safetensors"))


def tree_weight_files(folder: str) -> list[str]:
    return sorted(os.path.join(d, f) for d, _, fs in os.walk(folder) for f in fs if f.endswith(".safetensors"))


def nbytes(files: list[str]) -> int:
    return sum(os.path.getsize(f) for f in files)


def model_bytes(kw: dict, dtype: str) -> int:
    item = itemsize(TORCH_NAMES[dtype])
    return sum(math.prod(s) for s in synth.llama_shapes(**kw).values()) * item


def parse_shard_bytes(text: str) -> tuple:
    parts = [p.strip() for p in text.split(",")]
    if len(parts) == 1:
        parts *= 2
    if len(parts) != 2:
        raise SystemExit("bench: --shard-bytes takes SFT[,ALIGNED], e.g. 1GB,700MB (or none)")
    return tuple(None if p.lower() in ("none", "0", "") else parse_size(p) for p in parts)


# ---------------------------------------------------------------------------------------------- the merge

def merge_cli() -> list[str]:
    exe = shutil.which("expo-dist", path=os.path.dirname(sys.executable))
    return [exe] if exe else [sys.executable, "-m", "expo_dist.cli"]


def child_env(extra_args: list[str], src: str = ROOT, base: dict | None = None) -> dict:
    """The environment of a merge subprocess: the expo_dist package of the checkout src first on its path."""
    env = dict(os.environ if base is None else base)
    if "--address" not in extra_args:
        env.pop("RAY_ADDRESS", None)  # an embedded Ray, not whatever cluster the caller's shell points at
    env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def run_sampled(cmd: list[str], env: dict, log_path: str, timeout: float | None) -> dict:
    """Run cmd, sampling its process tree's RSS; wall seconds, rc, stdout, stderr tail, RSS summary.

    It runs in the log's folder: Ray puts the driver's working directory on its workers' sys.path, so a
    merge started from a checkout would have its workers import that checkout's expo_dist."""
    with open(log_path, "w") as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=err, text=True,
                                cwd=os.path.dirname(os.path.abspath(log_path)))
        sampler = TreeSampler(proc.pid)
        sampler.start()
        try:
            stdout, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.terminate()
            try:
                stdout, _ = proc.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                stdout, _ = proc.communicate()
            stdout = (stdout or "") + f"\n[bench: killed after {timeout}s]"
        except BaseException:
            proc.terminate()
            proc.wait()
            raise
        finally:
            wall = time.perf_counter() - t0
            sampler.stop()
    with open(log_path, errors="replace") as f:
        stderr = f.read()
    return {"wall": wall, "rc": proc.returncode, "stdout": stdout, "stderr_tail": stderr[-3000:],
            "rss": sampler.summary(), "sampler": sampler}


def run_merge(sft: str, aligned: str, alpha_args: list[str], out: str, extra: list[str], env: dict,
              timeout: float | None, log_path: str) -> dict:
    cmd = merge_cli() + ["merge", "--sft", sft, "--aligned", aligned, *alpha_args, "--out", out,
                         "--json", "-q", *extra]
    r = run_sampled(cmd, env, log_path, timeout)
    r["cmd"] = cmd
    r["json"] = None
    try:
        r["json"] = json.loads(r["stdout"])
    except (ValueError, TypeError):
        pass
    manifest = os.path.join(out, MANIFEST)
    r["manifest"] = json.load(open(manifest)) if os.path.exists(manifest) else None
    r["out_bytes"] = nbytes(tree_weight_files(out)) if os.path.isdir(out) else 0
    ms = None
    for doc in (r["json"], r["manifest"]):
        if isinstance(doc, dict) and isinstance(doc.get("merge_seconds"), (int, float)):
            ms = float(doc["merge_seconds"])
            break
    r["merge_seconds"] = ms
    return r


def machine(src: str = ROOT) -> dict:
    """The machine and the software a benchmark ran on (git describe of the checkout src)."""
    info = {"cpus": os.cpu_count(), "ram_gib": round(psutil.virtual_memory().total / GiB, 1),
            "python": platform.python_version(), "platform": platform.platform()}
    try:
        import ray
        import torch

        info.update(torch=torch.__version__, ray=ray.__version__)
    except ImportError:
        pass
    try:
        info["git"] = subprocess.run(["git", "-C", src, "describe", "--always", "--dirty"], capture_output=True,
                                     text=True).stdout.strip() or "not a git checkout"
    except OSError:
        pass
    return info
