"""Hugging Face Hub fixtures for tests: a cache laid out as huggingface_hub lays it, and a small local Hub server.

lay_out(cache_dir, repo_id, folder, ...) writes, for the files of a model folder,

    models--org--name/blobs/<sha256 for LFS files | git blob sha1 for small files>   the bytes
    models--org--name/snapshots/<commit>/<file>  ->  ../../blobs/<hash>              relative symlinks
    models--org--name/refs/<branch>                                                  the commit, no newline
    models--org--name/trees/<commit>.json                                            the tree listing (optional)

which is what hf_hub_download / snapshot_download write (test_hub checks it against the library's own downloads
from FakeHub). FakeHub serves repos over HTTP the way the Hub's API does for what huggingface_hub calls here
(repo info, tree listing, HEAD/GET /resolve with byte ranges, the X-Error-Code answers for gated / missing repos,
revisions and files), and counts the bytes it serves per file.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import re
import shutil
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlparse

# what a fresh Hub repo's .gitattributes sends to LFS (plus anything over 10 MB)
LFS_SUFFIXES = (".7z", ".arrow", ".bin", ".bz2", ".ckpt", ".ftz", ".gz", ".h5", ".joblib", ".mlmodel", ".model",
                ".msgpack", ".npy", ".npz", ".onnx", ".ot", ".parquet", ".pb", ".pickle", ".pkl", ".pt", ".pth",
                ".rar", ".safetensors", ".tar", ".tflite", ".tgz", ".wasm", ".xz", ".zip", ".zst", ".gguf")


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def sha256_file(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


def fake_commit(*parts) -> str:
    return hashlib.sha1(repr(parts).encode()).hexdigest()


class RepoFileInfo:
    """One file of a repo as the Hub describes it."""

    def __init__(self, path: str, src: str):
        self.path, self.src = path, src
        self.size = os.path.getsize(src)
        is_lfs = path.endswith(LFS_SUFFIXES) or self.size > 10_000_000
        if is_lfs:
            self.sha256 = sha256_file(src)
            self.etag = self.sha256
            self.blob_id = git_blob_sha1(lfs_pointer(self.sha256, self.size))
        else:
            self.sha256 = None
            self.blob_id = git_blob_sha1(pathlib.Path(src).read_bytes())
            self.etag = self.blob_id

    @property
    def lfs(self) -> bool:
        return self.sha256 is not None

    def tree_entry(self) -> dict:
        e = {"type": "file", "oid": self.blob_id, "size": self.size, "path": self.path}
        if self.lfs:
            e["lfs"] = {"oid": self.sha256, "size": self.size, "pointerSize": len(lfs_pointer(self.sha256, self.size))}
        return e


def repo_files(folder, extra: dict[str, str] | None = None) -> dict[str, RepoFileInfo]:
    """path in repo -> info, for every file under folder (subfolders too) plus extra {path: source file}."""
    folder = pathlib.Path(folder)
    out = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            rel = p.relative_to(folder).as_posix()
            out[rel] = RepoFileInfo(rel, str(p))
    for rel, src in (extra or {}).items():
        out[rel] = RepoFileInfo(rel, str(src))
    return out


def storage_folder(cache_dir, repo_id: str) -> pathlib.Path:
    return pathlib.Path(cache_dir) / ("models--" + repo_id.replace("/", "--"))


def lay_out(cache_dir, repo_id: str, folder, *, commit: str | None = None, refs=("main",), only=None,
            extra: dict[str, str] | None = None, tree: bool = True) -> str:
    """Put a model folder into an HF cache as repo_id at commit; return the commit.

    only: the repo paths actually downloaded (default all); the rest exist on the "Hub" (tree listing) but not
    in the cache. tree: write trees/<commit>.json as snapshot_download does.
    """
    files = repo_files(folder, extra)
    commit = commit or fake_commit(repo_id, sorted((f.path, f.etag) for f in files.values()))
    store = storage_folder(cache_dir, repo_id)
    for f in files.values():
        if only is not None and f.path not in only:
            continue
        blob = store / "blobs" / f.etag
        blob.parent.mkdir(parents=True, exist_ok=True)
        if not blob.exists():
            shutil.copyfile(f.src, blob)
        link = store / "snapshots" / commit / f.path
        link.parent.mkdir(parents=True, exist_ok=True)
        if link.is_symlink() or link.exists():
            link.unlink()
        os.symlink(os.path.relpath(blob, link.parent), link)
    for ref in refs:
        r = store / "refs" / ref
        r.parent.mkdir(parents=True, exist_ok=True)
        r.write_text(commit)  # no newline, as huggingface_hub writes it
    if tree:
        entries = {}
        for f in files.values():
            e = {"size": f.size, "blob_id": f.blob_id}
            if f.lfs:
                e.update(lfs_sha256=f.sha256, lfs_size=f.size)
            entries[f.path] = e
        t = store / "trees" / f"{commit}.json"
        t.parent.mkdir(parents=True, exist_ok=True)
        t.write_text(json.dumps({"format_version": 1, "files": dict(sorted(entries.items()))}, indent=1))
    return commit


def cache_layout(cache_dir, repo_id: str) -> dict:
    """What a repo's cache holds: {refs: {name: commit}, snapshots: {commit: {path: blob name}}, blobs: set}."""
    store = storage_folder(cache_dir, repo_id)
    refs = {p.relative_to(store / "refs").as_posix(): p.read_text() for p in (store / "refs").rglob("*") if p.is_file()}
    snaps = {}
    for snap in (store / "snapshots").iterdir():
        snaps[snap.name] = {}
        for p in snap.rglob("*"):
            if p.is_symlink():
                target = os.readlink(p)
                assert not os.path.isabs(target), target
                assert (p.parent / target).resolve().parent == (store / "blobs").resolve(), target
                snaps[snap.name][p.relative_to(snap).as_posix()] = pathlib.Path(target).name
    blobs = {p.name for p in (store / "blobs").iterdir()}
    return {"refs": refs, "snapshots": snaps, "blobs": blobs}


