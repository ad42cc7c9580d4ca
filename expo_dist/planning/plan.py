"""The merge plan: pure code, no Ray and no I/O.

Matches tensors by name, decides each tensor's op, lays out the output shards and cuts the work into
tasks. A task is one contiguous byte range of one output file; it is a list of segments, each a run of
elements of one tensor with a single op. Task boundaries fall on MiB-aligned file offsets (page aligned,
and always on an element boundary because every tensor starts at a multiple of its item size).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..errors import ExpoError
from ..formats.dtypes import extrapolatable, is_float, itemsize
from ..formats.folder import shard_name
from ..formats.jsonsafe import shown
from ..formats.safetensors import Layout, alignment_order, layout

if TYPE_CHECKING:
    from ..sources.index import ModelIndex, TensorRef

MIB = 1 << 20
EXTRAPOLATE, COPY = "extrapolate", "copy"
VOCAB_NAME = re.compile(r"(embed|wte|lm_head|word_embeddings|tok_embeddings|(^|\.)output\.weight$)")
ARCH_KEYS = ("model_type", "architectures", "hidden_size", "num_hidden_layers", "num_attention_heads",
             "num_key_value_heads", "intermediate_size", "head_dim")


def tensor_sources(index: ModelIndex) -> dict[str, TensorRef]:
    """Every tensor of an indexed model (sources.index) as the planner takes it: name -> TensorRef (file, dtype,
    shape, absolute byte offset `begin`)."""
    return dict(index.tensors)


@dataclass(frozen=True)
class Segment:
    op: str  # EXTRAPOLATE or COPY
    tensor: str
    out_offset: int  # absolute offset in the output file
    count: int  # elements
    out_dtype: str
    a_file: str
    a_offset: int
    a_dtype: str
    s_file: str | None  # for COPY: the SFT bytes to compare against (None: nothing to compare)
    s_offset: int
    s_dtype: str
    alphas: tuple[float, ...]  # one per output (several with an alpha sweep)

    @property
    def alpha(self) -> float:
        return self.alphas[0] if self.alphas else 0.0

    @property
    def out_bytes(self) -> int:
        return self.count * itemsize(self.out_dtype)

    @property
    def in_bytes(self) -> int:
        n = self.count * itemsize(self.a_dtype)
        if self.op == EXTRAPOLATE:
            n += self.count * itemsize(self.s_dtype)
        return n


@dataclass(frozen=True)
class Task:
    id: int
    shard: int
    file: str  # output file name (relative to the output folder)
    begin: int
    end: int
    segments: tuple[Segment, ...]

    @property
    def nbytes(self) -> int:
        return self.end - self.begin

    @property
    def in_bytes(self) -> int:
        return sum(s.in_bytes for s in self.segments)

    @property
    def input_files(self) -> tuple[str, ...]:
        out = []
        for s in self.segments:
            for f in (s.a_file, s.s_file if s.op == EXTRAPOLATE else None):
                if f and f not in out:
                    out.append(f)
        return tuple(out)


@dataclass(frozen=True)
class Shard:
    file: str
    layout: Layout


@dataclass
class TensorDecision:
    name: str
    op: str  # "extrapolate" | "copy" | "vocab-extended" | "dropped-tied"
    shape: tuple[int, ...]
    dtype: str
    alphas: tuple[float, ...] | None
    note: str = ""

    @property
    def alpha(self) -> float | None:
        return self.alphas[0] if self.alphas else None


@dataclass
class Plan:
    shards: list[Shard]
    tasks: list[Task]
    decisions: dict[str, TensorDecision]
    warnings: list[str] = field(default_factory=list)

    @property
    def n_out(self) -> int:
        """Outputs written from one read of the inputs (several with an alpha sweep)."""
        return max((len(d.alphas) for d in self.decisions.values() if d.alphas), default=1)

    @property
    def total_size(self) -> int:
        """Tensor bytes of the output (what HF writes as metadata.total_size)."""
        return sum(e.nbytes for sh in self.shards for e in sh.layout.tensors.values())

    @property
    def bytes_read(self) -> int:
        return sum(t.in_bytes for t in self.tasks)

    @property
    def bytes_written(self) -> int:
        return sum(s.layout.size for s in self.shards)

    def weight_map(self) -> dict[str, str]:
        return {name: sh.file for sh in self.shards for name in sh.layout.tensors}


def natural_key(name: str):
    """'layers.10' after 'layers.9'. A run of digits compares by value without int(): a crafted name can hold more
    digits than Python's int-string limit."""
    key = []
    for i, p in enumerate(re.split(r"(\d+)", name)):
        digits = p.lstrip("0")
        key.append((0, len(digits), digits, "") if i % 2 else (1, 0, "", p))
    return key


