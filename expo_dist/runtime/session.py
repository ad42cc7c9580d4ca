"""The driver's session: start or join Ray, and the progress line on stderr."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
import time

from ..errors import ExpoError, check_terminated

log = logging.getLogger("expo_dist")


DEFAULT_WAIT_TIMEOUT = 300.0  # seconds --wait-nodes waits for the cluster's nodes to join


def connect(address: str | None, num_cpus: int | None = None, wait_nodes: int | None = None,
            wait_timeout: float | None = None) -> bool:
    """Join the cluster at address, or start an embedded Ray. Returns True if we started Ray.

    wait_nodes: then wait until that many nodes are alive in the cluster (wait_for_nodes), e.g. while a batch
    job's other nodes are still running `ray start`."""
    import ray

    if ray.is_initialized():
        if wait_nodes:
            wait_for_nodes(wait_nodes, wait_timeout)
        return False
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    kwargs = dict(logging_level=logging.WARNING, log_to_driver=True, configure_logging=True)
    main = threading.current_thread() is threading.main_thread()
    own_sigterm = signal.getsignal(signal.SIGTERM) if main else None
    # Ray puts the driver's current folder first on its workers' sys.path. Run from a folder that holds another
    # expo_dist (an old checkout, say), the workers would import that one. During ray.init the current folder
    # is the one that holds this expo_dist, so workers import what the driver runs. (Paths in the spec are
    # absolute by now; the folder is restored right after.)
    try:
        cwd = os.getcwd()
        os.chdir(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    except OSError:  # the current folder is gone, or ours cannot be entered: leave it to Ray
        cwd = None
    try:
        if address:
            with _own_sigterm(callable(own_sigterm)):
                ray.init(address=address, **kwargs)
            if wait_nodes:
                wait_for_nodes(wait_nodes, wait_timeout)
            return False
        # address="local": a Ray of our own, even where /tmp/ray/ray_current_cluster names a cluster someone
        # started on this machine (plain ray.init() would join that one); RAY_ADDRESS still wins (ray job submit)
        # Ray warns on every start of a local cluster that token auth is on by default: for a Ray that lives
        # and dies with this command that is noise, so that one logger is quietened for the start
        quiet = logging.getLogger("ray._private.authentication.authentication_token_setup")
        level = quiet.level
        quiet.setLevel(logging.ERROR)
        try:
            with _own_sigterm(callable(own_sigterm)):
                ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, **kwargs)
            if wait_nodes:
                wait_for_nodes(wait_nodes, wait_timeout)
        except BaseException:  # SIGTERM or Ctrl-C mid-start: stop what was started, then unwind
            _stop_quietly()
            raise
        finally:
            quiet.setLevel(level)
        return True
    except ConnectionError as e:
        raise ExpoError(f"cannot connect to Ray at {address!r}: {e}") from None
    finally:
        if cwd is not None:
            os.chdir(cwd)
        # ray.init puts in a SIGTERM handler that exits at once (sys.exit); where the CLI had its own (unwind,
        # stop Ray, keep the journal), put that one back
        if callable(own_sigterm) and signal.getsignal(signal.SIGTERM) is not own_sigterm:
            signal.signal(signal.SIGTERM, own_sigterm)


def alive_nodes() -> int:
    """Nodes the connected Ray cluster counts as alive."""
    import ray

    return sum(1 for n in ray.nodes() if n.get("Alive"))


def wait_for_nodes(n: int, timeout: float | None = None, poll: float = 0.5) -> int:
    """Wait until the connected cluster has at least n alive nodes; returns how many it has. After timeout
    seconds (default DEFAULT_WAIT_TIMEOUT) one ExpoError line (exit code 2) says how many joined."""
    timeout = DEFAULT_WAIT_TIMEOUT if timeout is None else timeout
    deadline = time.monotonic() + timeout
    have = alive_nodes()
    if have < n:
        log.warning("waiting for %d Ray nodes (%d joined so far, up to %gs)", n, have, timeout)
    while have < n:
        check_terminated()
        if time.monotonic() >= deadline:
            raise ExpoError(f"only {have} of {n} Ray nodes joined the cluster within {timeout:g}s (--wait-nodes "
                            f"{n}); see the nodes' `ray start` logs, or raise --wait-timeout")
        time.sleep(min(poll, max(deadline - time.monotonic(), 0.01)))
        have = alive_nodes()
    log.info("%d Ray nodes are up", have)
    return have


@contextlib.contextmanager
def _own_sigterm(keep: bool):
    """While Ray starts, keep the CLI's SIGTERM handler. ray.init and Ray's node each put in their own (one
    exits with status 15, the other kills Ray's processes and exits with 1), so a SIGTERM during the start
    would skip our unwinding and lose the exit code 143 (measured: 15, or an abort, for SIGTERMs 0.5-2 s into
    the run). This reaches into ray._private: where that is not there, Ray's handlers go in as before and
    connect() puts ours back after the start."""
    utils = None
    if keep:
        try:
            from ray._private import utils
        except ImportError:
            utils = None
    original = getattr(utils, "set_sigterm_handler", None)
    if original is None:
        yield
        return
    utils.set_sigterm_handler = lambda handler: None
    try:
        yield
    finally:
        utils.set_sigterm_handler = original


def _stop_quietly() -> None:
    try:
        shutdown()
    except Exception as e:  # noqa: BLE001 - already unwinding from the real error
        log.debug("ray shutdown after a failed start: %s", e)


def shutdown() -> None:
    """Stop the embedded Ray this process started.

    ray.shutdown() gives each Ray process a second to exit on SIGTERM; the autoscaler monitor of a local cluster
    always takes all of it (here: 1.0 of the 1.1 s shutdown takes). It holds nothing of ours and has no
    autoscaler to drive on an embedded cluster, so it is killed first. That reaches into Ray's node object,
    which is not public API: if it is not there, ray.shutdown() does the usual, slower thing."""
    import ray

    try:
        from ray._private import worker as ray_worker

        node = ray_worker._global_node
        for info in (node.all_processes.get("monitor", []) if node is not None else []):
            if info.process.poll() is None:
                info.process.kill()
                info.process.wait(5)
    except Exception as e:  # noqa: BLE001 - an optimisation only
        log.debug("could not stop Ray's monitor early: %s", e)
    ray.shutdown()


class Progress:
    def __init__(self, total: int, stream=sys.stderr, per_task: int = 1):
        self.per_task = per_task  # bytes written per task byte (outputs of a sweep)
        self.total, self.done, self.stream = total, 0, stream
        self.t0 = time.monotonic()
        self.last = 0.0
        self.tty = stream.isatty()

    def add(self, n: int) -> None:
        self.done += n * self.per_task
        now = time.monotonic()
        if now - self.last < (0.2 if self.tty else 5.0) and self.done < self.total:
            return
        self.last = now
        el = max(now - self.t0, 1e-9)
        rate = self.done / el
        eta = (self.total - self.done) / rate if rate > 0 else float("inf")
        pct = 100.0 * self.done / max(self.total, 1)
        unit, scale = ("GB", 1e9) if self.total >= 1e9 else ("MB", 1e6)
        msg = (f"merge {pct:5.1f}%  {self.done / scale:.2f}/{self.total / scale:.2f} {unit}  "
               f"{rate / 1e9:.2f} GB/s  ETA {eta:5.0f}s")
        self.stream.write(("\r" + msg) if self.tty else msg + "\n")
        if self.tty and self.done >= self.total:
            self.stream.write("\n")
        self.stream.flush()
