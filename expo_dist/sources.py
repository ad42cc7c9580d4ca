"""Model sources: a local folder, or a Hugging Face Hub repo id with an optional @revision.

Everything Hub-related goes through huggingface_hub's own functions, so HF_TOKEN (or `hf auth login`), HF_HOME /
HF_HUB_CACHE (or --cache-dir), HF_ENDPOINT and HF_HUB_OFFLINE behave exactly as they do for transformers:

- the revision is pinned to a commit once, on the driver (HfApi.resolve_revision: the Hub when reachable, the cache's
  refs/ otherwise), so every node reads the same bytes;
- the file listing comes from the cached tree listing or HfApi.list_repo_tree (one call, no downloads);
- the small side files (config, tokenizer, index json...) are downloaded with hf_hub_download, and nothing else;
- weight headers are read from the cached file when the cache holds it, otherwise with HTTP range requests (the
  same requests HfApi.parse_safetensors_file_metadata makes; that function drops the header length, which we need
  for absolute offsets), so planning downloads no weights;
- a weight file is named in the plan by a ref "hf://org/name@<commit>/<file>"; a worker turns it into a path on its
  own node with local_path(), which downloads it into that node's cache (hf_hub_download, pinned to the commit) the
  first time and reuses it after. The byte offsets in the cached file are those on the Hub, so the plan holds.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from .binindex import LocalReader
from .errors import ExpoError

log = logging.getLogger("expo_dist")

HF_SCHEME = "hf://"
_REF = re.compile(r"hf://(?P<repo>[^@]+)@(?P<commit>[0-9a-f]{40})/(?P<file>.+)\Z")
_COMMIT = re.compile(r"[0-9a-f]{40}\Z")
SIDE_MAX_BYTES = 100_000_000  # a top-level non-weight file larger than this is not a side file (not downloaded)
FIRST_RANGE = 100_000  # first range request of a remote header: as huggingface_hub's own safetensors parser
BLOCK = 64 << 10  # the tail of a zip (end records, central directory) is fetched in one request of this size
SMALL = 4096  # other reads (zip local headers): small requests
# settings a worker process needs to see the Hub as the driver does (HF_HOME / HF_HUB_CACHE stay node-local)
FORWARD_ENV = ("HF_ENDPOINT", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_TOKEN", "HF_HUB_ETAG_TIMEOUT",
               "HF_HUB_DOWNLOAD_TIMEOUT", "HF_HUB_DISABLE_XET", "HF_HUB_DISABLE_PROGRESS_BARS",
               "HF_HUB_DISABLE_SYMLINKS", "HF_HUB_DISABLE_TELEMETRY", "HF_HUB_USER_AGENT_ORIGIN")


# ---- parsing what the user typed ------------------------------------------------------------------------------


@dataclass(frozen=True)
class SourceSpec:
    text: str
    path: str | None = None  # a local folder
    repo_id: str | None = None
    revision: str | None = None  # None: the default branch


def parse_source(text: str) -> SourceSpec:
    """'./dir', '/abs/dir' -> local; 'org/name', 'org/name@rev', 'hf://org/name@rev' -> Hub.

    A folder that exists wins over a repo id of the same spelling."""
    if not isinstance(text, str) or not text.strip():
        raise ExpoError("a model source is empty: give a local folder or a Hub repo id (org/name[@revision])")
    text = text.strip()
    path = os.path.expanduser(text)
    if not text.startswith(HF_SCHEME) and os.path.exists(path):
        return SourceSpec(text, path=os.path.abspath(path))
    body = text[len(HF_SCHEME):] if text.startswith(HF_SCHEME) else text
    repo_part = body.partition("@")[0]
    looks_local = (text.startswith(("/", "./", "../", "~", ".\\")) or repo_part.count("/") != 1
                   or (os.sep != "/" and os.sep in repo_part))
    if looks_local and not text.startswith(HF_SCHEME):
        return SourceSpec(text, path=os.path.abspath(path))  # a path that does not exist: resolve() says so
    repo, _, revision = body.partition("@")
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo)
    except HFValidationError as e:
        raise ExpoError(f"{text}: neither a local folder nor a valid Hub repo id ({str(e).splitlines()[0]})") from None
    if "@" in body and not revision:
        raise ExpoError(f"{text}: empty revision after '@' (write org/name@main, a tag or a commit sha)")
    return SourceSpec(text, repo_id=repo, revision=revision or None)


def is_ref(ref: str) -> bool:
    return isinstance(ref, str) and ref.startswith(HF_SCHEME)


def parse_ref(ref: str) -> tuple[str, str, str]:
    """'hf://org/name@<commit>/<file>' -> (repo_id, commit, filename)."""
    m = _REF.match(ref)
    if not m:
        raise ExpoError(f"{ref}: not a weight file reference (hf://org/name@<40-hex commit>/<file>)")
    return m.group("repo"), m.group("commit"), m.group("file")


def make_ref(repo_id: str, commit: str, filename: str) -> str:
    return f"{HF_SCHEME}{repo_id}@{commit}/{filename}"


# ---- errors -------------------------------------------------------------------------------------------------


def _hub_error(e: Exception, repo: str, revision: str | None, what: str | None = None) -> ExpoError:
    """One line for each way the Hub can say no."""
    from huggingface_hub import constants
    from huggingface_hub.errors import (EntryNotFoundError, GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError,
                                        OfflineModeIsEnabled, RepositoryNotFoundError, RevisionNotFoundError,
                                        RevisionResolutionError)

    rev = revision or "main"
    name = f"{repo}@{rev}"
    on = f"{what} of {name}" if what else name
    status = getattr(getattr(e, "response", None), "status_code", None)
    offline = constants.is_offline_mode()
    if isinstance(e, GatedRepoError):
        return ExpoError(f"{repo} is a gated model: accept its terms at {constants.ENDPOINT}/{repo} with your account, "
                         "then set HF_TOKEN to a token of that account (or run `hf auth login`)")
    if isinstance(e, RepositoryNotFoundError):
        if status == 401 and ("Invalid credentials" in str(e) or "Invalid username or password" in str(e)):
            return ExpoError(f"{repo}: the Hub rejected the token (401 invalid credentials); fix or unset HF_TOKEN")
        return ExpoError(f"{repo}: no such model on {constants.ENDPOINT}, or it is private: check the repo id; for a "
                         "private or gated repo set HF_TOKEN (or run `hf auth login`)")
    if isinstance(e, RevisionNotFoundError):
        return ExpoError(f"{repo}: revision {rev!r} does not exist; give an existing branch, tag or commit sha "
                         f"(see {constants.ENDPOINT}/{repo}/tree/main)")
    if isinstance(e, EntryNotFoundError) and not isinstance(e, LocalEntryNotFoundError):
        return ExpoError(f"{on}: no such file in the repo at this revision")
    if isinstance(e, (RevisionResolutionError, LocalEntryNotFoundError, OfflineModeIsEnabled)):
        why = "HF_HUB_OFFLINE is set" if offline else f"the Hub ({constants.ENDPOINT}) cannot be reached"
        return ExpoError(f"{on}: not in the Hugging Face cache and {why}; download it once online "
                         f"(`hf download {repo}" + (f" --revision {revision}" if revision else "") + "`) or point "
                         "--cache-dir / HF_HOME at a cache that holds it")
    if isinstance(e, HfHubHTTPError):
        if status == 401:
            return ExpoError(f"{on}: the Hub answered 401 (unauthorized); set HF_TOKEN to a token with read access")
        if status == 403:
            return ExpoError(f"{on}: the Hub answered 403 (forbidden); your token lacks access to this repo")
        return ExpoError(f"{on}: the Hub answered {status}: {str(e).strip().splitlines()[0]}")
    return ExpoError(f"{on}: cannot reach the Hub at {constants.ENDPOINT} ({e.__class__.__name__}: "
                     f"{str(e).strip().splitlines()[0] if str(e).strip() else 'no detail'}); check the network, or set "
                     "HF_HUB_OFFLINE=1 to use only the cache")


_HUB_ERRORS: tuple = ()


def _hub_exceptions() -> tuple:
    """Exceptions huggingface_hub raises for the Hub saying no or being unreachable."""
    global _HUB_ERRORS
    if not _HUB_ERRORS:
        from huggingface_hub import errors

        names = ("HfHubHTTPError", "EntryNotFoundError", "OfflineModeIsEnabled", "RevisionResolutionError",
                 "FileMetadataError", "LocalEntryNotFoundError")
        found = [getattr(errors, n) for n in names if hasattr(errors, n)]
        for mod in ("httpx2", "httpx", "requests"):  # the HTTP client of this huggingface_hub version
            try:
                m = __import__(mod)
            except ImportError:
                continue
            found.append(m.HTTPError if mod != "requests" else m.RequestException)
        found.append(ConnectionError)
        _HUB_ERRORS = tuple(found)
    return _HUB_ERRORS


def _resolve_commit(repo: str, revision: str | None, cache_dir: str | None) -> str:
    """Pin a revision to a commit: HfApi.resolve_revision (huggingface_hub >= 1.26), else its logic by hand."""
    from huggingface_hub import HfApi, constants

    api = HfApi()
    offline = constants.is_offline_mode()
    if hasattr(api, "resolve_revision"):
        return api.resolve_revision(repo, revision=revision, cache_dir=cache_dir, local_files_only=offline).resolved
    if revision and _COMMIT.match(revision):
        return revision
    if not offline:
        try:
            return api.repo_info(repo, revision=revision).sha
        except _hub_exceptions() as e:
            if getattr(getattr(e, "response", None), "status_code", 500) < 500:
                raise
    ref = os.path.join(os.path.dirname(_snapshot_dir(repo, "x", cache_dir)), "..", "refs", revision or "main")
    if os.path.isfile(ref):
        with open(ref) as f:
            return f.read().strip()
    from huggingface_hub.errors import LocalEntryNotFoundError

    raise LocalEntryNotFoundError(f"no cached ref {revision or 'main'} for {repo}")


# ---- remote byte ranges -------------------------------------------------------------------------------------


class HubReader:
    """Positional reads of one file on the Hub with HTTP range requests (never the whole file)."""

    def __init__(self, repo_id: str, commit: str, filename: str, display: str, size: int | None = None):
        from huggingface_hub import hf_hub_url
        from huggingface_hub.utils import build_hf_headers

        self.repo_id, self.commit, self.filename, self.display = repo_id, commit, filename, display
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
        from huggingface_hub.utils import get_session, hf_raise_for_status

        try:
            r = get_session().get(self.url, headers={**self.headers, "Range": f"bytes={start}-{max(start, end - 1)}"})
            hf_raise_for_status(r)
        except _hub_exceptions() as e:
            raise _hub_error(e, self.repo_id, self.commit, self.filename) from None
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
        for off in sorted(offsets):
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


# ---- a resolved source ----------------------------------------------------------------------------------------


@dataclass
class Resolved:
    """A model source resolved for planning: where its side files are on this machine, and how to reach weights."""

    text: str
    root: str  # local folder holding config.json and the side files (the folder, or the snapshot in the HF cache)
    repo_id: str | None = None
    revision: str | None = None  # as asked (None: default branch)
    commit: str | None = None
    cache_dir: str | None = None
    listing: dict[str, int | None] = field(default_factory=dict)  # Hub: top-level files -> size
    readers: list = field(default_factory=list)

    @property
    def is_hub(self) -> bool:
        return self.repo_id is not None

    def exists(self, name: str) -> bool:
        return name in self.listing if self.is_hub else os.path.isfile(os.path.join(self.root, name))

    def ref(self, name: str) -> str:
        """What the plan names a weight file by: an absolute path, or hf://org/name@<commit>/<file>."""
        return make_ref(self.repo_id, self.commit, name) if self.is_hub else os.path.join(self.root, name)

    def display(self, name: str) -> str:
        if self.is_hub:
            return f"{name} in {self.repo_id}@{self.revision or 'main'}"
        return os.path.join(self.root, name)

    def local_file(self, name: str) -> str:
        """Local path of a small file (an index json): a folder's file, or downloaded into the cache (only it)."""
        if not self.is_hub:
            return os.path.join(self.root, name)
        from huggingface_hub import hf_hub_download

        try:
            return hf_hub_download(self.repo_id, name, revision=self.commit, cache_dir=self.cache_dir)
        except _hub_exceptions() as e:
            raise _hub_error(e, self.repo_id, self.revision, name) from None

    def cached(self, name: str) -> str | None:
        """Path of a Hub file in this machine's cache, if it is there."""
        from huggingface_hub import try_to_load_from_cache

        p = try_to_load_from_cache(self.repo_id, name, cache_dir=self.cache_dir, revision=self.commit)
        return p if isinstance(p, str) else None

    def reader(self, name: str):
        """Positional reads of a weight file: the local file (folder or cache) when there, else range requests."""
        if not self.is_hub:
            return LocalReader(os.path.join(self.root, name))
        path = self.cached(name)
        if path is not None:
            return LocalReader(path, self.display(name))
        from huggingface_hub import constants

        if constants.is_offline_mode():
            raise ExpoError(f"{self.display(name)}: not in the Hugging Face cache ({self.cache_root}) and "
                            "HF_HUB_OFFLINE is set; unset it to read headers from the Hub, or download the file once "
                            f"(`hf download {self.repo_id} {name}" + (f" --revision {self.revision}" if self.revision
                                                                      else "") + "`)")
        r = HubReader(self.repo_id, self.commit, name, self.display(name), self.listing.get(name))
        self.readers.append(r)
        return r

    @property
    def cache_root(self) -> str:
        from huggingface_hub import constants

        return self.cache_dir or constants.HF_HUB_CACHE

    def origin(self) -> dict:
        if self.is_hub:
            return {"repo_id": self.repo_id, "revision": self.revision or "main", "commit": self.commit}
        return {"path": self.root}

    @property
    def remote_bytes(self) -> int:
        return sum(r.bytes_fetched for r in self.readers)


