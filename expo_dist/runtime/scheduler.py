"""Ray at the edge: place worker actors, schedule tasks on them, retry, seal files (session.py starts Ray)."""

from __future__ import annotations

import itertools
import logging
import os
import time
from collections import defaultdict, deque
from collections.abc import Callable
from dataclasses import dataclass, field

from ..errors import ExpoError, MergeFailed, check_terminated
from ..planning.plan import Plan, Task
from ..sources.refs import is_ref
from .session import Progress

log = logging.getLogger("expo_dist")
IN_FLIGHT = 2  # tasks queued per actor: one runs while the next waits
HASH_STEP = 256 << 20  # bytes: how often a file's hasher is told that more of it is final
POLL = 1.0  # seconds: the longest wait for a worker before looking at the SIGTERM flag again
START_TIMEOUT = 300.0  # seconds to wait for a replacement worker when no worker is left


@dataclass
class RunStats:
    workers: list[dict] = field(default_factory=list)
    sealed: dict[int, dict[str, dict]] = field(default_factory=dict)  # output number -> file -> sha256, size
    differs: set = field(default_factory=set)
    nonfinite_out: int = 0
    nonfinite_in: int | None = None  # None: the workers do not count non-finite inputs
    attempts: int = 0
    seconds: float = 0.0


def placement(device: str, resources: dict, workers: int | None) -> tuple[str, int, dict]:
    """(worker device, how many workers, their Ray resource request) for --device on a cluster with these
    resources (ray.cluster_resources()): a worker per GPU, else one per CPU; --workers caps the GPU workers
    and sets the number of CPU workers."""
    if device not in ("auto", "cuda", "cpu"):
        raise ExpoError(f"--device {device!r}: give auto, cuda or cpu")
    gpus, cpus = int(resources.get("GPU", 0)), max(1, int(resources.get("CPU", 1)))
    if device == "cuda" and not gpus:
        raise ExpoError("--device cuda: the Ray cluster has no GPU; use --device cpu (or auto, which uses GPUs "
                        "where there are any) to merge on the CPUs")
    if gpus and device != "cpu":
        return "cuda", min(gpus, workers) if workers else gpus, dict(num_gpus=1, num_cpus=0)
    return "cpu", workers or cpus, dict(num_cpus=1 if workers is None or workers <= cpus else 0)


