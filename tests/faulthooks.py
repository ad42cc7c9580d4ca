"""Test-only fault injection: hooks a merge's workers call around each task (Settings.test_hooks).

A test names these hooks with EXPO_TEST_HOOKS=HOOKS (read once, when the driver builds its Settings; each worker
actor then loads this file by path and makes one Hooks) and steers them with two variables the worker processes
see in their environment (embedded Ray and ray.cluster_utils nodes inherit the one they start with):

- EXPO_TEST_TASK_DELAY=seconds: each task sleeps after writing its bytes and before reporting back, so a test can
  kill a worker, a node or the driver mid-merge;
- EXPO_TEST_FAULTS=path of a JSON file, re-read before every task (a test changes it between merges that share one
  Ray): {"delay": seconds, "crash": [task ids whose worker process exits at once, before writing]}.

Nothing in expo_dist reads these two; only this file does, in the worker processes of tests.
"""

from __future__ import annotations

import json
import os
import time

HOOKS_ENV = "EXPO_TEST_HOOKS"
DELAY_ENV = "EXPO_TEST_TASK_DELAY"
FAULTS_ENV = "EXPO_TEST_FAULTS"
HOOKS = f"{os.path.abspath(__file__)}:Hooks"  # what EXPO_TEST_HOOKS names


def env(delay: float | None = None, faults: str | os.PathLike | None = None) -> dict[str, str]:
    """The environment variables that turn the hooks on: a delay per task, and/or a faults file."""
    out = {HOOKS_ENV: HOOKS}
    if delay is not None:
        out[DELAY_ENV] = str(delay)
    if faults is not None:
        out[FAULTS_ENV] = str(faults)
    return out


class Hooks:
    def __init__(self):
        self.default_delay = float(os.environ.get(DELAY_ENV) or 0)
        self.delay = self.default_delay

    def before(self, task) -> None:
        """Crash this worker process if the faults file says so; take this task's delay from it."""
        self.delay = self.default_delay
        path = os.environ.get(FAULTS_ENV)
        if not path:
            return
        try:
            with open(path, encoding="utf-8") as f:
                faults = json.load(f)
        except (OSError, ValueError):
            return
        if task.id in faults.get("crash", ()):
            os._exit(17)
        self.delay = float(faults.get("delay", self.default_delay))

    def after(self, task, result) -> None:
        """Keep the task running a while, so tests can kill things mid-merge."""
        if self.delay:
            time.sleep(self.delay)
