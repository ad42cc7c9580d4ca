"""Index a model folder: every tensor's file, dtype, shape and byte range, from headers alone."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

from .errors import ExpoError
from .stfile import FileHeader, TensorEntry, read_header

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


@dataclass(frozen=True)
class TensorRef:
    file: str  # absolute path
    entry: TensorEntry

    @property
    def dtype(self) -> str:
        return self.entry.dtype

    @property
    def shape(self) -> tuple[int, ...]:
        return self.entry.shape


@dataclass
class ModelIndex:
    root: str
    tensors: dict[str, TensorRef]
    files: dict[str, FileHeader] = field(default_factory=dict)
    config: dict = field(default_factory=dict)

    @property
    def total_bytes(self) -> int:
        return sum(t.entry.nbytes for t in self.tensors.values())


def _safe_name(root: str, name: str, where: str) -> str:
    if not isinstance(name, str) or not name or name.startswith(("/", "\\")) or "/" in name or "\\" in name \
            or name in (".", "..") or os.path.isabs(name):
        raise ExpoError(f"{where}: refuses weight file name {name!r} (must be a plain file name inside the folder)")
    return os.path.join(root, name)


def read_config(root: str) -> dict:
    path = os.path.join(root, "config.json")
    if not os.path.exists(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            cfg = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ExpoError(f"{path}: cannot read config ({e})")
    if not isinstance(cfg, dict):
        raise ExpoError(f"{path}: config is not a JSON object")
    return cfg


def index_model(root: str) -> ModelIndex:
    """Index a local model folder holding model.safetensors or a sharded safetensors checkpoint."""
    root = os.path.abspath(root)
    if not os.path.isdir(root):
        raise ExpoError(f"{root}: not a directory (give a local model folder)")
    index_path = os.path.join(root, INDEX_NAME)
    if os.path.exists(index_path):
        try:
            with open(index_path, encoding="utf-8") as f:
                doc = json.load(f)
            weight_map = doc["weight_map"]
            assert isinstance(weight_map, dict)
        except (OSError, json.JSONDecodeError, KeyError, TypeError, AssertionError) as e:
            raise ExpoError(f"{index_path}: not a valid safetensors index ({e.__class__.__name__}: {e})")
        files = []
        for name in weight_map.values():
            path = _safe_name(root, name, index_path)
            if path not in files:
                files.append(path)
        for path in files:
            if not os.path.exists(path):
                raise ExpoError(f"{index_path}: names {os.path.basename(path)}, which is missing from {root}")
    elif os.path.exists(os.path.join(root, SINGLE_NAME)):
        weight_map = None
        files = [os.path.join(root, SINGLE_NAME)]
    else:
        raise ExpoError(f"{root}: no {SINGLE_NAME} or {INDEX_NAME} (is this a model folder?)")

    tensors: dict[str, TensorRef] = {}
    headers = {}
    for path in files:
        h = read_header(path)
        headers[path] = h
        for name, entry in h.tensors.items():
            if name in tensors:
                raise ExpoError(
                    f"{root}: tensor {name!r} appears in both {os.path.basename(tensors[name].file)} "
                    f"and {os.path.basename(path)}"
                )
            tensors[name] = TensorRef(path, entry)
    if weight_map is not None:
        for name, fname in weight_map.items():
            ref = tensors.get(name)
            if ref is None or os.path.basename(ref.file) != fname:
                raise ExpoError(f"{index_path}: maps {name!r} to {fname}, which does not hold it")
        extra = sorted(set(tensors) - set(weight_map))
        if extra:
            raise ExpoError(f"{index_path}: tensors present in shards but not in weight_map: {', '.join(extra[:5])}")
    return ModelIndex(root, tensors, headers, read_config(root))
