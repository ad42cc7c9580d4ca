"""The output folder: preparing it, staging shards, and finishing it so that it is complete only at the end.

Shards are written under OUT/.expo/ and moved into place after every one is sealed (fsynced and hashed);
the manifest comes next and the weight index (or the single model.safetensors) last, so a folder that
transformers can load is always a complete one.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import stat

from .._version import __version__
from ..errors import ExpoError
from ..formats.folder import CARD, INDEX, MANIFEST, WORK, side_file_source, side_files
from ..planning.plan import Plan
from ..runtime.fileio import atomic_file, atomic_write, fsync_dir
from .manifest import Manifest, RunInfo

log = logging.getLogger("expo_dist")


def _inside(child: str, parent: str) -> bool:
    child, parent = os.path.realpath(child), os.path.realpath(parent)
    return child == parent or child.startswith(parent.rstrip(os.sep) + os.sep)


def check_out_dir(out: str, inputs: list[str]) -> None:
    for src in inputs:
        if src and os.path.isdir(src):
            if _inside(out, src):
                how = "the same as" if os.path.realpath(out) == os.path.realpath(src) else "inside"
                raise ExpoError(f"--out {out} is {how} "
                                f"the input {src}; choose a folder outside the input models")
            if _inside(src, out):
                raise ExpoError(f"--out {out} contains the input {src}; choose another output folder")


def work_dir(out: str) -> str:
    return os.path.join(out, WORK)


def create_shards(plan: Plan, wdir: str, keep: set[str] = frozenset()) -> None:
    """Pre-size each staged shard and write its header; workers fill in the data ranges."""
    os.makedirs(wdir, exist_ok=True)
    for shard in plan.shards:
        path = os.path.join(wdir, shard.file)
        if shard.file in keep and os.path.isfile(path) and not os.path.islink(path) \
                and os.path.getsize(path) == shard.layout.size:
            with open(path, "rb") as f:
                if f.read(len(shard.layout.header)) == shard.layout.header:
                    continue
        # never through a link someone left in the work folder: that would truncate its target (ELOOP instead)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        with open(fd, "wb") as f:
            f.write(shard.layout.header)
            f.truncate(shard.layout.size)


@contextlib.contextmanager
def open_side_file(aligned_root: str, name: str):
    """One side file of the aligned model, open for reading: opened without following links (checked just
    before: side_file_source) and only if it is a regular file."""
    real, why = side_file_source(aligned_root, name)
    if real is None:
        raise ExpoError(f"{os.path.join(aligned_root, name)}: {why}; the aligned model folder changed during the merge")
    fd = os.open(real, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    with os.fdopen(fd, "rb") as src:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ExpoError(f"{os.path.join(aligned_root, name)}: not a regular file")
        yield src


def copy_side_file(aligned_root: str, name: str, dst: str) -> None:
    """Copy one side file (open_side_file) whole or not at all."""
    with open_side_file(aligned_root, name) as src, atomic_file(dst) as f:
        shutil.copyfileobj(src, f, 1 << 20)


def output_names(plan: Plan, side: list[str]) -> list[str]:
    """Every name a finished output folder holds at its top (what --overwrite may later remove)."""
    names = [*side, CARD, MANIFEST, *(s.file for s in plan.shards)]
    return names + [INDEX] if len(plan.shards) > 1 else names


def _card_id(source: str) -> str:
    """How the card's base_model names a source: a Hub repo by its bare id (the Hub links it; the revision is in
    the text and the manifest), a folder by its path. Quoted, so that any path is valid YAML."""
    from ..sources.refs import parse_source

    try:
        spec = parse_source(str(source))
    except Exception:  # noqa: BLE001 - the card names what the user typed when it is not a valid source any more
        spec = None
    return json.dumps(spec.repo_id if spec is not None and spec.repo_id else str(source))


def model_card(info: RunInfo) -> str:
    sft, aligned, alpha = info.sft, info.aligned, info.alpha
    rules = info.alpha_rules or []
    rule_lines = "".join(f"  - `{r.get('match') or r.get('regex')}` ({'glob' if 'match' in r else 'regex'}): "
                         + (f"alpha {r['alpha']}" if "alpha" in r else f"alpha x {r['scale']}") + "\n"
                         for r in rules)
    rules_text = ("- per-tensor alpha rules (first match wins; other tensors take the alpha above):\n" + rule_lines
                  if rules else "")
    return f"""---