def _cached_listing(repo: str, commit: str, cache_dir: str | None) -> dict[str, int | None] | None:
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


def _snapshot_dir(repo: str, commit: str, cache_dir: str | None) -> str:
    from huggingface_hub import constants
    from huggingface_hub.file_download import repo_folder_name

    return os.path.join(cache_dir or constants.HF_HUB_CACHE, repo_folder_name(repo_id=repo, repo_type="model"),
                        "snapshots", commit)


def resolve(text: str, cache_dir: str | None = None) -> Resolved:
    """Resolve a source for planning. For a Hub repo: pin the commit, list the files, fetch the side files only."""
    spec = parse_source(text)
    if spec.path is not None:
        if not os.path.isdir(spec.path):
            raise ExpoError(f"{spec.path}: not a directory (give a local model folder, or a Hub repo id "
                            "org/name[@revision])")
        return Resolved(text, spec.path)
    from huggingface_hub import HfApi, constants, hf_hub_download
    from huggingface_hub.hf_api import RepoFile

    repo, revision = spec.repo_id, spec.revision
    if cache_dir is not None:
        cache_dir = os.path.abspath(os.path.expanduser(cache_dir))
    api = HfApi()
    try:
        commit = _resolve_commit(repo, revision, cache_dir)
    except _hub_exceptions() as e:
        raise _hub_error(e, repo, revision) from None
    snap = _snapshot_dir(repo, commit, cache_dir)
    listing = _cached_listing(repo, commit, cache_dir)
    offline = constants.is_offline_mode()
    if listing is None and not offline:
        try:
            listing = {f.path: f.size for f in api.list_repo_tree(repo, revision=commit) if isinstance(f, RepoFile)}
        except _hub_exceptions() as e:
            if getattr(e, "response", None) is not None or not os.path.isdir(snap):
                raise _hub_error(e, repo, revision) from None
            # the Hub cannot be reached: as huggingface_hub does, fall back on the cached snapshot
            log.warning("%s: the Hub cannot be reached (%s); using the cached snapshot %s", repo,
                        e.__class__.__name__, commit[:12])
    if listing is None:
        if not os.path.isdir(snap):
            raise _hub_error(_offline_error(), repo, revision)
        listing = {n: os.path.getsize(os.path.join(snap, n)) for n in sorted(os.listdir(snap))
                   if os.path.isfile(os.path.join(snap, n))}

    from .finalize import is_side_file

    small = [n for n, size in sorted(listing.items()) if is_side_file(n) and (size is None or size <= SIDE_MAX_BYTES)]
    skipped = [n for n, size in listing.items() if is_side_file(n) and size is not None and size > SIDE_MAX_BYTES]
    if skipped:
        log.warning("%s: not fetching %s (over %d MB; not a config or tokenizer file)", repo,
                    ", ".join(sorted(skipped)), SIDE_MAX_BYTES // 1_000_000)
    root = None
    for name in small:
        try:
            path = hf_hub_download(repo, name, revision=commit, cache_dir=cache_dir)
        except _hub_exceptions() as e:
            raise _hub_error(e, repo, revision, name) from None
        root = os.path.dirname(path)
    if root is None:
        root = snap if os.path.isdir(snap) else _empty_dir()
    return Resolved(text, root, repo, revision, commit, cache_dir, listing)


def _offline_error():
    from huggingface_hub.errors import OfflineModeIsEnabled

    return OfflineModeIsEnabled("not cached")


def _empty_dir() -> str:
    import tempfile

    return tempfile.mkdtemp(prefix="expo-empty-")


# ---- worker side ------------------------------------------------------------------------------------------------

_LOCK = threading.Lock()
_PATHS: dict[tuple[str, str | None], str] = {}
_RECORD: dict[str, dict] = {}


def local_path(ref: str, cache_dir: str | None = None) -> str:
    """The local path of a weight file named in the plan. Plain paths are returned as they are.

    An hf:// ref is looked up in this node's cache (cache_dir, else HF_HUB_CACHE / HF_HOME of this process) and
    downloaded into it with hf_hub_download, pinned to the ref's commit, if it is not there. Thread- and
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
    if downloaded:
        try:
            path = hf_hub_download(repo, filename, revision=commit, cache_dir=cache_dir)
        except _hub_exceptions() as e:
            raise _hub_error(e, repo, commit, filename) from None
    with _LOCK:
        _PATHS[key] = path
        _RECORD.setdefault(ref, {"ref": ref, "repo_id": repo, "commit": commit, "file": filename,
                                 "bytes": os.path.getsize(path), "downloaded": downloaded,
                                 "seconds": round(time.monotonic() - t0, 3), "path": path})
    return path


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