def parse_size(text) -> int:
    """'5GB' -> 5_000_000_000, '64MiB' -> 67108864, 1000 -> 1000."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?)(i?)B?\s*", str(text), re.IGNORECASE)
    if not m:
        raise ExpoError(f"cannot read size {text!r}; write e.g. 5GB, 512MiB or 1000000")
    num, unit, binary = float(m.group(1)), m.group(2).upper(), bool(m.group(3))
    scale = (1024 if binary else 1000) ** " KMGT".index(unit or " ")
    return int(num * scale)


def _flag(cfg: dict, key: str, who: str) -> bool | None:
    """A boolean of config.json: true, false, or not set (absent or null); anything else is refused."""
    value = cfg.get(key)
    if value is not None and not isinstance(value, bool):
        raise ExpoError(f"{who} config.json: {key} is {shown(value, 60)}, not true or false; fix the config")
    return value


def check_configs(sft_cfg: dict, aligned_cfg: dict) -> bool:
    """Refuse models of different architectures; return tie_word_embeddings."""
    for key in ARCH_KEYS:
        if key in sft_cfg and key in aligned_cfg and sft_cfg[key] != aligned_cfg[key]:
            raise ExpoError(
                f"config.json differs in {key}: SFT has {shown(sft_cfg[key], 80)}, aligned has "
                f"{shown(aligned_cfg[key], 80)} (ExPO needs the aligned model to be trained from this SFT model)"
            )
    tie_a = bool(_flag(aligned_cfg, "tie_word_embeddings", "aligned"))
    tie_s = _flag(sft_cfg, "tie_word_embeddings", "SFT")
    tie_s = tie_a if tie_s is None else tie_s
    if tie_a != tie_s:
        raise ExpoError(f"tie_word_embeddings differs: SFT {tie_s}, aligned {tie_a}; the models do not match")
    return tie_a


def _alphas(alpha_for: Callable, name: str) -> tuple[float, ...]:
    a = alpha_for(name)
    return tuple(float(x) for x in a) if isinstance(a, (tuple, list)) else (float(a),)


def match(sft: dict[str, TensorRef], aligned: dict[str, TensorRef], tie: bool,
          alpha_for: Callable[[str], float | tuple[float, ...]]) -> tuple[dict[str, TensorDecision], list[str]]:
    decisions: dict[str, TensorDecision] = {}
    warnings: list[str] = []
    problems: list[str] = []
    names = set(sft) | set(aligned)
    if tie:
        for name in sorted(n for n in names if n == "lm_head.weight"):
            decisions[name] = TensorDecision(name, "dropped-tied", aligned.get(name, sft.get(name)).shape,
                                             aligned.get(name, sft.get(name)).dtype, None,
                                             "tie_word_embeddings is true: the head shares embed weights")
        names -= set(decisions)
    for name in sorted(names, key=natural_key):
        a, s = aligned.get(name), sft.get(name)
        if a is None or s is None:
            problems.append(f"{name} (only in {'aligned' if s is None else 'SFT'})")
            continue
        if not extrapolatable(a.dtype) or not is_float(s.dtype) or not extrapolatable(s.dtype):
            if a.shape != s.shape or a.dtype != s.dtype:
                problems.append(f"{name} (non-float {s.dtype}{list(s.shape)} vs {a.dtype}{list(a.shape)})")
                continue
            decisions[name] = TensorDecision(name, COPY, a.shape, a.dtype, None, "not floating point: aligned copied")
            continue
        if a.shape == s.shape:
            decisions[name] = TensorDecision(name, EXTRAPOLATE, a.shape, a.dtype, _alphas(alpha_for, name))
        elif (len(a.shape) == len(s.shape) >= 1 and a.shape[1:] == s.shape[1:] and a.shape[0] > s.shape[0]
              and VOCAB_NAME.search(name)):
            extra = a.shape[0] - s.shape[0]
            decisions[name] = TensorDecision(
                name, "vocab-extended", a.shape, a.dtype, _alphas(alpha_for, name),
                f"{s.shape[0]} shared rows extrapolated, {extra} rows added by alignment copied")
            warnings.append(f"{name}: aligned model has {extra} more vocabulary rows; they are copied unchanged")
        else:
            problems.append(f"{name} (shape {list(s.shape)} in SFT, {list(a.shape)} in aligned)")
    if problems:
        raise ExpoError(f"models do not match in {len(problems)} tensor(s): " + "; ".join(problems[:20])
                        + (" ..." if len(problems) > 20 else ""))
    return decisions, warnings


def layout_shards(decisions: dict[str, TensorDecision], max_shard_size: int) -> list[Shard]:
    groups: list[list[TensorDecision]] = []
    size = 0
    for d in sorted((d for d in decisions.values() if d.op != "dropped-tied"), key=lambda d: natural_key(d.name)):
        n = math.prod(d.shape) * itemsize(d.dtype)
        if not groups or (size + n > max_shard_size and groups[-1]):
            groups.append([])
            size = 0
        groups[-1].append(d)
        size += n
    total = len(groups)
    shards = []
    for i, group in enumerate(groups):
        items = alignment_order([(d.name, d.dtype, d.shape) for d in group])
        shards.append(Shard(shard_name(i, total), layout(items)))
    return shards


def _segments(lo: int, hi: int, shard: Shard, decisions, sft, aligned) -> list[Segment]:
    segs = []
    for name, entry in shard.layout.tensors.items():  # in file order
        b, e = max(lo, entry.begin), min(hi, entry.end)
        if b >= e:
            continue
        d = decisions[name]
        size = itemsize(entry.dtype)
        e0, e1 = (b - entry.begin) // size, (e - entry.begin) // size
        a, s = aligned[name], sft[name]
        pieces = [(e0, e1, EXTRAPOLATE if d.op != COPY else COPY)]
        if d.op == "vocab-extended":
            shared = s.shape[0] * math.prod(s.shape[1:])
            pieces = [(x0, x1, op) for x0, x1, op in
                      ((e0, min(e1, shared), EXTRAPOLATE), (max(e0, shared), e1, COPY)) if x0 < x1]
        for x0, x1, op in pieces:
            with_sft = op == EXTRAPOLATE or d.op == COPY  # COPY of a non-float tensor compares with the SFT's
            segs.append(Segment(
                op, name, entry.begin + x0 * size, x1 - x0, entry.dtype,
                a.file, a.begin + x0 * itemsize(a.dtype), a.dtype,
                s.file if with_sft else None, s.begin + x0 * itemsize(s.dtype) if with_sft else 0,
                s.dtype, d.alphas if d.alphas is not None else ()))
    return segs


def task_step(max_task_bytes: int) -> int:
    """The task grid: a file's tasks end on multiples of this (whole MiB), so every task of a file but its first
    (which starts after the header) and its last is exactly this long."""
    return max(MIB, max_task_bytes // MIB * MIB)


def cut_tasks(shards: list[Shard], decisions, sft, aligned, max_task_bytes: int) -> list[Task]:
    step = task_step(max_task_bytes)
    tasks: list[Task] = []
    for si, shard in enumerate(shards):
        start, end = len(shard.layout.header), shard.layout.size
        lo = start
        while lo < end:
            hi = min(end, (lo // step + 1) * step)
            segs = _segments(lo, hi, shard, decisions, sft, aligned)
            tasks.append(Task(len(tasks), si, shard.file, lo, hi, tuple(segs)))
            lo = hi
    return tasks


def make_plan(sft: dict[str, TensorRef], aligned: dict[str, TensorRef], *, alpha_for: Callable[[str], float],
              sft_config: dict, aligned_config: dict, max_task_bytes: int = 256 * MIB,
              max_shard_size: int = 5_000_000_000) -> Plan:
    for who, model in (("SFT", sft), ("aligned", aligned)):
        if not model:
            raise ExpoError(f"the {who} model holds no tensors; there is nothing to merge")
    tie = check_configs(sft_config, aligned_config)
    decisions, warnings = match(sft, aligned, tie, alpha_for)
    if all(d.op == "dropped-tied" for d in decisions.values()):
        raise ExpoError("no tensor is left to write (the only tensor is the tied lm_head.weight); nothing to merge")
    shards = layout_shards(decisions, max_shard_size)
    tasks = cut_tasks(shards, decisions, sft, aligned, max_task_bytes)
    return Plan(shards, tasks, decisions, warnings)