base_model:
- {_card_id(aligned)}
- {_card_id(sft)}
tags:
- expo
- merge
- expo_dist
library_name: transformers
---
# ExPO extrapolation of {os.path.basename(str(aligned).rstrip('/'))}

This model was made with [expo_dist](https://pypi.org/project/expo_dist/) {__version__} by weak-to-strong
extrapolation (ExPO; Zheng et al., 2024, "Weak-to-Strong Extrapolation Expedites Alignment"):

    theta_expo = theta_aligned + alpha * (theta_aligned - theta_sft)

- aligned model: `{aligned}`
- SFT model: `{sft}`
- alpha: {alpha}
{rules_text}
Every floating-point tensor was computed in float64 and rounded once to its output dtype. Tensors that
are not floating point were copied from the aligned model. The config, generation config and tokenizer
files come from the aligned model. `{MANIFEST}` lists the inputs, the settings and the sha256 of every
weight file.
"""


def documents(plan: Plan, info: RunInfo, sealed: dict[str, dict], side: list[str], warnings: list[str],
              variant: int = 0) -> tuple[dict, dict[str, bytes]]:
    """What an output holds besides its shards and side files: (manifest, {name: bytes} of the card, the manifest
    and, for a sharded model, the index), whatever the output is (folder, bucket prefix, Hub commit).

    variant: which alpha of a sweep this output holds (per-tensor alphas in the manifest)."""
    manifest = Manifest(
        info, total_size=plan.total_size, files={s.file: sealed[s.file] for s in plan.shards},
        tensors={k: {"op": d.op, "dtype": d.dtype, "shape": list(d.shape), "alpha": d.alphas[variant] if d.alphas
                     else None} for k, d in plan.decisions.items()},
        warnings=warnings, written=output_names(plan, side)).to_json()
    docs = {CARD: model_card(info).encode(), MANIFEST: json.dumps(manifest, indent=2).encode()}
    if len(plan.shards) > 1:
        index = {"metadata": {"total_size": plan.total_size}, "weight_map": dict(sorted(plan.weight_map().items()))}
        docs[INDEX] = (json.dumps(index, indent=2) + "\n").encode()
    return manifest, docs


def skipped_side_files(plan: Plan, aligned_root: str) -> tuple[list[str], list[str]]:
    """(the side files to copy, warnings about links and special files not said before the merge)."""
    skipped: list[str] = []
    side = side_files(aligned_root, skipped)
    skipped = [w for w in skipped if w not in plan.warnings]  # build_plan said these before the merge
    for w in skipped:
        log.warning("%s", w)
    return side, skipped


def finish(out: str, plan: Plan, aligned_root: str, info: RunInfo, sealed: dict[str, dict], variant: int = 0) -> dict:
    """Copy side files, write card and manifest, move shards into place, write the index last."""
    wdir = work_dir(out)
    side, skipped = skipped_side_files(plan, aligned_root)
    for name in side:
        copy_side_file(aligned_root, name, os.path.join(out, name))
    manifest, docs = documents(plan, info, sealed, side, plan.warnings + skipped, variant)
    atomic_write(os.path.join(out, CARD), docs[CARD])
    atomic_write(os.path.join(out, MANIFEST), docs[MANIFEST])
    for shard in plan.shards:
        os.replace(os.path.join(wdir, shard.file), os.path.join(out, shard.file))
    fsync_dir(out)
    if INDEX in docs:
        atomic_write(os.path.join(out, INDEX), docs[INDEX])
        fsync_dir(out)
    shutil.rmtree(wdir, ignore_errors=True)
    return manifest
