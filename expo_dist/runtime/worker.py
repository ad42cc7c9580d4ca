"""The Ray actor around Runner: one per GPU where GPUs exist, else one per CPU."""

from __future__ import annotations

import importlib
import importlib.util
import os
import socket

import ray

from ..errors import ExpoError, MergeFailed
from ..settings import Settings
from .hashing import FileHasher


def load_hooks(spec: str | None):
    """Settings.test_hooks, made: "FILE.py:NAME" (a file, loaded by path) or "package.module:NAME"; NAME() is an
    object with before(task) and after(task, result), which the worker calls around each task. Tests use it to
    slow tasks down and crash workers (tests/faulthooks.py); None (production): no hooks."""
    if not spec:
        return None
    where, _, name = spec.rpartition(":")
    if where.endswith(".py") or os.sep in where:
        mod_spec = importlib.util.spec_from_file_location("expo_test_hooks", where)
        if mod_spec is None:
            raise ExpoError(f"test hooks {spec!r}: {where} is not a Python file")
        module = importlib.util.module_from_spec(mod_spec)
        mod_spec.loader.exec_module(module)
    else:
        module = importlib.import_module(where)
    return getattr(module, name)()


def node_name() -> str:
    """This node as a person finds it: 'node HOST (IP)'."""
    try:
        ip = ray.util.get_node_ip_address()
    except Exception:  # noqa: BLE001 - outside Ray
        ip = "IP unknown"
    return f"node {socket.gethostname()} ({ip})"


def gpu_name(device: str) -> str:
    """'GPU 3 (NVIDIA H100 80GB HBM3)': the number Ray gave this worker on its node (as nvidia-smi counts,
    where the node's CUDA_VISIBLE_DEVICES does not renumber them) and the name CUDA reports; 'CPU' on a CPU."""
    if not device.startswith("cuda"):
        return "CPU"
    local = int(device.partition(":")[2] or 0)
    try:
        ids = ray.get_gpu_ids()
    except Exception:  # noqa: BLE001 - outside Ray
        ids = []
    number = ids[local] if local < len(ids) else local
    try:
        import torch

        name = torch.cuda.get_device_name(local)
    except Exception:  # noqa: BLE001 - CUDA itself is what failed
        name = "name unknown"
    return f"GPU {number} ({name})"


def _one_line(err: BaseException, limit: int = 300) -> str:
    text = " ".join(str(err).split()) or "(no message)"
    text = text if len(text) <= limit else text[: limit - 3] + "..."
    return f"{err.__class__.__name__}: {text}"


def device_failure(err: BaseException, device: str, doing: str = "") -> str:
    """The one line a GPU worker stops with: what failed, on which node and GPU, and what to do instead."""
    from .selfcheck import KernelCheckFailed

    where = f"{gpu_name(device)} on {node_name()}"
    if isinstance(err, KernelCheckFailed):
        what = f"{where} failed the kernel self-check: {err}"
    else:
        what = f"{where} cannot run the merge kernel{' (' + doing + ')' if doing else ''}: {_one_line(err)}"
    if device.startswith("cuda"):
        return f"{what}; rerun with --device cpu (the CPU kernel writes the exact bytes, more slowly)"
    return f"{what}; please report this as a bug in expo_dist"  # (CPU workers check themselves only when told to)


def _is_cuda_error(err: BaseException) -> bool:
    text = f"{err.__class__.__name__} {err}".lower()
    return any(k in text for k in ("cuda", "cublas", "acceleratorerror", "outofmemoryerror", "nvidia", "gpu"))


@ray.remote(max_restarts=3, max_task_retries=0)
class MergeWorker:
    """self_check: prove the kernel first (selfcheck.self_check), and report a failure from info() rather than
    take tasks; None: on a GPU. kernel: a factory device -> kernel.Kernel to use instead of the default (tests
    give one that writes a wrong byte). A GPU worker that cannot start or fails its check does not raise
    here (Ray would print the traceback and keep only the text): info() carries the one line instead.
    settings: the merge's settings.Settings, made once on the driver (this process reads no EXPO_* variable)."""

    def __init__(self, out_dirs: list[str], device: str, cache_dir: str | None = None,
                 settings: Settings | None = None, self_check: bool | None = None, kernel=None,
                 pins: dict[str, str] | None = None):
        from .runner import Runner

        settings = settings if settings is not None else Settings()
        self.io = settings.io
        self.device = device
        self.error: str | None = None
        self.check: dict | None = None
        self.hashers: dict[str, FileHasher] = {}
        self.tasks_done = 0
        self.bytes_done = 0
        self.hooks = load_hooks(settings.test_hooks)  # tests only (see load_hooks)
        gpu = device.startswith("cuda")
        check = gpu if self_check is None else self_check
        step = "starting CUDA"
        try:
            if device == "cuda":  # torch only where a GPU is used: a CPU worker with the C kernel never imports it
                import torch

                self.device = device = f"cuda:{torch.cuda.current_device()}"
            step = "allocating its buffers"
            self.runner = Runner(out_dirs, device, cache_dir=cache_dir, settings=settings, pins=pins,
                                 kernel=kernel(device) if kernel is not None else None)
            if check and self.runner.kernel is not None:  # (the C kernel is the reference itself)
                from . import selfcheck

                step = "running the kernel self-check"
                self.check = selfcheck.self_check(device, kernel=self.runner.kernel,
                                                  use_c=settings.kernel != "torch")
        except Exception as e:  # noqa: BLE001 - any failure of the device is reported the same way
            if not (gpu or check):
                raise
            self.error = device_failure(e, self.device, step)

    def info(self) -> dict:
        out = {"node_id": ray.get_runtime_context().get_node_id(), "hostname": socket.gethostname(),
               "pid": os.getpid(), "device": self.device}
        if self.check is not None:
            out["self_check"] = self.check
        if self.error is not None:
            out["error"] = self.error
        return out

    def run(self, task):
        if self.error is not None:  # (the driver never sends one: it stops at info())
            raise MergeFailed(self.error)
        if self.hooks is not None:
            self.hooks.before(task)
        try:
            res = self.runner.run(task)
        except ExpoError:
            raise
        except Exception as e:
            if self.device.startswith("cuda") and _is_cuda_error(e):
                raise MergeFailed(device_failure(e, self.device, f"task {task.id}")) from None
            raise
        if self.hooks is not None:
            self.hooks.after(task, res)
        self.tasks_done += 1
        self.bytes_done += res.nbytes
        return res

    def fetched(self) -> list[dict]:
        """The Hub weight files this worker fetched (or found in its node's cache)."""
        from ..sources import fetch

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
