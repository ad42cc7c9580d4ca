"""Ray at the edge: start or join Ray, place worker actors, schedule tasks, retry, seal files."""

from __future__ import annotations

import logging
import os
import sys
import time
from collections import defaultdict, deque
from dataclasses import dataclass, field
from typing import Callable

from .errors import ExpoError, MergeFailed
from .plan import Plan, Task

log = logging.getLogger("expo_dist")
IN_FLIGHT = 2  # tasks queued per actor: one runs while the next waits


def connect(address: str | None, num_cpus: int | None = None) -> bool:
    """Join the cluster at address, or start an embedded Ray. Returns True if we started Ray."""
    import ray

    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    kwargs = dict(logging_level=logging.WARNING, log_to_driver=True, configure_logging=True)
    try:
        if address:
            ray.init(address=address, **kwargs)
            return False
        ray.init(num_cpus=num_cpus, include_dashboard=False, **kwargs)
        return True
    except ConnectionError as e:
        raise ExpoError(f"cannot connect to Ray at {address!r}: {e}") from None


class Progress:
    def __init__(self, total: int, stream=sys.stderr):
        self.total, self.done, self.stream = total, 0, stream
        self.t0 = time.monotonic()
        self.last = 0.0
        self.tty = stream.isatty()

    def add(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if now - self.last < (0.2 if self.tty else 5.0) and self.done < self.total:
            return
        self.last = now
        el = max(now - self.t0, 1e-9)
        rate = self.done / el
        eta = (self.total - self.done) / rate if rate > 0 else float("inf")
        pct = 100.0 * self.done / max(self.total, 1)
        msg = (f"merge {pct:5.1f}%  {self.done / 1e9:.2f}/{self.total / 1e9:.2f} GB  "
               f"{rate / 1e9:.2f} GB/s  ETA {eta:5.0f}s")
        self.stream.write(("\r" + msg) if self.tty else msg + "\n")
        if self.tty and self.done >= self.total:
            self.stream.write("\n")
        self.stream.flush()


@dataclass
class RunStats:
    workers: list[dict] = field(default_factory=list)
    sealed: dict[str, dict] = field(default_factory=dict)
    differs: set = field(default_factory=set)
    nonfinite_out: int = 0
    attempts: int = 0
    seconds: float = 0.0


class Scheduler:
    """Hands tasks to actors, keeping each output file on one node where it can."""

    def __init__(self, plan: Plan, out_dir: str, workers: int | None, max_attempts: int,
                 skip: set[int] = frozenset(), on_done: Callable | None = None):
        import ray

        self.ray = ray
        self.plan, self.out_dir, self.max_attempts = plan, out_dir, max_attempts
        self.on_done = on_done
        self.todo: dict[str, deque[Task]] = defaultdict(deque)
        for t in plan.tasks:
            if t.id not in skip:
                self.todo[t.file].append(t)
        self.unclaimed = deque(f for f in (s.file for s in plan.shards) if self.todo.get(f))
        self.owner: dict[str, str] = {}  # file -> node that claimed it
        self.remaining = {f: len(q) for f, q in self.todo.items()}
        self.to_seal: deque[str] = deque(s.file for s in plan.shards if not self.todo.get(s.file))
        self.attempts: dict[int, int] = defaultdict(int)
        res = ray.cluster_resources()
        gpus, cpus = int(res.get("GPU", 0)), max(1, int(res.get("CPU", 1)))
        self.device = "cuda" if gpus else "cpu"
        n = gpus if gpus else cpus
        if workers:
            n = min(n, workers) if gpus else workers
        self.n = max(1, min(n, len(plan.tasks) or 1))
        self.opts = dict(num_gpus=1, num_cpus=0) if gpus else dict(num_cpus=1 if workers is None or workers <= cpus else 0)
        self.actors: dict = {}  # actor handle -> info
        self.stats = RunStats()

    def _spawn(self):
        from .worker import MergeWorker

        a = MergeWorker.options(scheduling_strategy="SPREAD", max_restarts=0, **self.opts).remote(
            self.out_dir, self.device)
        return a

    def _start_actors(self, k: int) -> None:
        new = [self._spawn() for _ in range(k)]
        infos = self.ray.get([a.info.remote() for a in new])
        for a, info in zip(new, infos):
            info["tasks"] = 0
            info["bytes"] = 0
            self.actors[a] = info
            self.stats.workers.append(info)

    def _next_task(self, node: str) -> Task | None:
        mine = [f for f, n in self.owner.items() if n == node and self.todo[f]]
        if not mine and self.unclaimed:
            f = self.unclaimed.popleft()
            self.owner[f] = node
            mine = [f]
        if mine:
            return self.todo[mine[0]].popleft()
        others = [f for f in self.todo if self.todo[f]]
        if others:  # the tail: help another node rather than sit idle
            return self.todo[max(others, key=lambda f: len(self.todo[f]))].popleft()
        return None

    def run(self, progress: Progress | None = None) -> RunStats:
        ray = self.ray
        t0 = time.monotonic()
        self._start_actors(self.n)
        pending: dict = {}  # ref -> (kind, actor, payload)
        load: dict = defaultdict(int)
        seals = []

        def feed(actor):
            while load[actor] < IN_FLIGHT:
                node = self.actors[actor]["node_id"]
                if self.to_seal:
                    mine = [f for f in self.to_seal if self.owner.get(f) == node]
                    f = mine[0] if mine else self.to_seal[0]
                    self.to_seal.remove(f)
                    pending[actor.seal.remote(f)] = ("seal", actor, f)
                    load[actor] += 1
                    continue
                task = self._next_task(node)
                if task is None:
                    return
                self.attempts[task.id] += 1
                pending[actor.run.remote(task)] = ("task", actor, task)
                load[actor] += 1

        for a in list(self.actors):
            feed(a)
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            ref = ready[0]
            kind, actor, payload = pending.pop(ref)
            load[actor] -= 1
            try:
                result = ray.get(ref)
            except (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError,
                    ray.exceptions.NodeDiedError, ray.exceptions.ObjectLostError,
                    ray.exceptions.OwnerDiedError) as e:
                self._lost(actor, payload, kind, e, pending, load)
                for a in list(self.actors):
                    feed(a)
                continue
            except ray.exceptions.RayTaskError as e:
                cause = e.cause if hasattr(e, "cause") else None
                if isinstance(cause, ExpoError):
                    raise cause.__class__(str(cause)) from None
                raise MergeFailed(f"task {getattr(payload, 'id', payload)} failed: {str(e).splitlines()[-1]}") from None
            if kind == "task":
                info = self.actors[actor]
                info["tasks"] += 1
                info["bytes"] += result.nbytes
                self.stats.differs.update(result.differs)
                self.stats.nonfinite_out += result.nonfinite_out
                if self.on_done:
                    self.on_done(payload, result)
                if progress:
                    progress.add(result.nbytes)
                self.remaining[payload.file] -= 1
                if self.remaining[payload.file] == 0:
                    self.to_seal.append(payload.file)
            else:
                self.stats.sealed[payload] = result
            for a in list(self.actors):
                feed(a)
        self.stats.attempts = sum(self.attempts.values())
        self.stats.seconds = time.monotonic() - t0
        for a in list(self.actors):
            ray.kill(a)
        return self.stats

    def _lost(self, actor, payload, kind, err, pending, load) -> None:
        """An actor or its node died: give its queued work back and start a replacement."""
        ray = self.ray
        if actor in self.actors:
            info = self.actors.pop(actor)
            log.warning("worker %s on %s died (%s); rescheduling its tasks",
                        info.get("pid"), info.get("hostname"), err.__class__.__name__)
            try:
                ray.kill(actor, no_restart=True)
            except Exception:
                pass
            # requeue everything else that actor still held
            for ref, (k, a, p) in list(pending.items()):
                if a is actor:
                    pending.pop(ref)
                    self._requeue(k, p, err)
            load.pop(actor, None)
            self._start_actors(1)
        self._requeue(kind, payload, err)

    def _requeue(self, kind, payload, err) -> None:
        if kind == "seal":  # seal again on any worker: the bytes are on the shared output path
            self.to_seal.append(payload)
            return
        task: Task = payload
        if self.attempts[task.id] >= self.max_attempts:
            raise MergeFailed(f"task {task.id} ({task.file} bytes {task.begin}-{task.end}) failed "
                              f"{self.attempts[task.id]} times; last error: {str(err).splitlines()[0]}")
        self.todo[task.file].appendleft(task)
        self.owner.pop(task.file, None)
        if task.file not in self.unclaimed:
            self.unclaimed.appendleft(task.file)
