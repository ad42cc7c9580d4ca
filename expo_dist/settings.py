"""Settings: the knobs of how workers move bytes, read once on the driver and handed to every actor.

Settings.from_env builds them from the environment (EXPO_*) with what the merge config gives (--io / YAML `io`)
taking precedence. That is the one place expo_dist reads an EXPO_* variable: nothing reads one at import time, and
the scheduler passes the object to each worker actor and on to its task runner, so a worker never looks at its own
environment for them (it may run on another node, started with another environment).

Bottom layer, beside errors.py: planning and the runtime take these values as arguments.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, fields

from .errors import ExpoError

IO_MODES = ("auto", "direct", "buffered")
WRITEBACK_MODES = ("throttle", "async", "off")
KERNELS = ("auto", "torch")
HUB_ATTEMPTS = 6  # tries of one Hub request (about a minute of waiting with the backoff of sources.hub)

# field -> the environment variable it comes from
ENV = {
    "io": "EXPO_IO",
    "slots": "EXPO_SLOTS",
    "writeback": "EXPO_WRITEBACK",
    "kernel": "EXPO_KERNEL",
    "hub_attempts": "EXPO_HUB_ATTEMPTS",
    "test_hooks": "EXPO_TEST_HOOKS",
}


@dataclass(frozen=True)
class Settings:
    # how workers read and write: auto (direct I/O on local ext4/xfs/btrfs, the page cache elsewhere), direct
    # (O_DIRECT wherever a file takes it), buffered (always the page cache); runtime.fileio
    io: str = "auto"
    # windows in flight per worker: while one computes, the next slots - 1 are read (by as many threads). More
    # than 2 gave the disk more requests at once but made the merge slower on the 2-core machine we measured
    # (6.7 s against 6.1 s for the benchmark pair with 4); at least 2.
    slots: int = 2
    # page-cache writes: throttle (start writeback at once, wait for the range written a few windows ago, so dirty
    # pages never pile up), async (start it, never wait), off (leave it to the OS)
    writeback: str = "throttle"
    # CPU kernel: auto (the C kernel where it is built), torch (the torch ops; tests compare the two)
    kernel: str = "auto"
    # tries of one Hub request (range reads on the driver, downloads on the workers) before it fails
    hub_attempts: int = HUB_ATTEMPTS
    # tests only: "FILE.py:NAME" or "package.module:NAME", a class the worker makes one of and calls before and
    # after each task (tests/faulthooks.py: delays, crashes); None in production
    test_hooks: str | None = None

    def __post_init__(self):
        for f in fields(self):  # each value checked and in its one form (frozen: set through object)
            object.__setattr__(self, f.name, check(f.name, getattr(self, f.name), "Settings." + f.name))

    @classmethod
    def from_env(cls, overrides: Mapping | None = None, environ: Mapping[str, str] | None = None) -> Settings:
        """The settings for one merge: each field from overrides (the merge config: --io, YAML) where given (not
        None), else from its EXPO_* variable, else the default. A bad value is one ExpoError line naming it."""
        environ = os.environ if environ is None else environ
        overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
        unknown = set(overrides) - set(ENV)
        if unknown:
            raise TypeError(f"Settings has no field {', '.join(sorted(unknown))}")
        values = {}
        for name, var in ENV.items():
            if name in overrides:
                values[name] = check(name, overrides[name], "--" + name.replace("_", "-"))
            elif environ.get(var, "").strip():
                values[name] = check(name, environ[var], var)
        return cls(**values)


def check(name: str, value, label: str):
    """One field's value in its one form; text (from the environment) is parsed. label names it in the error."""
    if name == "io":
        return _choice(value, IO_MODES, label, "auto, direct or buffered")
    if name == "writeback":
        return _choice(value, WRITEBACK_MODES, label, "throttle, async or off")
    if name == "kernel":  # EXPO_KERNEL= (empty) or c: the default
        value = "auto" if isinstance(value, str) and value.strip().lower() in ("", "c") else value
        return _choice(value, KERNELS, label, "auto or torch")
    if name == "slots":
        return max(2, _int(value, label, "an integer (windows in flight per worker, at least 2)"))
    if name == "hub_attempts":  # as before the settings object: a value that is no integer means the default
        try:
            return max(1, _int(value, label, "an integer"))
        except ExpoError:
            return HUB_ATTEMPTS
    if name == "test_hooks":
        if value is not None and (not isinstance(value, str) or ":" not in value):
            raise ExpoError(f"{label} {value!r}: give FILE.py:NAME or package.module:NAME")
        return value
    raise TypeError(f"Settings has no field {name}")


def _choice(value, choices: tuple[str, ...], label: str, say: str) -> str:
    mode = value.strip().lower() if isinstance(value, str) else value
    if mode not in choices:
        raise ExpoError(f"{label} {value!r}: give {say}")
    return mode


def _int(value, label: str, say: str) -> int:
    if isinstance(value, bool):
        raise ExpoError(f"{label} {value!r}: give {say}")
    if isinstance(value, int):
        return value
    try:
        return int(str(value).strip())
    except ValueError:
        raise ExpoError(f"{label} {value!r}: give {say}") from None