class Scheduler:
    """Hands tasks to actors, keeping each output file on one node where it can."""

    def __init__(self, plan: Plan, out_dirs: str | list[str], workers: int | None, max_attempts: int,
                 skip: set[int] = frozenset(), on_done: Callable | None = None, cache_dir: str | None = None,
                 io: str = "auto", device: str = "auto", worker_args: dict | None = None):
        """device: auto (a worker per GPU where the cluster has GPUs, else one per CPU), cuda (GPUs or fail),
        cpu (never ask for a GPU). worker_args: more keyword arguments for every MergeWorker (self_check,
        kernel: the tests inject a faulty kernel this way)."""
        import ray

        self.ray = ray
        self.plan, self.max_attempts, self.cache_dir, self.io = plan, max_attempts, cache_dir, io
        self.out_dirs = [out_dirs] if isinstance(out_dirs, str) else list(out_dirs)
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
        # sha256 along the write frontier: per file, its tasks in order, which are done, the hashing actor
        self.by_file: dict[str, list[Task]] = defaultdict(list)
        for t in sorted(plan.tasks, key=lambda t: t.begin):
            self.by_file[t.file].append(t)
        self.done_ids: set[int] = set(skip)
        self.file_inputs: dict[str, set[str]] = defaultdict(set)  # output file -> input files its tasks read
        for t in plan.tasks:
            self.file_inputs[t.file].update(t.input_files)
        self.hub = any(is_ref(f) for fs in self.file_inputs.values() for f in fs)
        self.node_inputs: dict[str, set[str]] = defaultdict(set)  # node -> input files its workers read
        self.frontier: dict[str, int] = {s.file: 0 for s in plan.shards}  # index of the first unfinished task
        self.hashed_to: dict[str, int] = {}  # file -> bytes the hasher was told are final
        self.hasher: dict[str, object] = {}  # file -> actor hashing it
        self.worker_args = dict(worker_args or {})
        self.device, n, self.opts = placement(device, ray.cluster_resources(), workers)
        self.n = max(1, min(n, len(plan.tasks) or 1))
        self.actors: dict = {}  # actor handle -> info
        self.starting: set = set()  # replacement actors not yet up
        self.failed_starts, self.last_start_error = 0, ""
        self.last_error: dict[int, str] = {}
        self.seq = itertools.count()
        self.stats = RunStats()

    def _spawn(self):
        from ..sources.fetch import worker_env
        from .worker import MergeWorker

        # Hub settings travel with the actors when the plan reads from the Hub. Without a runtime_env an actor
        # can take one of the idle worker processes Ray started with itself instead of a new process.
        env = worker_env() if self.hub else {}
        opts = dict(runtime_env={"env_vars": env}) if env else {}
        return MergeWorker.options(scheduling_strategy="SPREAD", max_restarts=0, **opts, **self.opts).remote(
            self.out_dirs, self.device, self.cache_dir, self.io, **self.worker_args)

    def _start_actors(self, k: int) -> None:
        new = [self._spawn() for _ in range(k)]
        self.starting.update(new)  # (killed at the end whatever happens)
        refs = [a.info.remote() for a in new]
        for a, ref in zip(new, refs):
            try:
                info = self.ray.get(ref)
            except self.ray.exceptions.RayError as e:  # it died starting: the loop starts a replacement
                self.failed_starts += 1
                self.last_start_error = f"{e.__class__.__name__}: {_first_line(e)}"
                log.warning("a worker did not start (%s)", self.last_start_error)
                self.starting.discard(a)
                continue
            self._register(a, info)
            self.starting.discard(a)

    def _register(self, actor, info: dict) -> None:
        if info.get("error"):  # a GPU that cannot run the kernel or fails its self-check: no retry, one line
            try:
                self.ray.kill(actor, no_restart=True)
            except Exception:  # pragma: no cover - already gone
                pass
            raise MergeFailed(info["error"])
        info["tasks"] = 0
        info["bytes"] = 0
        self.actors[actor] = info
        self.stats.workers.append(info)

    def _replace(self, pending: dict) -> None:
        """Start a replacement actor without waiting for it: it may never fit (its node is gone, and every
        other CPU or GPU is taken by a live worker), and then the live workers finish the merge alone."""
        if self.failed_starts >= self.max_attempts:
            raise MergeFailed(f"no worker could be started ({self.failed_starts} tries); last error: "
                              f"{self.last_start_error}")
        a = self._spawn()
        self.starting.add(a)
        pending[a.info.remote()] = ("start", a, None, next(self.seq))

    def _next_task(self, node: str) -> Task | None:
        mine = [f for f, n in self.owner.items() if n == node and self.todo[f]]
        if not mine and self.unclaimed:
            # prefer the output file whose inputs this node already read (Hub inputs: already in its cache)
            have = self.node_inputs.get(node, set())
            f = max(self.unclaimed, key=lambda f: len(self.file_inputs[f] & have)) if have else self.unclaimed[0]
            self.unclaimed.remove(f)
            self.owner[f] = node
            mine = [f]
        if mine:
            return self.todo[mine[0]].popleft()
        others = [f for f in self.todo if self.todo[f]]
        if others:  # the tail: help another node rather than sit idle
            return self.todo[max(others, key=lambda f: len(self.todo[f]))].popleft()
        return None

    def run(self, progress: Progress | None = None) -> RunStats:
        t0 = time.monotonic()
        try:
            self._start_actors(self.n)
            self._loop(progress, t0)
            for a, info in list(self.actors.items()):  # which Hub files each worker fetched
                try:
                    info["fetched"] = self.ray.get(a.fetched.remote(), timeout=60)
                except Exception as e:  # pragma: no cover - a worker lost at the very end
                    info["fetched_error"] = _first_line(e)
        finally:  # on failure too: on a shared cluster, live actors would keep holding their CPUs / GPUs
            for a in list(self.actors) + list(self.starting):
                try:
                    self.ray.kill(a, no_restart=True)
                except Exception:  # pragma: no cover - the actor or the cluster is already gone
                    pass
        self.stats.attempts = sum(self.attempts.values())
        self.stats.seconds = time.monotonic() - t0
        return self.stats

    def _loop(self, progress: Progress | None, t0: float) -> None:
        ray = self.ray
        pending: dict = {}  # ref -> (kind, actor, payload, submission number)
        load: dict = defaultdict(int)

        def feed(actor):
            while load[actor] < IN_FLIGHT:
                node = self.actors[actor]["node_id"]
                ours = [f for f in self.to_seal if self.hasher.get(f, actor) is actor]
                if ours:  # seal where the file was hashed; a file whose hasher died is hashed anew here
                    f = ours[0]
                    self.to_seal.remove(f)
                    self.hasher[f] = actor
                    pending[actor.seal.remote(self._paths(f))] = ("seal", actor, f, next(self.seq))
                    load[actor] += 1
                    continue
                task = self._next_task(node)
                if task is None:
                    return
                self.attempts[task.id] += 1
                pending[actor.run.remote(task)] = ("task", actor, task, next(self.seq))
                load[actor] += 1

        for f in self.frontier:  # a resumed merge: hash what is already done
            self._advance_hash(f, pending, None)
        idle_since = time.monotonic()
        while True:
            check_terminated()
            for a in list(self.actors):
                feed(a)
            busy = any(v[0] != "start" for v in pending.values())
            if not busy and not self.to_seal and not any(self.todo.values()):
                return
            if not self.actors and not self.starting:
                self._replace(pending)
            # with no live worker, wait for a replacement only so long; wake up now and then to see the SIGTERM flag
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=POLL)
            if ready or self.actors:
                idle_since = time.monotonic()
            if not ready and time.monotonic() - idle_since < START_TIMEOUT:
                continue
            if not ready:
                raise MergeFailed(f"no worker left and none could be started in {START_TIMEOUT:.0f}s (has the "
                                  "cluster lost its nodes?); rerun the same command to resume")
            ref = ready[0]
            kind, actor, payload, seq = pending.pop(ref)
            if kind == "start":
                self.starting.discard(actor)
                try:
                    self._register(actor, ray.get(ref))
                except ray.exceptions.RayError as e:
                    self.failed_starts += 1
                    self.last_start_error = f"{e.__class__.__name__}: {_first_line(e)}"
                    log.warning("a replacement worker did not start (%s)", self.last_start_error)
                continue
            if kind != "hash":
                load[actor] -= 1
            try:
                result = ray.get(ref)
            except (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError,
                    ray.exceptions.NodeDiedError, ray.exceptions.ObjectLostError,
                    ray.exceptions.OwnerDiedError) as e:
                self._lost(actor, kind, payload, seq, e, pending, load)
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
                if getattr(result, "nonfinite_in", None) is not None:
                    self.stats.nonfinite_in = (self.stats.nonfinite_in or 0) + result.nonfinite_in
                if self.on_done:
                    self.on_done(payload, result)
                if progress:
                    progress.add(result.nbytes)
                self.remaining[payload.file] -= 1
                self.done_ids.add(payload.id)
                self.node_inputs[info["node_id"]].update(payload.input_files)
                self._advance_hash(payload.file, pending, actor)
                if self.remaining[payload.file] == 0:
                    log.info("all tasks of %s done at %.2fs", payload.file, time.monotonic() - t0)
                    self.to_seal.append(payload.file)
            elif kind == "seal":
                for k, rec in enumerate(result):
                    self.stats.sealed.setdefault(k, {})[payload] = rec
                log.info("sealed %s at %.2fs", payload, time.monotonic() - t0)

    def _paths(self, fname: str) -> list[str]:
        return [os.path.join(d, fname) for d in self.out_dirs]

    def _advance_hash(self, fname: str, pending: dict, actor) -> None:
        """Tell the file's hasher how far the file is final (its finished prefix), every HASH_STEP bytes."""
        tasks, i = self.by_file.get(fname, []), self.frontier[fname]
        while i < len(tasks) and tasks[i].id in self.done_ids:
            i += 1
        self.frontier[fname] = i
        upto = tasks[i - 1].end if i else 0
        complete = i == len(tasks)
        if upto <= self.hashed_to.get(fname, 0) or (not complete and upto - self.hashed_to.get(fname, 0) < HASH_STEP):
            return
        hasher = self.hasher.get(fname)
        if hasher is None:
            if actor is None or actor not in self.actors:
                if not self.actors:
                    return
                actor = next(iter(self.actors))
            hasher = self.hasher[fname] = actor
        self.hashed_to[fname] = upto
        pending[hasher.hash_advance.remote(self._paths(fname), upto)] = ("hash", hasher, fname, next(self.seq))

    def _lost(self, actor, kind, payload, seq, err, pending, load) -> None:
        """An actor or its node died: give back all it held and start a replacement.

        An actor runs its calls one at a time in the order they were sent, so of what it held only the
        earliest was running; the others never started and do not count as attempts."""
        ray = self.ray
        info = self.actors.pop(actor, None) or {}
        info["died"] = f"{err.__class__.__name__}: {_first_line(err)}"
        log.warning("worker %s on %s died (%s); rescheduling its tasks",
                    info.get("pid"), info.get("hostname"), err.__class__.__name__)
        try:
            ray.kill(actor, no_restart=True)
        except Exception:  # pragma: no cover - already gone
            pass
        for fname in [f for f, a in self.hasher.items() if a is actor]:  # its hash state is gone
            del self.hasher[fname]
            self.hashed_to.pop(fname, None)
        held = [(kind, payload, seq)]
        for ref, (k, a, p, q) in list(pending.items()):
            if a is actor:
                pending.pop(ref)
                held.append((k, p, q))
        held = [h for h in held if h[0] != "hash"]
        load.pop(actor, None)
        running = min((q for _, _, q in held), default=None)
        where = f"worker pid {info.get('pid')} on {info.get('hostname')} died ({info['died']})"
        for k, p, q in sorted(held, key=lambda h: -h[2]):  # requeued at the front: the running one first
            self._requeue(k, p, where, started=q == running)
        for fname in list(self.frontier):  # hash again from the start on another worker
            if fname not in self.hasher and fname not in self.to_seal and fname not in self.stats_sealed_files():
                self._advance_hash(fname, pending, None)
        self._replace(pending)

    def stats_sealed_files(self) -> set:
        return set(self.stats.sealed.get(0, {}))

    def _requeue(self, kind, payload, err: str, started: bool = True) -> None:
        if kind == "seal":  # seal again on any worker: the bytes are on the shared output path
            self.to_seal.append(payload)
            return
        task: Task = payload
        if not started:
            self.attempts[task.id] -= 1
        else:
            self.last_error[task.id] = err
        if self.attempts[task.id] >= self.max_attempts:
            raise MergeFailed(f"task {task.id} ({task.file} bytes {task.begin}-{task.end}) failed "
                              f"{self.attempts[task.id]} times (--max-attempts {self.max_attempts}); last error: "
                              f"{self.last_error.get(task.id, err)}")
        self.todo[task.file].appendleft(task)
        self.owner.pop(task.file, None)
        if task.file not in self.unclaimed:
            self.unclaimed.appendleft(task.file)


def _first_line(err: BaseException) -> str:
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    return lines[0] if lines else err.__class__.__name__
