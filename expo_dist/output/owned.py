"""What expo_dist wrote in an output folder, so that --overwrite removes that and nothing else.

A run records, before it writes anything at the top of an output folder, the names it will write there
(OUT/.expo/owned.json); a finished folder's manifest lists them too ("written"). --overwrite removes exactly:
those names (files or symlinks, never what a symlink points at), the work folder .expo/ (only the files a run
keeps there), and, for a sweep, the alpha-*/ folders that are themselves expo_dist outputs. Anything else in the
folder makes it refuse before it removes anything, naming a few of the strangers.
"""

from __future__ import annotations

import json
import os
import stat

from ..errors import ExpoError
from ..formats.folder import CARD, INDEX, MANIFEST, SHARD, WORK, plain_name
from ..formats.jsonsafe import load_file
from ..runtime.fileio import atomic_write
from .journal import JOURNAL, PLAN
from .lock import LEASE
from .lock import NAME as LOCK
from .manifest import TOOL

OWNED = "owned.json"
LOCK_FILES = (LOCK, LEASE)  # the run's own lock: kept while it clears the rest
WORK_FILES = {PLAN, JOURNAL, OWNED, *LOCK_FILES}
SHOWN = 5  # strangers named in the refusal


def _json(path: str):
    """A record of ours, or None where it is missing or damaged (then its names are simply not ours)."""
    try:
        return load_file(path, path)
    except ExpoError:
        return None


def record_names(out: str, names: list[str]) -> None:
    """Before a run writes at the top of out: say what it will write there (OUT/.expo/owned.json)."""
    atomic_write(os.path.join(out, WORK, OWNED), json.dumps({"names": sorted(set(names))}).encode())


def _own_names(d: str) -> set[str]:
    names: set[str] = set()
    doc = _json(os.path.join(d, WORK, OWNED))
    if isinstance(doc, dict) and isinstance(doc.get("names"), list):
        names.update(n for n in doc["names"] if plain_name(n))
    man = _json(os.path.join(d, MANIFEST))
    if isinstance(man, dict) and man.get("tool") == TOOL:
        written = man.get("written")
        if isinstance(written, list):
            names.update(n for n in written if plain_name(n))
        else:  # a manifest from before "written": the weights, index, card and itself
            names.update({MANIFEST, INDEX, CARD})
            if isinstance(man.get("files"), dict):
                names.update(n for n in man["files"] if plain_name(n))
    names.update({n + ".tmp" for n in names})
    return names


def is_output(d: str) -> bool:
    """A folder an expo_dist run wrote (finished: its manifest; unfinished: its work folder's records)."""
    man = _json(os.path.join(d, MANIFEST))
    return (isinstance(man, dict) and man.get("tool") == TOOL) or os.path.isfile(os.path.join(d, WORK, OWNED)) \
        or os.path.isfile(os.path.join(d, WORK, PLAN))


def _file_or_link(path: str) -> bool:
    try:
        mode = os.lstat(path).st_mode
    except OSError:
        return False
    return stat.S_ISREG(mode) or stat.S_ISLNK(mode)


def _real_dir(path: str) -> bool:
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode)
    except OSError:
        return False


def survey(d: str, top: bool = True, rel: str = "") -> tuple[list[str], list[str], list[str]]:
    """(files to remove, folders to remove afterwards, strangers) in output folder d."""
    files, dirs, strangers = [], [], []
    names = _own_names(d)
    for name in sorted(os.listdir(d)):
        path, shown = os.path.join(d, name), rel + name
        if name == WORK and _real_dir(path):
            for inner in sorted(os.listdir(path)):
                ipath = os.path.join(path, inner)
                base = inner[:-4] if inner.endswith(".tmp") else inner
                if not _file_or_link(ipath) or not (base in WORK_FILES or SHARD.fullmatch(base)):
                    strangers.append(f"{shown}/{inner}")
                elif not (top and inner in LOCK_FILES):
                    files.append(ipath)
            if not top:
                dirs.append(path)
        elif name in names and _file_or_link(path):
            files.append(path)
        elif top and name.startswith("alpha-") and _real_dir(path) and is_output(path):
            f, ds, s = survey(path, top=False, rel=shown + "/")
            files += f
            dirs += ds + [path]
            strangers += s
        else:
            strangers.append(shown + ("/" if _real_dir(path) else ""))
    return files, dirs, strangers


def clear_owned(out: str) -> int:
    """--overwrite: remove what expo_dist wrote in out, or refuse (removing nothing) if anything else is there.
    Returns the number of files removed."""
    files, dirs, strangers = survey(out)
    if strangers:
        more = f" and {len(strangers) - SHOWN} more" if len(strangers) > SHOWN else ""
        raise ExpoError(f"--out {out} holds files expo_dist did not write ({', '.join(strangers[:SHOWN])}{more}); "
                        "--overwrite only replaces an earlier expo_dist output: move them away or choose another "
                        "--out")
    for path in files:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
    for path in dirs:  # deepest first; rmdir removes only an empty folder
        try:
            os.rmdir(path)
        except FileNotFoundError:
            pass
    return len(files)