# ---- a local Hub ------------------------------------------------------------------------------------------------


class HubRepo:
    def __init__(self, repo_id: str, gated_token: str | None = None):
        self.repo_id, self.gated_token = repo_id, gated_token
        self.commits: dict[str, dict[str, RepoFileInfo]] = {}
        self.refs: dict[str, str] = {}

    def add_commit(self, folder, *, commit: str | None = None, refs=("main",), extra=None) -> str:
        files = repo_files(folder, extra)
        commit = commit or fake_commit(self.repo_id, sorted((f.path, f.etag) for f in files.values()))
        self.commits[commit] = files
        for r in refs:
            self.refs[r] = commit
        return commit


class FakeHub:
    """A threaded HTTP server on 127.0.0.1 answering what huggingface_hub asks the Hub here. Use as HF_ENDPOINT."""

    def __init__(self):
        self.repos: dict[str, HubRepo] = {}
        self.lock = threading.Lock()
        self.served: dict[tuple[str, str], int] = {}  # (repo, path) -> body bytes sent by GET /resolve
        self.log: list[tuple] = []  # (method, path, range header)
        self.failures: dict[tuple[str, str], list[int]] = {}  # (method, file) -> statuses for its next requests
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def do_HEAD(self):
                hub._handle(self, head=True)

            def do_GET(self):
                hub._handle(self, head=False)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()

    def add_repo(self, repo_id: str, folder, *, gated_token: str | None = None, **kw) -> str:
        repo = self.repos.setdefault(repo_id, HubRepo(repo_id, gated_token))
        return repo.add_commit(folder, **kw)

    def fail_next(self, fpath: str, *statuses: int, method: str = "GET") -> None:
        """Answer the next `method` requests for fpath with these statuses, in order (0: drop the connection)."""
        with self.lock:
            self.failures.setdefault((method, fpath), []).extend(statuses)

    def reset_stats(self):
        with self.lock:
            self.served.clear()
            self.log.clear()

    def bytes_served(self, repo_id: str | None = None, path: str | None = None) -> int:
        with self.lock:
            return sum(n for (r, p), n in self.served.items()
                       if (repo_id is None or r == repo_id) and (path is None or p == path))

    # ---- request handling ----

    def _reply(self, h, status: int, body: bytes = b"", headers: dict | None = None, head: bool = False):
        h.send_response(status)
        hdrs = {"Content-Length": str(len(body)), **(headers or {})}
        for k, v in hdrs.items():
            h.send_header(k, v)
        h.end_headers()
        if not head and body:
            h.wfile.write(body)

    def _error(self, h, status: int, code: str, message: str, head: bool, commit: str | None = None):
        hdrs = {"X-Error-Code": code, "X-Error-Message": message, "Content-Type": "application/json"}
        if commit:
            hdrs["X-Repo-Commit"] = commit
        self._reply(h, status, json.dumps({"error": message}).encode(), hdrs, head)

    def _repo_and_commit(self, h, repo_id: str, rev: str, head: bool, files: bool):
        repo = self.repos.get(repo_id)
        if repo is None:
            self._error(h, 401, "RepoNotFound", "Repository not found", head)
            return None, None
        if files and repo.gated_token is not None:
            auth = h.headers.get("Authorization", "")
            if auth != f"Bearer {repo.gated_token}":
                self._error(h, 401 if not auth else 403, "GatedRepo",
                            f"Access to model {repo_id} is restricted. You must have access to it and be "
                            "authenticated to access it. Please log in.", head)
                return None, None
        commit = repo.refs.get(rev, rev if rev in repo.commits else None)
        if commit is None:
            self._error(h, 404, "RevisionNotFound", f"Invalid rev id: {rev}", head)
            return None, None
        return repo, commit

    def _handle(self, h, head: bool):
        u = urlparse(h.path)
        path = u.path
        rng = h.headers.get("Range")
        with self.lock:
            self.log.append(("HEAD" if head else "GET", unquote(path), rng))
        m = re.fullmatch(r"/api/models/([^/]+/[^/]+)(?:/revision/([^/]+))?", path)
        if m:
            repo, commit = self._repo_and_commit(h, m.group(1), unquote(m.group(2) or "main"), head, files=False)
            if repo is None:
                return
            doc = {"id": repo.repo_id, "sha": commit, "private": False, "gated": bool(repo.gated_token),
                   "siblings": [{"rfilename": p} for p in sorted(repo.commits[commit])]}
            return self._reply(h, 200, json.dumps(doc).encode(), {"Content-Type": "application/json"}, head)
        m = re.fullmatch(r"/api/models/([^/]+/[^/]+)/tree/([^/]+)(?:/(.*))?", path)
        if m:
            repo, commit = self._repo_and_commit(h, m.group(1), unquote(m.group(2)), head, files=False)
            if repo is None:
                return
            prefix = unquote(m.group(3) or "").strip("/")
            recursive = "recursive=true" in (u.query or "").lower() or "recursive=1" in (u.query or "")
            items, dirs = [], set()
            for p, f in sorted(repo.commits[commit].items()):
                if prefix and not p.startswith(prefix + "/"):
                    continue
                rest = p[len(prefix) + 1:] if prefix else p
                if "/" in rest and not recursive:
                    d = (prefix + "/" if prefix else "") + rest.split("/")[0]
                    if d not in dirs:
                        dirs.add(d)
                        items.append({"type": "directory", "oid": fake_commit(d), "size": 0, "path": d})
                    continue
                items.append(f.tree_entry())
            return self._reply(h, 200, json.dumps(items).encode(), {"Content-Type": "application/json"}, head)
        m = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
        if m:
            repo, commit = self._repo_and_commit(h, m.group(1), unquote(m.group(2)), head, files=True)
            if repo is None:
                return
            fpath = unquote(m.group(3))
            with self.lock:
                fail = self.failures.get(("HEAD" if head else "GET", fpath))
                status = fail.pop(0) if fail else None
            if status == 0:
                h.close_connection = True
                h.connection.shutdown(2)  # no answer at all: the client sees the connection reset
                return
            if status is not None:
                return self._error(h, status, "Unavailable", f"try again later ({status})", head)
            f = repo.commits[commit].get(fpath)
            if f is None:
                return self._error(h, 404, "EntryNotFound", f"{fpath} does not exist", head, commit)
            hdrs = {"X-Repo-Commit": commit, "ETag": f'"{f.etag}"', "Accept-Ranges": "bytes",
                    "Content-Type": "application/octet-stream"}
            if f.lfs:
                hdrs.update({"X-Linked-Etag": f'"{f.etag}"', "X-Linked-Size": str(f.size)})
            start, end = 0, f.size
            status = 200
            if rng and not head:
                mm = re.fullmatch(r"bytes=(\d+)-(\d*)", rng.strip())
                if mm:
                    start = int(mm.group(1))
                    end = min(f.size, int(mm.group(2)) + 1) if mm.group(2) else f.size
                    if start >= f.size:
                        return self._reply(h, 416, b"", {"Content-Range": f"bytes */{f.size}"}, head)
                    status = 206
                    hdrs["Content-Range"] = f"bytes {start}-{end - 1}/{f.size}"
            if head:
                hdrs_h = dict(hdrs)
                h.send_response(200)
                for k, v in {**hdrs_h, "Content-Length": str(f.size)}.items():
                    h.send_header(k, v)
                h.end_headers()
                return
            with open(f.src, "rb") as fh:
                fh.seek(start)
                body = fh.read(end - start)
            with self.lock:
                key = (repo.repo_id, fpath)
                self.served[key] = self.served.get(key, 0) + len(body)
            return self._reply(h, status, body, hdrs)
        self._error(h, 404, "NotFound", f"no route {path}", head)
