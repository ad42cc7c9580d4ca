"""JSON from a user's files (safetensors headers, both index kinds, config.json), read without a traceback.

Whatever the bytes are, loads() returns a parsed document or raises ExpoError with one line: bytes that are not
UTF-8, malformed JSON, nesting deeper than MAX_DEPTH (json's own recursion would otherwise end in RecursionError),
integers longer than Python's int-string limit (ValueError). Callers then check the document's types.
"""

from __future__ import annotations

import json
import os

from ..errors import ExpoError

MAX_DEPTH = 64  # a safetensors header nests 3 deep, an index 2, the deepest Hugging Face configs about 6
MAX_FILE = 100 * 1024 * 1024  # an index or config.json is kilobytes; safetensors' own header limit


def one_line(text: str, limit: int = 120) -> str:
    """Text for an error message: on one line (control characters escaped), cut to about `limit` characters."""
    s = "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(text))
    return s if len(s) <= limit else s[: limit - 3] + "..."


def shown(value: object, limit: int = 60) -> str:
    """A value from a user's file for an error message: its repr, on one line, cut short."""
    try:
        text = repr(value)
    except ValueError:  # an int past the int-string limit (a pickle's LONG4 has no such limit)
        text = f"<a {type(value).__name__} too long to show>"
    return one_line(text, limit)


def _too_deep(doc: object) -> bool:
    stack = [(doc, 1)]
    while stack:
        x, depth = stack.pop()
        children = x.values() if isinstance(x, dict) else x
        if depth > MAX_DEPTH:
            return True
        stack.extend((c, depth + 1) for c in children if isinstance(c, (dict, list)))
    return False


def loads(raw: bytes, what: str, hint: str = "") -> object:
    """Parse raw bytes as JSON. On failure: ExpoError(f"{what} ({why})" + "; {hint}")."""
    why = None
    try:
        doc = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        why = f"not UTF-8 text: byte {e.start} is 0x{raw[e.start]:02x}"
    except json.JSONDecodeError as e:
        why = f"{e.msg} at line {e.lineno} column {e.colno}"
    except RecursionError:
        why = f"nested more than {MAX_DEPTH} levels deep"
    except ValueError as e:  # an integer longer than sys.get_int_max_str_digits()
        why = f"a number is too long to read: {one_line(str(e).split(';')[0])}"
    else:
        if isinstance(doc, (dict, list)) and _too_deep(doc):
            why = f"nested more than {MAX_DEPTH} levels deep"
    if why is not None:
        raise ExpoError(f"{what} ({why})" + (f"; {hint}" if hint else ""))
    return doc


def load_file(path: str, what: str, hint: str = "") -> object:
    """Read a small JSON file (an index or config.json) with loads(); a file that cannot be read is one line too."""
    try:
        if not os.path.isfile(path):
            raise ExpoError(f"{what} (not a regular file)")
        size = os.path.getsize(path)
        if size > MAX_FILE:
            raise ExpoError(f"{what} ({size} bytes; larger than any real one, at most {MAX_FILE})")
        with open(path, "rb") as f:
            raw = f.read(MAX_FILE + 1)
    except OSError as e:
        raise ExpoError(f"{what} ({e.strerror or e.__class__.__name__})") from None
    return loads(raw, what, hint)
