"""Model sources: a local folder, an s3://bucket/prefix (sources.s3), or a Hugging Face Hub repo id with an optional
@revision.

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
  own node with fetch.local_path(), which downloads it into that node's cache (hf_hub_download, pinned to the
  commit) the first time and reuses it after. The byte offsets in the cached file are those on the Hub, so the
  plan holds.

The Hub calls themselves live in hub.py; the worker side in fetch.py.
"""

from __future__ import annotations

import atexit
import logging
import os
import re
import shutil
from dataclasses import dataclass, field

from ..errors import ExpoError
from ..formats.folder import is_side_file, plain_name
from ..formats.reader import LocalReader
from ..settings import HUB_ATTEMPTS
from . import s3
from .hub import HubReader, cached_listing, check_revision, offline_error, resolve_commit, snapshot_dir
from .hubretry import hub_error, hub_exceptions

log = logging.getLogger("expo_dist")

HF_SCHEME = "hf://"
_REF = re.compile(r"hf://(?P<repo>[^@]+)@(?P<commit>[0-9a-f]{40})/(?P<file>[^/\\]+)\Z")  # a plain file name
SIDE_MAX_BYTES = 100_000_000  # a top-level non-weight file larger than this is not a side file (not downloaded)


# ---- parsing what the user typed ------------------------------------------------------------------------------


@dataclass(frozen=True)
class SourceSpec:
    text: str
    path: str | None = None  # a local folder
    repo_id: str | None = None
    revision: str | None = None  # None: the default branch
    s3: str | None = None  # an s3://bucket/prefix


def parse_source(text: str) -> SourceSpec:
    """'./dir', '/abs/dir' -> local; 'org/name', 'org/name@rev', 'hf://org/name@rev' -> Hub.

    A folder that exists wins over a repo id of the same spelling."""
    if not isinstance(text, str) or not text.strip():
        raise ExpoError("a model source is empty: give a local folder or a Hub repo id (org/name[@revision])")
    text = text.strip()
    if s3.is_s3(text):
        s3.split(text)  # a valid bucket and key, or one line
        return SourceSpec(text, s3=s3.prefix(text))
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
    check_revision(repo, revision or None)
    return SourceSpec(text, repo_id=repo, revision=revision or None)


def is_ref(ref: str) -> bool:
    return isinstance(ref, str) and ref.startswith(HF_SCHEME)


def parse_ref(ref: str) -> tuple[str, str, str]:
    """'hf://org/name@<commit>/<file>' -> (repo_id, commit, filename)."""
    m = _REF.match(ref) if isinstance(ref, str) else None
    if not m or m.group("file") in (".", "..") or ".." in m.group("repo"):
        raise ExpoError(f"{ref}: not a weight file reference (hf://org/name@<40-hex commit>/<file>)")
    return m.group("repo"), m.group("commit"), m.group("file")


def make_ref(repo_id: str, commit: str, filename: str) -> str:
    return f"{HF_SCHEME}{repo_id}@{commit}/{filename}"


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
    listing: dict[str, int | None] = field(default_factory=dict)  # Hub, S3: top-level files -> size
    readers: list = field(default_factory=list)
    hub_attempts: int = HUB_ATTEMPTS  # tries of each range request (Settings.hub_attempts)
    s3: str | None = None  # s3://bucket/prefix (root: a local temp folder holding its side files)

    @property
    def is_hub(self) -> bool:
        return self.repo_id is not None

    @property
    def remote(self) -> bool:
        return self.is_hub or self.s3 is not None

    @property
    def where(self) -> str:
        """How messages name the model."""
        if self.is_hub:
            return f"{self.repo_id}@{self.revision or 'main'}"
        return self.s3 or self.root

    def exists(self, name: str) -> bool:
        return name in self.listing if self.remote else os.path.isfile(os.path.join(self.root, name))

    def ref(self, name: str) -> str:
        """What the plan names a weight file by: an absolute path, s3://bucket/prefix/<file>, or
        hf://org/name@<commit>/<file>."""
        if self.s3 is not None:
            return s3.join(self.s3, name)
        return make_ref(self.repo_id, self.commit, name) if self.is_hub else os.path.join(self.root, name)

    def display(self, name: str) -> str:
        if self.is_hub:
            return f"{name} in {self.repo_id}@{self.revision or 'main'}"
        if self.s3 is not None:
            return s3.join(self.s3, name)
        return os.path.join(self.root, name)

    def local_file(self, name: str) -> str:
        """Local path of a small file (an index json): a folder's file, or downloaded (into the cache for the Hub;
        into root for S3), and only it."""
        if self.s3 is not None:
            path = os.path.join(self.root, name)
            if not os.path.exists(path):
                with open(path, "wb") as f:
                    f.write(s3.get_bytes(s3.join(self.s3, name)))
            return path
        if not self.is_hub:
            return os.path.join(self.root, name)
        from huggingface_hub import hf_hub_download

        try:
            return hf_hub_download(self.repo_id, name, revision=self.commit, cache_dir=self.cache_dir)
        except hub_exceptions() as e:
            raise hub_error(e, self.repo_id, self.revision, name) from None

    def cached(self, name: str) -> str | None:
        """Path of a Hub file in this machine's cache, if it is there."""
        from huggingface_hub import try_to_load_from_cache

        p = try_to_load_from_cache(self.repo_id, name, cache_dir=self.cache_dir, revision=self.commit)
        return p if isinstance(p, str) else None

    def reader(self, name: str):
        """Positional reads of a weight file: the local file (folder or cache) when there, else range requests."""
        if self.s3 is not None:
            r = s3.S3Reader(s3.join(self.s3, name), self.listing.get(name) or 0)
            self.readers.append(r)
            return r
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
        r = HubReader(self.repo_id, self.commit, name, self.display(name), self.listing.get(name),
                      attempts=self.hub_attempts)
        self.readers.append(r)
        return r

    @property
    def cache_root(self) -> str:
        from huggingface_hub import constants

        return self.cache_dir or constants.HF_HUB_CACHE

    def origin(self) -> dict:
        if self.s3 is not None:
            return {"url": self.s3}
        if self.is_hub:
            return {"repo_id": self.repo_id, "revision": self.revision or "main", "commit": self.commit}
        return {"path": self.root}

    @property
    def remote_bytes(self) -> int:
        return sum(r.bytes_fetched for r in self.readers)


