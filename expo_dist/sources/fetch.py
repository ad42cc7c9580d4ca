"""Worker side of Hub sources: turn a weight file's ref into a path on this node, downloading it into the node's
own cache the first time (retrying what the network gets wrong for a while), and record what was fetched."""

from __future__ import annotations

import logging
import os
import threading
import time

from ..settings import HUB_ATTEMPTS
from .hubretry import retry_transient
from .refs import is_ref, parse_ref

log = logging.getLogger("expo_dist")

# settings a worker process needs to see the Hub as the driver does (HF_HOME / HF_HUB_CACHE stay node-local)
FORWARD_ENV = ("HF_ENDPOINT", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_TOKEN", "HF_HUB_ETAG_TIMEOUT",
               "HF_HUB_DOWNLOAD_TIMEOUT", "HF_HUB_DISABLE_XET", "HF_HUB_DISABLE_PROGRESS_BARS",
               "HF_HUB_DISABLE_SYMLINKS", "HF_HUB_DISABLE_TELEMETRY", "HF_HUB_USER_AGENT_ORIGIN")

_LOCK = threading.Lock()
_PATHS: dict[tuple[str, str | None], str] = {}
_RECORD: dict[str, dict] = {}


def local_path(ref: str, cache_dir: str | None = None, attempts: int = HUB_ATTEMPTS) -> str:
    """The local path of a weight file named in the plan. Plain paths are returned as they are.

    An hf:// ref is looked up in this node's cache (cache_dir, else HF_HUB_CACHE / HF_HOME of this process) and
    downloaded into it with hf_hub_download, pinned to the ref's commit, if it is not there (up to `attempts` tries
    while the Hub's failure is transient: Settings.hub_attempts). Thread- and
    process-safe (huggingface_hub locks the blob while it downloads). Each call that resolves a ref for the first
    time in this process is recorded (see fetched()).
    """
    if not is_ref(ref):
        return ref
    key = (ref, cache_dir)
    with _LOCK:
        hit = _PATHS.get(key)
    if hit is not None:
        return hit
    repo, commit, filename = parse_ref(ref)
    from huggingface_hub import hf_hub_download, try_to_load_from_cache

    t0 = time.monotonic()
    path = try_to_load_from_cache(repo, filename, cache_dir=cache_dir, revision=commit)
    downloaded = not isinstance(path, str)
    tries = 0
    if downloaded:
        path, tries = _download(hf_hub_download, repo, commit, filename, cache_dir, attempts)
    with _LOCK:
        _PATHS[key] = path
        _RECORD.setdefault(ref, {"ref": ref, "repo_id": repo, "commit": commit, "file": filename,
                                 "bytes": os.path.getsize(path), "downloaded": downloaded,
                                 "seconds": round(time.monotonic() - t0, 3), "path": path,
                                 "attempts": tries})
    return path


def _download(hf_hub_download, repo: str, commit: str, filename: str, cache_dir: str | None,
              attempts: int) -> tuple[str, int]:
    """hf_hub_download, tried again with backoff while the failure is transient (huggingface_hub itself does not
    retry a download the Hub answers with 5xx). Returns (path, tries)."""
    return retry_transient(lambda: hf_hub_download(repo, filename, revision=commit, cache_dir=cache_dir),
                           repo, commit, filename, attempts)


def fetched(reset: bool = False) -> list[dict]:
    """The Hub weight files this process resolved, in order: {ref, repo_id, commit, file, bytes, downloaded
    (False: already in this node's cache), seconds, path}. reset=True clears the record after reading it."""
    with _LOCK:
        out = [dict(v) for v in _RECORD.values()]
        if reset:
            _RECORD.clear()
    return out


def worker_env() -> dict[str, str]:
    """Environment for worker actors so they see the Hub as this process does (runtime_env={"env_vars": ...}).

    The cache location (HF_HOME, HF_HUB_CACHE) is deliberately not forwarded: each node keeps its own cache. A token
    from `hf auth login` on this machine is forwarded as HF_TOKEN, since the worker nodes may not have it.
    """
    env = {k: os.environ[k] for k in FORWARD_ENV if k in os.environ}
    env.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # N workers' download bars would only garble the log
    if "HF_TOKEN" not in env:
        try:
            from huggingface_hub import get_token

            token = get_token()
        except Exception:
            token = None
        if token:
            env["HF_TOKEN"] = token
    return env
