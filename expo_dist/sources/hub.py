"""Talking to the Hugging Face Hub: pinning a revision, the cached tree listing, and positional reads of a remote
file with HTTP range requests (its errors and retry policy: hubretry.py). Everything goes through huggingface_hub's
own functions, so HF_TOKEN, HF_HOME / HF_HUB_CACHE, HF_ENDPOINT and HF_HUB_OFFLINE behave as they do for
transformers.
"""

from __future__ import annotations

import os
import re
from concurrent.futures import ThreadPoolExecutor

from ..errors import ExpoError
from ..formats.jsonsafe import one_line
from ..settings import HUB_ATTEMPTS
from .hubretry import BACKOFF_MAX_S, BACKOFF_S, TRANSIENT_STATUS, hub_error, hub_exceptions

_COMMIT = re.compile(r"[0-9a-f]{40}\Z")
FIRST_RANGE = 100_000  # first range request of a remote header: as huggingface_hub's own safetensors parser
BLOCK = 64 << 10  # the tail of a zip (end records, central directory) is fetched in one request of this size
SMALL = 4096  # other reads (zip local headers): small requests


# ---- revisions ----------------------------------------------------------------------------------------------


def check_revision(repo: str, revision: str | None) -> str | None:
    """A revision as a path component of the cache (refs/<revision>) must stay inside refs/: refuse '..', a leading
    '/', backslashes, empty or '.' components, whitespace and control characters (git refuses them in ref names too).
    """
    if revision is None:
        return None
    why = None
    if not isinstance(revision, str) or not revision:
        why = "it is empty"
    elif revision.startswith("/"):
        why = "it starts with '/'"
    elif "\\" in revision:
        why = "it holds a backslash"
    elif any(c.isspace() or not c.isprintable() for c in revision):
        why = "it holds whitespace or control characters"
    elif ".." in revision or any(part in ("", ".") for part in revision.split("/")):
        why = "it holds '..' or an empty or '.' path component"
    if why:
        raise ExpoError(f"{repo}@{one_line(str(revision), 80)}: not a valid revision ({why}); give a branch, tag "
                        "or commit sha, e.g. main, v1.0 or refs/pr/1")
    return revision


def _commit_of(repo: str, revision: str | None, commit: str) -> str:
    if not isinstance(commit, str) or not _COMMIT.match(commit):
        raise ExpoError(f"{repo}@{revision or 'main'}: resolves to {str(commit)[:60]!r}, not a 40-hex commit sha; the "
                        "Hugging Face cache's refs/ entry is damaged (delete it, or give a commit sha)")
    return commit


def resolve_commit(repo: str, revision: str | None, cache_dir: str | None) -> str:
    """Pin a revision to a commit: HfApi.resolve_revision (huggingface_hub >= 1.26), else its logic by hand."""
    from huggingface_hub import HfApi, constants

    check_revision(repo, revision)
    api = HfApi()
    offline = constants.is_offline_mode()
    if hasattr(api, "resolve_revision"):
        return _commit_of(repo, revision, str(api.resolve_revision(repo, revision=revision, cache_dir=cache_dir,
                                                                   local_files_only=offline).resolved))
    if revision and _COMMIT.match(revision):
        return revision
    if not offline:
        try:
            return _commit_of(repo, revision, api.repo_info(repo, revision=revision).sha)
        except hub_exceptions() as e:
            if getattr(getattr(e, "response", None), "status_code", 500) < 500:
                raise
    ref = os.path.join(os.path.dirname(os.path.dirname(snapshot_dir(repo, "x", cache_dir))), "refs",
                       revision or "main")
    if os.path.isfile(ref):
        with open(ref, encoding="utf-8", errors="replace") as f:
            return _commit_of(repo, revision, f.read(100).strip())
    from huggingface_hub.errors import LocalEntryNotFoundError

    raise LocalEntryNotFoundError(f"no cached ref {revision or 'main'} for {repo}")


# ---- remote byte ranges -------------------------------------------------------------------------------------


