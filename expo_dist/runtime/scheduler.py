"""Ray at the edge: place worker actors, schedule tasks on them, retry, seal files (session.py starts Ray;
filestate.py keeps, without Ray, which node owns which file and how far each file is hashed)."""

from __future__ import annotations

import itertools
import logging
import os
import time
from collections import defaultdict, deque
from collections.abc import Callable

from ..errors import ExpoError, MergeFailed, check_terminated
from ..planning.plan import Plan, Task
from ..settings import Settings
from ..sources.refs import is_ref
from ..sources.s3 import is_s3
from .calls import HashCall, Pending, RunStats, SealCall, StartCall, TaskCall, placement
from .filestate import FileOwnership, HashFrontier
from .session import Progress

log = logging.getLogger("expo_dist")
IN_FLIGHT = 2  # tasks queued per actor: one runs while the next waits
POLL = 1.0  # seconds: the longest wait for a worker before looking at the SIGTERM flag again
START_TIMEOUT = 300.0  # seconds to wait for a replacement worker when no worker is left


class Scheduler:
    """Hands tasks to actors, keeping each output file on one node where it can."""

    def __init__(self, plan: Plan, out_dirs: str | list[str], workers: int | None, max_attempts: int,
                 skip: set[int] = frozenset(), on_done: Callable | None = None, cache_dir: str | None = None,
                 settings: Settings | None = None, device: str = "auto", worker_args: dict | None = None):
        """device: auto (a worker per GPU where the cluster has GPUs, else one per CPU), cuda (GPUs or fail),
        cpu (never ask for a GPU). settings: the merge's settings.Settings (made once on the driver; the defaults
        when None), handed to every worker. worker_args: more keyword arguments for every MergeWorker
        (self_check, kernel: the tests inject a faulty kernel this way)."""
        import ray

        self.ray = ray
        self.plan, self.max_attempts, self.cache_dir = plan, max_attempts, cache_dir
        self.settings = settings if settings is not None else Settings()
        self.out_dirs = [out_dirs] if isinstance(out_dirs, str) else list(out_dirs)
        self.on_done = on_done
        files = [s.file for s in plan.shards]
        self.files = FileOwnership(files, plan.tasks, skip)  # which node writes which file; tasks left
        self.frontier = HashFrontier(files, plan.tasks, skip)  # sha256 along each file's write frontier
        self.hasher: dict[str, object] = {}  # file -> actor hashing it
        # files on a shared path are sealed (fsynced, hashed) by the workers; an object-store output's uploads are
        # completed by its writer on the driver
        self.sealing = all(isinstance(d, str) for d in self.out_dirs)
        self.to_seal: deque[str] = deque(f for f in files if self.sealing and not self.files.has_work(f))
        self.attempts: dict[int, int] = defaultdict(int)
        self.last_error: dict[int, str] = {}
        self.hub = any(is_ref(f) for t in plan.tasks for f in t.input_files)
        self.s3 = not self.sealing or any(is_s3(f) for t in plan.tasks for f in t.input_files)
        self.worker_args = dict(worker_args or {})
        self.device, n, self.opts = placement(device, ray.cluster_resources(), workers)
        self.n = max(1, min(n, len(plan.tasks) or 1))
        self.actors: dict = {}  # actor handle -> info
        self.starting: set = set()  # replacement actors not yet up
        self.failed_starts, self.last_start_error = 0, ""
        self.pending: dict[object, Pending] = {}  # ref -> what the call was
        self.load: dict = defaultdict(int)  # actor -> its task and seal calls in flight
        self.seq = itertools.count()
        self.stats = RunStats()

    def _spawn(self):
        from ..sources import fetch, s3
        from .worker import MergeWorker

        # Hub and S3 settings travel with the actors when the plan reads from the Hub or S3 or writes to S3. Without
        # a runtime_env an actor can take one of the idle worker processes Ray started with itself instead of a new
        # process.
        env = {**(fetch.worker_env() if self.hub else {}), **(s3.worker_env() if self.s3 else {})}
        opts = dict(runtime_env={"env_vars": env}) if env else {}
        return MergeWorker.options(scheduling_strategy="SPREAD", max_restarts=0, **opts, **self.opts).remote(
            self.out_dirs, self.device, self.cache_dir, self.settings, **self.worker_args)

    def _start_actors(self, k: int) -> None:
        new = [self._spawn() for _ in range(k)]
        self.starting.update(new)  # (killed at the end whatever happens)
        refs = [a.info.remote() for a in new]
        for a, ref in zip(new, refs):
            try:
                info = self.ray.get(ref)
            except self.ray.exceptions.RayError as e:  # it died starting: the loop starts a replacement
                self._start_failed("a worker", e)
                self.starting.discard(a)
                continue
            self._register(a, info)
            self.starting.discard(a)

    def _start_failed(self, what: str, e: BaseException) -> None:
        self.failed_starts += 1
        self.last_start_error = f"{e.__class__.__name__}: {_first_line(e)}"
        log.warning("%s did not start (%s)", what, self.last_start_error)

    def _register(self, actor, info: dict) -> None:
        if info.get("error"):  # a GPU that cannot run the kernel or fails its self-check: no retry, one line
            self._kill(actor)
            raise MergeFailed(info["error"])
        info["tasks"] = 0
        info["bytes"] = 0
        self.actors[actor] = info
        self.stats.workers.append(info)

    def _kill(self, actor) -> None:
        try:
            self.ray.kill(actor, no_restart=True)
        except Exception:  # pragma: no cover - the actor or the cluster is already gone
            pass

    def _replace(self) -> None:
        """Start a replacement actor without waiting for it: it may never fit (its node is gone, and every
        other CPU or GPU is taken by a live worker), and then the live workers finish the merge alone."""
        if self.failed_starts >= self.max_attempts:
            raise MergeFailed(f"no worker could be started ({self.failed_starts} tries); last error: "
                              f"{self.last_start_error}")
        a = self._spawn()
        self.starting.add(a)
        self.pending[a.info.remote()] = StartCall(a, next(self.seq))

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
                self._kill(a)
        self.stats.attempts = sum(self.attempts.values())
        self.stats.seconds = time.monotonic() - t0
        return self.stats

    def _feed(self, actor) -> None:
        """Fill the actor's queue: a seal of a file it hashed (or whose hasher died) first, else its next task."""
        while self.load[actor] < IN_FLIGHT:
            ours = [f for f in self.to_seal if self.hasher.get(f, actor) is actor]
            if ours:  # seal where the file was hashed; a file whose hasher died is hashed anew here
                f = ours[0]
                self.to_seal.remove(f)
                self.hasher[f] = actor
                self.pending[actor.seal.remote(self._paths(f))] = SealCall(actor, next(self.seq), f)
                self.load[actor] += 1
                continue
            task = self.files.next_task(self.actors[actor]["node_id"])
            if task is None:
                return
            self.attempts[task.id] += 1
            self.pending[actor.run.remote(task)] = TaskCall(actor, next(self.seq), task)
            self.load[actor] += 1

    def _loop(self, progress: Progress | None, t0: float) -> None:
        ray = self.ray
        for f in self.frontier.files:  # a resumed merge: hash what is already done
            self._advance_hash(f, None)
        idle_since = time.monotonic()
        while True:
            check_terminated()
            for a in list(self.actors):
                self._feed(a)
            busy = any(not isinstance(c, StartCall) for c in self.pending.values())
            if not busy and not self.to_seal and not self.files.has_work():
                return
            if not self.actors and not self.starting:
                self._replace()
            # with no live worker, wait for a replacement only so long; wake up now and then to see the SIGTERM flag
            ready, _ = ray.wait(list(self.pending), num_returns=1, timeout=POLL)
            if ready or self.actors:
                idle_since = time.monotonic()
            if not ready and time.monotonic() - idle_since < START_TIMEOUT:
                continue
            if not ready:
                raise MergeFailed(f"no worker left and none could be started in {START_TIMEOUT:.0f}s (has the "
                                  "cluster lost its nodes?); rerun the same command to resume")
            ref = ready[0]
            call = self.pending.pop(ref)
            if isinstance(call, StartCall):
                self.starting.discard(call.actor)
                try:
                    self._register(call.actor, ray.get(ref))
                except ray.exceptions.RayError as e:
                    self._start_failed("a replacement worker", e)
                continue
            if not isinstance(call, HashCall):
                self.load[call.actor] -= 1
            try:
                result = ray.get(ref)
            except (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError,
                    ray.exceptions.NodeDiedError, ray.exceptions.ObjectLostError,
                    ray.exceptions.OwnerDiedError) as e:
                self._lost(call, e)
                continue
            except ray.exceptions.RayTaskError as e:
                cause = e.cause if hasattr(e, "cause") else None
                if isinstance(cause, ExpoError):  # one line, without Ray's wrapping (and whether a rerun resumes)
                    err = cause.__class__(str(cause))
                    err.resumable = getattr(cause, "resumable", False)
                    raise err from None
                what = call.task.id if isinstance(call, TaskCall) else call.file
                raise MergeFailed(f"task {what} failed: {str(e).splitlines()[-1]}") from None
            if isinstance(call, TaskCall):
                self._task_done(call, result, progress, t0)
            elif isinstance(call, SealCall):
                for k, rec in enumerate(result):
                    self.stats.sealed.setdefault(k, {})[call.file] = rec
                log.info("sealed %s at %.2fs", call.file, time.monotonic() - t0)

    def _task_done(self, call: TaskCall, result, progress: Progress | None, t0: float) -> None:
        task, info = call.task, self.actors[call.actor]
        info["tasks"] += 1
        info["bytes"] += result.nbytes
        self.stats.differs.update(result.differs)
        self.stats.nonfinite_out += result.nonfinite_out
        if getattr(result, "nonfinite_in", None) is not None:
            self.stats.nonfinite_in = (self.stats.nonfinite_in or 0) + result.nonfinite_in
        if self.on_done:
            self.on_done(task, result)
        if progress:
            progress.add(result.nbytes)
        last = self.files.done(task, info["node_id"])
        self.frontier.done(task)
        self._advance_hash(task.file, call.actor)
        if last:
            log.info("all tasks of %s done at %.2fs", task.file, time.monotonic() - t0)
            if self.sealing:
                self.to_seal.append(task.file)

    def _paths(self, fname: str) -> list[str]:
        return [os.path.join(d, fname) for d in self.out_dirs]

    def _advance_hash(self, fname: str, actor) -> None:
        """Tell the file's hasher how far the file is final (its finished prefix), every HASH_STEP bytes (filestate)."""
        if not self.sealing:
            return
        upto = self.frontier.due(fname)
        if upto is None:
            return
        hasher = self.hasher.get(fname)
        if hasher is None:
            if actor is None or actor not in self.actors:
                if not self.actors:
                    return
                actor = next(iter(self.actors))
            hasher = self.hasher[fname] = actor
        self.frontier.tell(fname, upto)
        self.pending[hasher.hash_advance.remote(self._paths(fname), upto)] = HashCall(hasher, next(self.seq),
                                                                                    fname, upto)

    def _lost(self, call: Pending, err: BaseException) -> None:
        """An actor or its node died: give back all it held and start a replacement.

        An actor runs its calls one at a time in the order they were sent, so of what it held only the
        earliest was running; the others never started and do not count as attempts."""
        actor = call.actor
        info = self.actors.pop(actor, None) or {}
        info["died"] = f"{err.__class__.__name__}: {_first_line(err)}"
        log.warning("worker %s on %s died (%s); rescheduling its tasks",
                    info.get("pid"), info.get("hostname"), err.__class__.__name__)
        self._kill(actor)
        for fname in [f for f, a in self.hasher.items() if a is actor]:  # its hash state is gone
            del self.hasher[fname]
            self.frontier.forget(fname)
        held = [call]
        for ref, c in list(self.pending.items()):
            if c.actor is actor:
                self.pending.pop(ref)
                held.append(c)
        held = [c for c in held if not isinstance(c, HashCall)]
        self.load.pop(actor, None)
        running = min((c.seq for c in held), default=None)
        where = f"worker pid {info.get('pid')} on {info.get('hostname')} died ({info['died']})"
        for c in sorted(held, key=lambda c: -c.seq):  # requeued at the front: the running one first
            self._requeue(c, where, started=c.seq == running)
        sealed = set(self.stats.sealed.get(0, {}))
        for fname in self.frontier.files:  # hash again from the start on another worker
            if fname not in self.hasher and fname not in self.to_seal and fname not in sealed:
                self._advance_hash(fname, None)
        self._replace()

    def _requeue(self, call: Pending, err: str, started: bool = True) -> None:
        if isinstance(call, SealCall):  # seal again on any worker: the bytes are on the shared output path
            self.to_seal.append(call.file)
            return
        task: Task = call.task
        if not started:
            self.attempts[task.id] -= 1
        else:
            self.last_error[task.id] = err
        if self.attempts[task.id] >= self.max_attempts:
            raise MergeFailed(f"task {task.id} ({task.file} bytes {task.begin}-{task.end}) failed "
                              f"{self.attempts[task.id]} times (--max-attempts {self.max_attempts}); last error: "
                              f"{self.last_error.get(task.id, err)}")
        self.files.give_back(task)


def _first_line(err: BaseException) -> str:
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    return lines[0] if lines else err.__class__.__name__
