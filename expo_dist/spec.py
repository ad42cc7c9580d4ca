"""MergeSpec: the validated description of one merge, from CLI flags and/or a YAML config."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, fields

import yaml

from .errors import ExpoError
from .plan import parse_size

DEFAULT_TASK_BYTES = 256 << 20
DEFAULT_SHARD_SIZE = "5GB"


def parse_alpha(value) -> float:
    """A finite alpha, or one line saying what is wrong."""
    try:
        a = float(value)
    except (TypeError, ValueError):
        raise ExpoError(f"--alpha must be a number, got {value!r}") from None
    if not math.isfinite(a):
        raise ExpoError(f"--alpha must be a finite number, got {value!r}")
    return a


@dataclass
class MergeSpec:
    sft: str
    aligned: str
    alpha: float | list[float]  # several values: a sweep, one output folder per alpha, one read of the inputs
    out: str | None = None
    address: str | None = None
    workers: int | None = None
    max_task_bytes: int = DEFAULT_TASK_BYTES
    max_shard_size: int = parse_size(DEFAULT_SHARD_SIZE)
    overwrite: bool = False
    max_attempts: int = 4
    cache_dir: str | None = None  # Hugging Face Hub cache for Hub sources (default: HF_HUB_CACHE / HF_HOME)
    alpha_rules: list | None = None  # per-tensor alpha: see expo_dist.rules
    io: str | None = None  # auto | direct | buffered (None: EXPO_IO, else auto); see expo_dist.fileio

    @property
    def alphas(self) -> tuple[float, ...]:
        return tuple(self.alpha) if isinstance(self.alpha, (list, tuple)) else (self.alpha,)

    @property
    def sweep(self) -> bool:
        return isinstance(self.alpha, (list, tuple))

    def out_dirs(self) -> list[str]:
        """One output folder; with a sweep OUT/alpha-<value>/ for each alpha."""
        if not self.sweep:
            return [self.out]
        return [os.path.join(self.out, f"alpha-{a:g}") for a in self.alphas]

    def rules(self):
        from .rules import parse_rules

        return parse_rules(self.alpha_rules)

    def validate(self, need_out: bool = True) -> "MergeSpec":
        for key in ("sft", "aligned"):
            if not getattr(self, key):
                raise ExpoError(f"missing --{key} (a model folder or Hub repo id)")
        if need_out and not self.out:
            raise ExpoError("missing --out (the output folder)")
        raw = self.alpha
        if isinstance(raw, str) and "," in raw:
            raw = [x for x in raw.split(",") if x.strip()]
        values = list(raw) if isinstance(raw, (list, tuple)) else [raw]
        if not values:
            raise ExpoError("--alpha needs a value")
        alphas = [parse_alpha(v) for v in values]
        if len({f"{a:g}" for a in alphas}) != len(alphas):
            raise ExpoError(f"--alpha lists a value twice: {values}")
        self.alpha = alphas if len(alphas) > 1 else alphas[0]
        self.rules()  # refuse bad rules before any work
        self.max_task_bytes = parse_size(self.max_task_bytes)
        self.max_shard_size = parse_size(self.max_shard_size)
        if self.max_task_bytes < 1 << 20:
            raise ExpoError("--max-task-bytes must be at least 1MiB")
        if self.max_shard_size <= 0:
            raise ExpoError("--max-shard-size must be positive")
        if int(self.max_attempts) < 1:
            raise ExpoError("--max-attempts must be at least 1")
        if self.workers is not None and int(self.workers) < 1:
            raise ExpoError("--workers must be at least 1")
        if self.out:
            self.out = os.path.abspath(os.path.expanduser(self.out))
        if self.cache_dir:
            self.cache_dir = os.path.abspath(os.path.expanduser(str(self.cache_dir)))
        from .fileio import io_mode

        self.io = io_mode(self.io)
        for key in ("sft", "aligned"):
            val = os.path.expanduser(getattr(self, key))
            if os.path.exists(val):
                setattr(self, key, os.path.abspath(val))
        return self


def load_config(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            doc = yaml.safe_load(f) or {}
    except OSError as e:
        raise ExpoError(f"{path}: cannot read config ({e.strerror})") from None
    except yaml.YAMLError as e:
        raise ExpoError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(doc, dict):
        raise ExpoError(f"{path}: a config must be a YAML mapping of merge options")
    known = {f.name for f in fields(MergeSpec)} | {"description", "notes"}
    cfg = {}
    for key, val in doc.items():
        k = str(key).replace("-", "_")
        if k not in known:
            raise ExpoError(f"{path}: unknown key {key!r} (known: {', '.join(sorted(known))})")
        cfg[k] = val
    cfg.pop("description", None)
    cfg.pop("notes", None)
    return cfg


def build_spec(config: str | None, overrides: dict) -> MergeSpec:
    values = load_config(config) if config else {}
    values.update({k: v for k, v in overrides.items() if v is not None})
    missing = [k for k in ("sft", "aligned", "alpha") if values.get(k) is None]
    if missing:
        raise ExpoError("missing " + ", ".join("--" + m for m in missing) + " (on the command line or in --config)")
    return MergeSpec(**values)