class HubReader:
    """Positional reads of one file on the Hub with HTTP range requests (never the whole file)."""

    def __init__(self, repo_id: str, commit: str, filename: str, display: str, size: int | None = None,
                 attempts: int = HUB_ATTEMPTS):
        from huggingface_hub import hf_hub_url
        from huggingface_hub.utils import build_hf_headers

        self.repo_id, self.commit, self.filename, self.display = repo_id, commit, filename, display
        self.attempts = max(1, attempts)  # tries of each request (hubretry's retry policy)
        self.url = hf_hub_url(repo_id, filename, revision=commit)
        self.headers = build_hf_headers()
        self.headers["Accept-Encoding"] = "identity"
        self.blocks: dict[int, bytes] = {}  # start -> bytes, kept small
        self.bytes_fetched = 0
        self.requests = 0
        self.size = size if size is not None else -1
        if self.size < 0:
            self.read(0, 0)

    def _get(self, start: int, end: int) -> bytes:
        """Bytes [start, end) of the file (fewer at its end)."""
        from huggingface_hub.utils import hf_raise_for_status, http_backoff

        try:  # transient failures tried again (hubretry's retry policy), by huggingface_hub's own backoff
            r = http_backoff("GET", self.url, headers={**self.headers, "Range": f"bytes={start}-{max(start, end - 1)}"},
                             max_retries=self.attempts - 1, base_wait_time=BACKOFF_S, max_wait_time=BACKOFF_MAX_S,
                             retry_on_status_codes=TRANSIENT_STATUS)
            hf_raise_for_status(r)
        except hub_exceptions() as e:
            raise hub_error(e, self.repo_id, self.commit, self.filename) from None
        self.requests += 1
        if r.status_code != 206:
            raise ExpoError(f"{self.display}: the server ignored the byte-range request (HTTP {r.status_code}); "
                            "expo_dist needs range requests to read headers without downloading weights")
        cr = r.headers.get("Content-Range", "")
        m = re.fullmatch(r"bytes (\d+)-(\d+)/(\d+|\*)", cr.strip())
        if not m or int(m.group(1)) != start:
            raise ExpoError(f"{self.display}: unexpected Content-Range {cr!r} for bytes {start}-{end - 1}")
        if m.group(3) != "*":
            self.size = int(m.group(3))
        data = r.content
        self.bytes_fetched += len(data)
        return data

    def read(self, offset: int, n: int) -> bytes:
        if offset < 0 or (self.size >= 0 and offset > self.size):  # a crafted zip can point anywhere
            return b""
        if self.size >= 0:
            n = max(0, min(n, self.size - offset))
        for start, data in self.blocks.items():
            if start <= offset and offset + n <= start + len(data):
                return data[offset - start: offset - start + n]
        if offset == 0:  # a header: one request for most files
            start, end = 0, max(n, FIRST_RANGE)
        elif self.size >= 0 and offset + n > self.size - BLOCK:  # a zip's end records and central directory
            start, end = max(0, min(offset, self.size - BLOCK)), self.size
        else:
            start, end = offset, offset + max(n, SMALL)
        if self.size >= 0:
            end = min(end, self.size)
            if start >= end:
                return b""
        data = self._get(start, end)
        self._keep(start, data)
        return data[offset - start: offset - start + n]

    def _keep(self, start: int, data: bytes) -> None:
        if len(self.blocks) >= 256:
            self.blocks.pop(next(iter(self.blocks)))
        self.blocks[start] = data

    def prefetch(self, offsets: list[int]) -> None:
        """Fetch a small block at each offset (zip local headers), several requests at a time."""
        todo = []
        for off in sorted(o for o in offsets if 0 <= o < self.size):  # a crafted zip's offsets: read() refuses
            if not any(s <= off and off + 512 <= s + len(d) for s, d in self.blocks.items()) and \
                    not (todo and off + 512 <= todo[-1] + SMALL):
                todo.append(off)
        if not todo:
            return
        with ThreadPoolExecutor(8) as ex:
            for off, data in zip(todo, ex.map(lambda o: self._get(o, min(o + SMALL, self.size)), todo)):
                self._keep(off, data)

    def close(self) -> None:
        self.blocks.clear()


# ---- the cache ----------------------------------------------------------------------------------------------


def cached_listing(repo: str, commit: str, cache_dir: str | None) -> dict[str, int | None] | None:
    """The repo's file listing from the tree cache snapshot_download keeps (huggingface_hub >= 1.x), if any."""
    try:
        from huggingface_hub import get_cached_repo_tree
        from huggingface_hub.errors import CachedRepoTreeNotFoundError
    except ImportError:
        return None
    try:
        tree = get_cached_repo_tree(repo, revision=commit, cache_dir=cache_dir)
    except CachedRepoTreeNotFoundError:
        return None
    return {f.path: f.size for f in tree if "/" not in f.path}


def snapshot_dir(repo: str, commit: str, cache_dir: str | None) -> str:
    from huggingface_hub import constants
    from huggingface_hub.file_download import repo_folder_name

    check_revision(repo, commit)
    return os.path.join(cache_dir or constants.HF_HUB_CACHE, repo_folder_name(repo_id=repo, repo_type="model"),
                        "snapshots", commit)


def offline_error():
    from huggingface_hub.errors import OfflineModeIsEnabled

    return OfflineModeIsEnabled("not cached")
