"""One config value against its type: (label, value) -> the value in its one accepted form, or one ExpoError line
naming the label. spec.FIELDS says which check each key of the merge config gets. Nothing is coerced: YAML
`yes`/`true` is no number or size, the string 'false' is no boolean.
"""

from __future__ import annotations

import math
import os
import re

from .errors import ExpoError
from .planning.plan import parse_size
from .planning.rules import check_number, parse_rules, show_value

MIN_TASK_BYTES = 1 << 20
MAX_SIZE = 1 << 60  # 1 EiB: far above any model, far below what byte offsets can hold
MAX_SECONDS = 366 * 86400


def _fail(label: str, want: str, value):
    raise ExpoError(f"{label} must be {want}, got {show_value(value)}")


def check_string(label: str, value) -> str:
    if isinstance(value, os.PathLike):  # the Python API: a pathlib.Path for a folder
        value = os.fspath(value)
    if not isinstance(value, str) or not value.strip():
        _fail(label, "a non-empty string", value)
    if "\x00" in value:
        _fail(label, "a string without NUL characters", value)
    return value


def check_bool(label: str, value) -> bool:
    if not isinstance(value, bool):
        _fail(label, "true or false (a boolean, not a string or number)", value)
    return value


def check_int(label: str, value, lo: int, hi: int) -> int:
    if isinstance(value, bool):
        _fail(label, "an integer", value)
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        value = int(value)
    elif isinstance(value, str) and re.fullmatch(r"\s*[+-]?[0-9]{1,18}\s*", value):
        value = int(value)
    if not isinstance(value, int):
        _fail(label, "an integer", value)
    if value < lo:
        raise ExpoError(f"{label} must be at least {lo}, got {show_value(value)}")
    if value > hi:
        raise ExpoError(f"{label} must be at most {hi}, got {show_value(value)}")
    return value


def _size_text(n: int) -> str:
    return "1MiB" if n == MIN_TASK_BYTES else "1EiB" if n == MAX_SIZE else f"{n} byte{'s' * (n != 1)}"


def check_size(label: str, value, lo: int = 1) -> int:
    """An integer number of bytes, or a size string like 5GB / 256MiB (plan.parse_size); lo <= size <= 1EiB."""
    want = "a size: an integer number of bytes or a string like 5GB or 256MiB"
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        _fail(label, want, value)
    if isinstance(value, float):
        if not (math.isfinite(value) and value.is_integer()):
            _fail(label, want, value)
        value = int(value)
    if isinstance(value, str):
        if len(value) > 100:
            _fail(label, want, value)
        try:
            value = parse_size(value)
        except ExpoError as e:
            raise ExpoError(f"{label}: {e}") from None
        except (OverflowError, ValueError):
            _fail(label, want, value)
    if value < lo:
        raise ExpoError(f"{label} must be at least {_size_text(lo)}, got {show_value(value)}")
    if value > MAX_SIZE:
        raise ExpoError(f"{label} must be at most {_size_text(MAX_SIZE)}, got {show_value(value)}")
    return value


def check_alpha(label: str, value) -> float | list[float]:
    """One alpha, or several (a list, or a comma-separated string) for a sweep."""
    raw = value
    if isinstance(raw, str) and "," in raw:
        raw = [x for x in raw.split(",") if x.strip()]
    if isinstance(raw, (list, tuple)):
        if not raw:
            raise ExpoError(f"{label} needs a value")
        alphas = [check_number(label, v) for v in raw]
        if len({f"{a:g}" for a in alphas}) != len(alphas):
            raise ExpoError(f"{label} lists a value twice: {show_value(list(raw))}")
        return alphas if len(alphas) > 1 else alphas[0]
    return check_number(label, raw)


def check_seconds(label: str, value) -> float:
    """A duration: a finite number of seconds > 0 (at most a year)."""
    if isinstance(value, bool):
        _fail(label, "a number of seconds", value)
    s = check_number(label, value)
    if not 0 < s <= MAX_SECONDS:
        raise ExpoError(f"{label} must be more than 0 and at most {MAX_SECONDS} seconds, got {show_value(value)}")
    return s


def check_choice(label: str, value, choices: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value.strip().lower() not in choices:
        _fail(label, "one of " + ", ".join(choices), value)
    return value.strip().lower()


def check_rules(label: str, value) -> list:
    if not isinstance(value, list):
        _fail(label, "a list of mappings like {match: 'model.embed_tokens.*', alpha: 0}", value)
    parse_rules(value, label)
    return value
