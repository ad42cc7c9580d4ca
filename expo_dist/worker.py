"""The Ray actor around Runner: one per GPU where GPUs exist, else one per CPU."""

from __future__ import annotations

import json
import os
import socket
import time

import ray

from .hashing import FileHasher

# Test-only fault injection for tests/test_faults.py and tests/test_resume.py; never set in production.
# EXPO_TEST_TASK_DELAY=seconds: each task sleeps after writing its bytes and before reporting back, so a test
#   can kill a worker, a node or the driver mid-merge.
# EXPO_TEST_FAULTS=path of a JSON file, re-read before every task (a test changes it between merges that share
#   one Ray): {"delay": seconds, "crash": [task ids whose worker process exits at once, before writing]}.
TEST_DELAY_ENV = "EXPO_TEST_TASK_DELAY"
TEST_FAULTS_ENV = "EXPO_TEST_FAULTS"


def _test_faults(task_id: int, default_delay: float) -> float:
    """Test-only (see above): crash this process if told to; return the delay for this task."""
    path = os.environ.get(TEST_FAULTS_ENV)
    if not path:
        return default_delay
    try:
        with open(path, encoding="utf-8") as f:
            faults = json.load(f)
    except (OSError, ValueError):
        return default_delay
    if task_id in faults.get("crash", ()):
        os._exit(17)
    return float(faults.get("delay", default_delay))


@ray.remote(max_restarts=3, max_task_retries=0)
class MergeWorker:
    def __init__(self, out_dirs: list[str], device: str, cache_dir: str | None = None, io: str = "auto"):
        from .execute import Runner

        if device == "cuda":  # torch only where a GPU is used: a CPU worker with the C kernel never imports it
            import torch

            device = f"cuda:{torch.cuda.current_device()}"
        self.io = io
        self.runner = Runner(out_dirs, device, cache_dir=cache_dir, io=io)
        self.hashers: dict[str, FileHasher] = {}
        self.tasks_done = 0
        self.bytes_done = 0
        self.test_delay = float(os.environ.get(TEST_DELAY_ENV) or 0)  # test-only, see TEST_DELAY_ENV
        self.test_faults = bool(os.environ.get(TEST_FAULTS_ENV))  # test-only, see TEST_FAULTS_ENV

    def info(self) -> dict:
        return {"node_id": ray.get_runtime_context().get_node_id(), "hostname": socket.gethostname(),
                "pid": os.getpid(), "device": str(self.runner.device)}

    def run(self, task):
        delay = _test_faults(task.id, self.test_delay) if self.test_faults else self.test_delay  # test-only
        res = self.runner.run(task)
        if delay:  # test-only: keep each task running a while so tests can kill things mid-merge
            time.sleep(delay)
        self.tasks_done += 1
        self.bytes_done += res.nbytes
        return res

    def fetched(self) -> list[dict]:
        """The Hub weight files this worker fetched (or found in its node's cache)."""
        from . import fetch

        return fetch.fetched()

    def hash_advance(self, paths: list[str], upto: int) -> None:
        """The first `upto` bytes of these files are final: hash them in the background."""
        for path in paths:
            h = self.hashers.get(path)
            if h is None:
                h = self.hashers[path] = FileHasher(path, self.io)
            h.advance(upto)

    def seal(self, paths: list[str]) -> list[dict]:
        """fsync output files and return their sha256 (most of each already hashed along the way)."""
        out = []
        for path in paths:
            fd = os.open(path, os.O_RDWR)
            try:
                os.fsync(fd)
                size = os.fstat(fd).st_size
            finally:
                os.close(fd)
            h = self.hashers.pop(path, None) or FileHasher(path, self.io)
            out.append({"file": os.path.basename(path), "sha256": h.finish(size), "size": size})
        return out
