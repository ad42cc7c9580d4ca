"""The runtime: start Ray, schedule tasks on worker actors, run each task (read, exact kernel, write), hash."""

import importlib

# name -> module. Loaded on first use: the worker imports Ray and the kernel torch, and neither may load for
# a module that only needs, say, fileio (`expo-dist plan` imports no Ray and no torch).
_EXPORTS = {
    "Progress": "session", "connect": "session", "shutdown": "session",
    "Scheduler": "scheduler", "RunStats": "scheduler", "placement": "scheduler",
    "MergeWorker": "worker",
    "Runner": "runner", "TaskResult": "slots",
    "Kernel": "kernel", "round_f64_to": "kernel",
    "KernelCheckFailed": "selfcheck", "self_check": "selfcheck",
    "FileHasher": "hashing",
    "atomic_write": "fileio", "io_mode": "fileio", "pwrite_all": "fileio",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