def resolve(text: str, cache_dir: str | None = None, hub_attempts: int = HUB_ATTEMPTS) -> Resolved:
    """Resolve a source for planning. For a Hub repo: pin the commit, list the files, fetch the side files only;
    hub_attempts: tries of each header range request (Settings.hub_attempts)."""
    spec = parse_source(text)
    if spec.s3 is not None:
        return _resolve_s3(text, spec.s3)
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
        commit = resolve_commit(repo, revision, cache_dir)
    except hub_exceptions() as e:
        raise hub_error(e, repo, revision) from None
    snap = snapshot_dir(repo, commit, cache_dir)
    listing = cached_listing(repo, commit, cache_dir)
    offline = constants.is_offline_mode()
    if listing is None and not offline:
        try:
            listing = {f.path: f.size for f in api.list_repo_tree(repo, revision=commit) if isinstance(f, RepoFile)}
        except hub_exceptions() as e:
            if getattr(e, "response", None) is not None or not os.path.isdir(snap):
                raise hub_error(e, repo, revision) from None
            # the Hub cannot be reached: as huggingface_hub does, fall back on the cached snapshot
            log.warning("%s: the Hub cannot be reached (%s); using the cached snapshot %s", repo,
                        e.__class__.__name__, commit[:12])
    if listing is None:
        if not os.path.isdir(snap):
            raise hub_error(offline_error(), repo, revision)
        listing = {n: os.path.getsize(os.path.join(snap, n)) for n in sorted(os.listdir(snap))
                   if os.path.isfile(os.path.join(snap, n))}

    small = [n for n, size in sorted(listing.items()) if is_side_file(n) and (size is None or size <= SIDE_MAX_BYTES)]
    skipped = [n for n, size in listing.items() if is_side_file(n) and size is not None and size > SIDE_MAX_BYTES]
    if skipped:
        log.warning("%s: not fetching %s (over %d MB; not a config or tokenizer file)", repo,
                    ", ".join(sorted(skipped)), SIDE_MAX_BYTES // 1_000_000)
    root = None
    for name in small:
        try:
            path = hf_hub_download(repo, name, revision=commit, cache_dir=cache_dir)
        except hub_exceptions() as e:
            raise hub_error(e, repo, revision, name) from None
        root = os.path.dirname(path)
    if root is None:
        root = snap if os.path.isdir(snap) else _empty_dir()
    return Resolved(text, root, repo, revision, commit, cache_dir, listing, hub_attempts=hub_attempts)


def _resolve_s3(text: str, url: str) -> Resolved:
    """A model under an s3:// prefix: list it, download only its side files (into a temp folder on this machine);
    weight headers are read with ranged GETs."""
    s3.check_bucket(url, "reading the model")
    listing = {n: o.size for n, o in s3.list_top(url).items() if n}
    if not listing:
        raise ExpoError(f"{url}: no objects under this prefix (is this a model's prefix?)")
    root = _empty_dir()
    atexit.register(shutil.rmtree, root, True)  # (a temp copy of the side files, for this process only)
    for name, size in sorted(listing.items()):
        if is_side_file(name) and size <= SIDE_MAX_BYTES and plain_name(name):
            with open(os.path.join(root, name), "wb") as f:
                f.write(s3.get_bytes(s3.join(url, name)))
    return Resolved(text, root, listing=listing, s3=url)


def _empty_dir() -> str:
    import tempfile

    return tempfile.mkdtemp(prefix="expo-empty-")
