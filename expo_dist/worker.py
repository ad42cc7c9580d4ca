"""The Ray actor around Runner: one per GPU where GPUs exist, else one per CPU."""

from __future__ import annotations

import hashlib
import os
import socket
import time

import ray

# Test-only: EXPO_TEST_TASK_DELAY=seconds makes each task sleep after writing its bytes and before reporting
# back, so the fault tests (tests/test_faults.py, tests/test_resume.py) can kill a worker, a node or the
# driver mid-merge. Never set it in production; unset or 0 means no delay.
TEST_DELAY_ENV = "EXPO_TEST_TASK_DELAY"


@ray.remote(max_restarts=3, max_task_retries=0)
class MergeWorker:
    def __init__(self, out_dir: str, device: str):
        import torch

        from .execute import Runner

        torch.set_num_threads(1)
        if device == "cuda":
            device = f"cuda:{torch.cuda.current_device()}"
        self.runner = Runner(out_dir, device)
        self.out_dir = out_dir
        self.tasks_done = 0
        self.bytes_done = 0
        self.test_delay = float(os.environ.get(TEST_DELAY_ENV) or 0)  # test-only, see TEST_DELAY_ENV

    def info(self) -> dict:
        return {"node_id": ray.get_runtime_context().get_node_id(), "hostname": socket.gethostname(),
                "pid": os.getpid(), "device": str(self.runner.device)}

    def run(self, task):
        res = self.runner.run(task)
        if self.test_delay:  # test-only: keep each task running a while so tests can kill things mid-merge
            time.sleep(self.test_delay)
        self.tasks_done += 1
        self.bytes_done += res.nbytes
        return res

    def seal(self, fname: str) -> dict:
        """fsync one output file and return its sha256 (the file is hot in this node's page cache)."""
        path = os.path.join(self.out_dir, fname)
        h = hashlib.sha256()
        fd = os.open(path, os.O_RDWR)
        try:
            os.fsync(fd)
            buf = bytearray(16 << 20)
            view = memoryview(buf)
            off = 0
            while True:
                n = os.preadv(fd, [view], off)
                if n == 0:
                    break
                h.update(view[:n])
                off += n
        finally:
            os.close(fd)
        return {"file": fname, "sha256": h.hexdigest(), "size": off}
