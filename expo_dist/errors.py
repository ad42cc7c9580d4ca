"""Errors a user can cause, and the SIGTERM flag. The CLI prints errors as one line and exits non-zero."""

import threading


class ExpoError(Exception):
    """A problem with the user's input or environment (bad file, mismatched models, bad option).

    The message is one line that names the file or tensor and says what to do.
    """

    exit_code = 2


class MergeFailed(ExpoError):
    """The merge itself failed (a task kept failing, a disk filled up)."""

    exit_code = 1


class Terminated(KeyboardInterrupt):
    """SIGTERM arrived (scancel, kill, a pre-empted node)."""


TERMINATED = threading.Event()  # set by the CLI's SIGTERM handler: wherever the unwinding lands, the exit is 143


def check_terminated() -> None:
    """Raise Terminated if SIGTERM came. The handler raises it at once, but Python swallows an exception raised
    inside a callback it cannot propagate from (a __del__, a weakref or import-machinery callback: seen once in
    60 runs with SIGTERM 0.3 s after the start), so the long-running steps also look at the flag."""
    if TERMINATED.is_set():
        raise Terminated()
