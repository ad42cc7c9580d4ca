"""The ray_startup phase: how long a bare Ray takes to start and stop here, as the merge's driver starts it."""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time

CODE = ("import logging, ray; ray.init(address='local', include_dashboard=False, "
        "logging_level=logging.WARNING); ray.shutdown()")


def run(env: dict, timeout: float = 300) -> float:
    """Seconds of `python -c "import ray; ray.init(); ray.shutdown()"`, started as expo_dist's driver starts
    its embedded Ray: address="local" (plain ray.init() joins the cluster /tmp/ray/ray_current_cluster names,
    which may be someone else's `ray start`, or a dead one: it then hangs), no dashboard."""
    t0 = time.perf_counter()
    try:
        r = subprocess.run([sys.executable, "-c", CODE], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                           text=True, cwd=tempfile.gettempdir(), timeout=timeout)
    except subprocess.TimeoutExpired:
        raise SystemExit(f"bench: ray start-up baseline did not finish in {timeout:.0f}s") from None
    dt = time.perf_counter() - t0
    if r.returncode:
        raise SystemExit(f"bench: ray start-up baseline failed:\n{r.stderr[-2000:]}")
    return dt
