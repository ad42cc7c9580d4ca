"""Index a model (local folder, s3:// prefix or Hub repo): every tensor's file, dtype, shape and byte range, from
headers alone."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from ..errors import ExpoError
from ..formats import jsonsafe
from ..formats.folder import BIN_INDEX, BIN_SINGLE, INDEX, SINGLE
from ..formats.safetensors import FileHeader, TensorEntry, bad_name, read_header
from ..formats.torchzip import read_bin_header
from ..settings import HUB_ATTEMPTS
from .refs import Resolved, resolve


@dataclass(frozen=True)
class TensorRef:
    """Where a tensor lives: its weight file and its header entry (dtype, shape, byte range). The one such record
    from the index to the planner."""

    file: str  # absolute path, s3://bucket/prefix/<file>, or hf://org/name@<commit>/<file> (fetch.local_path
    # resolves that one on a worker)
    entry: TensorEntry

    @property
    def dtype(self) -> str:
        return self.entry.dtype

    @property
    def shape(self) -> tuple[int, ...]:
        return self.entry.shape

    @property
    def begin(self) -> int:
        """The tensor's absolute byte offset in its file."""
        return self.entry.begin


@dataclass
class ModelIndex:
    root: str
    tensors: dict[str, TensorRef]
    files: dict[str, FileHeader] = field(default_factory=dict)
    config: dict = field(default_factory=dict)
    origin: dict = field(default_factory=dict)  # {"path": ...} or {"repo_id", "revision", "commit"}
    format: str = "safetensors"  # or "pytorch .bin"

    @property
    def total_bytes(self) -> int:
        return sum(t.entry.nbytes for t in self.tensors.values())


def _safe_name(root: str, name: str, where: str) -> str:
    if not isinstance(name, str) or not name or name.startswith(("/", "\\")) or "/" in name or "\\" in name \
            or name in (".", "..") or os.path.isabs(name) or bad_name(name):
        raise ExpoError(f"{where}: refuses weight file name {jsonsafe.shown(name, 80)} (must be a plain "
                        "file name inside the folder)")
    return os.path.join(root, name)


def read_config(root: str) -> dict:
    path = os.path.join(root, "config.json")
    if not os.path.lexists(path):
        return {}
    cfg = jsonsafe.load_file(path, f"{path}: cannot read config", "fix or re-download config.json")
    if not isinstance(cfg, dict):
        raise ExpoError(f"{path}: config is not a JSON object")
    return cfg


def _load_weight_map(index_path: str, kind: str, where: str) -> dict:
    what = f"{where}: not a valid {kind} index"
    doc = jsonsafe.load_file(index_path, what, "fix or re-download it")
    if not isinstance(doc, dict):
        got = "not a JSON object"
    elif not isinstance(doc.get("weight_map"), dict):
        got = f"weight_map is a {type(doc['weight_map']).__name__}" if "weight_map" in doc else "no weight_map"
    else:
        return doc["weight_map"]
    raise ExpoError(f"{what} ({got}; it needs a weight_map of tensor name -> file name)")


def _header(src: Resolved, name: str, kind: str) -> FileHeader:
    """A weight file's header (safetensors, or a .bin's zip directory and pickle), from the local file (folder or
    HF cache) or by range requests; no tensor data."""
    r = src.reader(name)
    try:
        return read_header(r) if kind == "safetensors" else read_bin_header(r)
    finally:
        r.close()


def index_model(source: str, cache_dir: str | None = None, hub_attempts: int = HUB_ATTEMPTS) -> ModelIndex:
    """Index a model: a local folder, or a Hub repo id[@revision] (see refs.resolve), holding model.safetensors,
    a sharded safetensors checkpoint, pytorch_model.bin or a sharded .bin checkpoint (torch.save zip format).

    Weight files are named by TensorRef.file: an absolute path, or hf://org/name@<commit>/<file> for the Hub.
    hub_attempts: tries of each Hub range request (Settings.hub_attempts)."""
    src = resolve(source, cache_dir, hub_attempts)
    root = src.root
    where = src.where
    for index_name, single_name, kind in ((INDEX, SINGLE, "safetensors"),
                                          (BIN_INDEX, BIN_SINGLE, "pytorch .bin")):
        if src.exists(index_name):
            index_path = src.local_file(index_name) if not src.remote else src.display(index_name)
            weight_map = _load_weight_map(src.local_file(index_name), kind, index_path)
            files = []
            for name in weight_map.values():
                _safe_name(root, name, index_path)
                if name not in files:
                    files.append(name)
            for name in files:
                if not src.exists(name):
                    raise ExpoError(f"{index_path}: names {name}, which is missing from {where}")
            break
        if src.exists(single_name):
            weight_map, files = None, [single_name]
            break
    else:
        raise ExpoError(f"{where}: no {SINGLE}, {INDEX}, {BIN_SINGLE} or {BIN_INDEX} "
                        "(is this a model folder?)")

    tensors: dict[str, TensorRef] = {}
    headers = {}
    if src.remote and len(files) > 1:  # remote headers: a few range requests at a time
        with ThreadPoolExecutor(8) as pool:
            found = list(pool.map(lambda name: _header(src, name, kind), files))
    else:
        found = [_header(src, name, kind) for name in files]
    for name, h in zip(files, found):
        path = src.ref(name)
        headers[path] = h
        for tname, entry in h.tensors.items():
            if tname in tensors:
                raise ExpoError(
                    f"{where}: tensor {tname!r} appears in both {os.path.basename(tensors[tname].file)} "
                    f"and {name}"
                )
            tensors[tname] = TensorRef(path, entry)
    if not tensors:
        raise ExpoError(f"{where}: its weight files hold no tensors; there is nothing to merge (is this the right "
                        "folder, and was the checkpoint saved completely?)")
    if weight_map is not None:
        for tname, fname in weight_map.items():
            ref = tensors.get(tname)
            if ref is None or os.path.basename(ref.file) != fname:
                raise ExpoError(f"{index_path}: maps {tname!r} to {fname}, which does not hold it")
        extra = sorted(set(tensors) - set(weight_map))
        if extra:
            raise ExpoError(f"{index_path}: tensors present in shards but not in weight_map: {', '.join(extra[:5])}")
    return ModelIndex(root, tensors, headers, read_config(root), origin=src.origin(), format=kind)
