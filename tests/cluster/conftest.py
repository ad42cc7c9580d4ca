"""Shared helpers for the cluster entry-point tests: a real Slurm (.ci/slurm_up.sh) and `ray job submit`.

These tests drive the real command-line tools in subprocesses; the pytest process itself never joins
their Ray clusters (token auth state is cached per process, so touching them here could break other
tests' embedded Ray).
"""

from __future__ import annotations

import functools
import json
import os
import pathlib
import shutil
import socket
import subprocess
import sys
import time

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
SBATCH = ROOT / "slurm" / "expo_merge.sbatch"
ALPHA = 0.3
SEED = 11  # the inputs: pair_factory("small", seed=SEED), ~8 MB bf16 per model, shard boundaries differ per model
# Several output shards and ~10 tasks of ≤1 MiB: enough that both Ray nodes get work.
SPLIT_ARGS = ["--max-shard-size", "2MB", "--max-task-bytes", "1MiB"]

# The test modules import these helpers as `cluster_conftest`: the name `conftest` is shared with
# tests/conftest.py, and sys.modules["conftest"] is whichever pytest imported last.
sys.modules.setdefault("cluster_conftest", sys.modules[__name__])


# ---- what is installed / running ----------------------------------------------------------------

@functools.cache
def slurm_skip_reason() -> str | None:
    """None if a Slurm with ≥ 2 usable nodes answers, else why the Slurm tests are skipped.

    (Cached: sinfo takes ~9 s to give up on a controller that is down.)"""
    for tool in ("sbatch", "sinfo", "squeue", "scancel", "scontrol"):
        if shutil.which(tool) is None:
            return f"`{tool}` not on PATH: start a test Slurm with `bash .ci/slurm_up.sh`"
    try:
        r = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %t"], capture_output=True, text=True, timeout=15)
    except subprocess.TimeoutExpired:
        return "sinfo timed out: slurmctld not answering (`bash .ci/slurm_up.sh`)"
    if r.returncode != 0:
        return f"sinfo failed ({r.stderr.strip()[:200]}): is Slurm up? `bash .ci/slurm_up.sh`"
    usable = {line.split()[0] for line in r.stdout.splitlines()
              if len(line.split()) == 2 and line.split()[1].rstrip("*") in ("idle", "mix", "alloc", "comp")}
    if len(usable) < 2:
        return f"Slurm has {len(usable)} usable nodes, the test needs 2: {r.stdout.strip()!r}"
    return None


@functools.cache
def ray_job_skip_reason() -> str | None:
    if shutil.which("ray") is None:
        return "`ray` CLI not on PATH"
    try:
        import aiohttp  # noqa: F401
        import ray.dashboard.modules.job.sdk  # noqa: F401
    except ImportError as e:
        return f"`ray job submit` needs ray[default] (pip install 'expo_dist[job]'): {e}"
    if shutil.which("expo-dist") is None:
        return "`expo-dist` not on PATH (pip install -e .)"
    return None


# ---- inputs and checks --------------------------------------------------------------------------

def assert_exact_output(out, sft, aligned, alpha=ALPHA) -> int:
    """Every element equals float64 a + α·(a − s) rounded once to the output dtype (bf16 here).

    Uses expo_dist.testing.reference, which shares no code with the kernel (expo_dist.runtime): bf16 round-to-nearest-even on
    the float64 bit pattern (no float32 step, so no double rounding)."""
    from expo_dist.testing.reference import assert_exact

    out = pathlib.Path(out)
    assert (out / "model.safetensors.index.json").exists() or (out / "model.safetensors").exists(), \
        sorted(os.listdir(out))
    n = assert_exact(str(out), str(sft), str(aligned), alpha, tie=False)
    assert n > 1_000_000
    return n


def manifest_workers(out) -> list[dict]:
    return json.loads((pathlib.Path(out) / "expo_manifest.json").read_text())["workers"]


def looks_complete(out) -> list[str]:
    """Names in out that would make it look like a finished model."""
    out = pathlib.Path(out)
    return [n for n in ("model.safetensors.index.json", "model.safetensors") if (out / n).exists()]


# ---- processes ----------------------------------------------------------------------------------

def processes_of(*, slurm_job: str | None = None, markers: tuple[str, ...] = ()) -> list[str]:
    """Live processes that belong to a Slurm job (SLURM_JOB_ID in their environment) or whose command
    line holds one of markers (a Ray temp dir). Ray workers rename themselves ("ray::IDLE"), so the
    environment is the reliable test; the markers catch processes started outside Slurm."""
    import psutil

    found = []
    me = os.getpid()
    for p in psutil.process_iter(["pid", "cmdline", "status"]):
        try:
            if p.pid == me or p.info["status"] == psutil.STATUS_ZOMBIE:
                continue
            cmd = " ".join(p.info["cmdline"] or [])
            hit = any(m in cmd for m in markers)
            if not hit and slurm_job is not None:
                hit = p.environ().get("SLURM_JOB_ID") == str(slurm_job)
            if hit:
                found.append(f"{p.pid} {cmd[:160]}")
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


def wait_until(pred, timeout: float, every: float = 0.5):
    """Poll pred() until it returns a truthy value (returned) or timeout (returns the last value)."""
    end = time.monotonic() + timeout
    while True:
        v = pred()
        if v or time.monotonic() >= end:
            return v
        time.sleep(every)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


# ---- Slurm ---------------------------------------------------------------------------------------

def job_state(job_id: str) -> str:
    """Slurm job state (RUNNING, COMPLETED, CANCELLED, ...) or '' once slurmctld forgot the job."""
    r = subprocess.run(["scontrol", "-o", "show", "job", str(job_id)], capture_output=True, text=True, timeout=15)
    for field in r.stdout.split():
        if field.startswith("JobState="):
            return field.split("=", 1)[1]
    return ""


def slurm_env(**extra) -> dict:
    """The environment sbatch passes on to the job (sbatch exports it to the batch script and srun)."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("RAY_", "SLURM_", "EXPO_TEST_")) and k != "PYTEST_CURRENT_TEST"}
    env.update(extra)
    return env


def dump(path) -> str:
    try:
        return pathlib.Path(path).read_text(errors="replace")[-8000:]
    except OSError as e:
        return f"<{path}: {e}>"


def ray_logs(temp_dir, tail: int = 3000) -> str:
    """Tails of a Ray node's session logs (the .err/.out files and dashboard/agent logs), for failure messages."""
    logs = pathlib.Path(temp_dir) / "session_latest" / "logs"
    parts = []
    for f in [pathlib.Path(temp_dir) / "head.log", *(sorted(logs.glob("*")) if logs.is_dir() else [])]:
        if f.name.startswith(("python-core-", "worker-", "events")):
            continue  # one per worker process: too many; the node daemons' logs say who died
        if f.is_file() and (f.name == "head.log" or f.suffix in (".err", ".log") or f.name.startswith(("dashboard", "runtime_env", "raylet", "gcs_server"))):
            text = f.read_text(errors="replace").strip()
            if text:
                parts.append(f"--- {f.name} ---\n{text[-tail:]}")
    return "\n".join(parts) or f"<no Ray logs under {logs}>"


@pytest.fixture
def ray_tmp_cleanup():
    """Collects Ray temp dirs a test created and removes them afterwards."""
    dirs: list[str] = []
    yield dirs
    for d in dirs:
        shutil.rmtree(d, ignore_errors=True)
