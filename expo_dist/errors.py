"""Errors a user can cause. The CLI prints them as one line and exits non-zero."""


class ExpoError(Exception):
    """A problem with the user's input or environment (bad file, mismatched models, bad option).

    The message is one line that names the file or tensor and says what to do.
    """

    exit_code = 2


class MergeFailed(ExpoError):
    """The merge itself failed (a task kept failing, a disk filled up)."""

    exit_code = 1
