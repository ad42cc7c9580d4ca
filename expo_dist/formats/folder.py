"""A Hugging Face model folder: every file name expo_dist reads or writes, and which files are side files.

The weight files and their indexes (safetensors and torch .bin), the shard names of a sharded checkpoint, the
files expo_dist adds to an output folder (model card, manifest, work folder), and the side files (config,
tokenizer, chat template...) that go from the aligned model into the output as they are.
"""

from __future__ import annotations

import os
import re
import stat

INDEX = "model.safetensors.index.json"  # {"metadata": {"total_size": N}, "weight_map": {tensor: file}}
SINGLE = "model.safetensors"
BIN_INDEX = "pytorch_model.bin.index.json"
BIN_SINGLE = "pytorch_model.bin"
SHARD = re.compile(r"model(-\d{5,}-of-\d{5,})?\.safetensors")  # what shard_name() writes
MANIFEST = "expo_manifest.json"
CARD = "README.md"
WORK = ".expo"  # the work folder of an unfinished merge: staged shards, journal, lock

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".onnx")
SKIP_FILES = {CARD, ".gitattributes", INDEX, BIN_INDEX, MANIFEST}


def shard_name(i: int, total: int) -> str:
    """The name of shard i (from 0) of total, as huggingface_hub writes them."""
    return SINGLE if total == 1 else f"model-{i + 1:05d}-of-{total:05d}.safetensors"


def plain_name(name) -> bool:
    """A file name that stays in its folder: no separators, not '.' or '..', no NUL."""
    return (isinstance(name, str) and bool(name) and name not in (".", "..")
            and not any(c in name for c in "/\\\0"))


def is_side_file(name: str) -> bool:
    """A top-level file of the aligned model that goes into the output as it is (config, tokenizer, template...)."""
    return not (name in SKIP_FILES or name.startswith(".") or name.endswith(WEIGHT_SUFFIXES)
                or name.endswith(".index.json"))


def side_file_source(aligned_root: str, name: str) -> tuple[str | None, str]:
    """Where side file `name` of the aligned model really is, or (None, why it is skipped).

    A symlink is followed only to a regular file inside the model folder or, for a snapshot in the Hugging Face
    cache, inside that repo's blob store (snapshots/<commit>/name -> ../../blobs/<hash>). A link anywhere else
    (a cloned repo whose merges.txt points at ~/.ssh/id_rsa, /proc/self/environ, /dev/...) and anything that is
    not a regular file (a FIFO, a device) would copy what is not the model's into the folder people publish."""
    path = os.path.join(aligned_root, name)
    root = os.path.realpath(aligned_root)
    real = os.path.realpath(path)
    allowed = [root]
    if os.path.basename(os.path.dirname(root)) == "snapshots":
        allowed.append(os.path.join(os.path.dirname(os.path.dirname(root)), "blobs"))
    if not any(real.startswith(a.rstrip(os.sep) + os.sep) for a in allowed):
        return None, f"a symlink to {real}, outside the model folder"
    try:
        mode = os.stat(real, follow_symlinks=False).st_mode
    except OSError as e:
        return None, f"cannot be read ({e.strerror})"
    if not stat.S_ISREG(mode):
        return None, "not a regular file"
    return real, ""


def side_files(aligned_root: str, warn: list[str] | None = None) -> list[str]:
    """The aligned model's side files that go into the output; those skipped for safety go into warn."""
    names = []
    for name in sorted(os.listdir(aligned_root)):
        if not is_side_file(name):
            continue
        try:
            mode = os.lstat(os.path.join(aligned_root, name)).st_mode
        except OSError:
            continue
        if stat.S_ISDIR(mode):
            continue
        real, why = side_file_source(aligned_root, name)
        if real is None:
            if warn is not None:
                warn.append(f"side file {name} of the aligned model not copied: {why}")
            continue
        names.append(name)
    return names
