"""MergeSpec: the validated description of one merge, from CLI flags and/or a YAML config.

FIELDS is the one schema of the merge config: every YAML key (the CLI flag is the key with dashes, e.g.
max_shard_size and --max-shard-size), its type and what it does. load_config checks a YAML file against it,
key by key, and MergeSpec.validate checks what the flags and the Python API give the same way; a wrong type or
an out-of-range value is one ExpoError line naming the key (the check of each type: checks.py). Nothing is
coerced: YAML `yes`/`true` is no number or size, the string 'false' is no boolean.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import yaml

from .checks import (
    MIN_TASK_BYTES,
    check_alpha,
    check_bool,
    check_choice,
    check_int,
    check_rules,
    check_seconds,
    check_size,
    check_string,
)
from .errors import ExpoError
from .planning.plan import parse_size
from .planning.rules import kind_of, parse_rules, show_value
from .settings import IO_MODES
from .sources.s3 import is_s3, split

DEFAULT_TASK_BYTES = 256 << 20
S3_TASK_BYTES = 64 << 20  # an s3:// output's part size (a worker holds one part per output in memory)
DEFAULT_SHARD_SIZE = "5GB"
MAX_WORKERS = 100_000
MAX_ATTEMPTS = 1000
DEVICES = ("auto", "cuda", "cpu")
MAX_CONFIG_BYTES = 1 << 20
_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml's: fast, and bounds nesting itself
DEVICE_HELP = "auto: a GPU per worker where the cluster has GPUs, else CPU; cpu: never use GPUs; cuda: require GPUs"


def s3_task_bytes(outputs: int) -> int:
    """The task (= part) size for an s3:// output of `outputs` alphas: 64 MiB, less for a sweep so that a worker's
    part buffers stay near 256 MiB, never under 8 MiB (S3 wants 5 MiB)."""
    return max(8 << 20, min(S3_TASK_BYTES, (256 << 20) // max(1, outputs) >> 20 << 20))


# key -> (type, one-line description): the merge config's fields, in the order the help lists them
FIELDS: dict[str, tuple[str, str]] = {
    "sft": ("string", "the SFT model (the starting point of alignment): a folder or a Hub repo id "
                      "org/name[@revision]"),
    "aligned": ("string", "the aligned (DPO/RLHF) model trained from the SFT model: a folder or a Hub repo id "
                          "org/name[@revision]"),
    "alpha": ("number or list of numbers", "extrapolation strength (finite; the paper used 0.1-0.5); a list "
                                           "sweeps: one output folder OUT/alpha-<value> per value"),
    "out": ("string", "output folder, on a path every node sees; empty, or holding an unfinished merge of the "
                      "same plan (which resumes)"),
    "address": ("string", "Ray cluster to join: auto, HOST:PORT or ray://HOST:PORT (default: start an embedded "
                          "Ray on this machine)"),
    "wait_nodes": ("integer >= 1", "with address: first wait until this many Ray nodes are alive in the cluster "
                                   "(e.g. a batch job's nodes still starting); exit 2 after wait_timeout"),
    "wait_timeout": ("seconds > 0", "how long wait_nodes waits (default 300)"),
    "workers": ("integer >= 1", "at most this many worker actors (default: one per GPU, else one per CPU)"),
    "max_task_bytes": ("size >= 1MiB", "output bytes per task: an integer or a string like 256MiB "
                                       "(default 256MiB)"),
    "max_shard_size": ("size >= 1", "output shard size: an integer or a string like 5GB (default 5GB)"),
    "overwrite": ("boolean", "replace what an earlier merge wrote in out (default false)"),
    "max_attempts": ("integer >= 1", "runs of one task before the merge fails (default 4)"),
    "cache_dir": ("string", "Hugging Face cache for Hub models, on every node (default: HF_HUB_CACHE, i.e. "
                            "$HF_HOME/hub)"),
    "alpha_rules": ("list of mappings", "per-tensor alpha, first match wins: {match: GLOB or regex: REGEX, "
                                        "alpha: NUMBER or scale: NUMBER} (YAML only: no flag)"),
    "io": ("auto | direct | buffered", "how workers read and write (default: EXPO_IO, else auto)"),
    "device": ("auto | cuda | cpu", "where workers compute (default auto). " + DEVICE_HELP),
}
# keys a config file may hold for people, ignored by the merge
COMMENT_KEYS: dict[str, tuple[str, str]] = {
    "description": ("any", "free text about the config (ignored)"),
    "notes": ("any", "free text about the config (ignored)"),
}


def fields_help() -> str:
    """The config's fields, one line each (for --help and the docs)."""
    width = max(map(len, FIELDS))
    return "\n".join(f"  {k:<{width}}  {t}: {d}" for k, (t, d) in FIELDS.items())


_CHECKS = {
    "sft": check_string,
    "aligned": check_string,
    "alpha": check_alpha,
    "out": check_string,
    "address": check_string,
    "wait_nodes": lambda label, v: check_int(label, v, 1, MAX_WORKERS),
    "wait_timeout": lambda label, v: check_seconds(label, v),
    "workers": lambda label, v: check_int(label, v, 1, MAX_WORKERS),
    "max_task_bytes": lambda label, v: check_size(label, v, MIN_TASK_BYTES),
    "max_shard_size": lambda label, v: check_size(label, v, 1),
    "overwrite": check_bool,
    "max_attempts": lambda label, v: check_int(label, v, 1, MAX_ATTEMPTS),
    "cache_dir": check_string,
    "alpha_rules": check_rules,
    "io": lambda label, v: check_choice(label, v, IO_MODES),
    "device": lambda label, v: check_choice(label, v, DEVICES),
}


NO_FLAG = {"alpha_rules"}  # YAML (or the Python API) only


def flag(key: str) -> str:
    """How errors name a field that did not come from a config file: its flag (alpha_rules has none)."""
    return key if key in NO_FLAG else "--" + key.replace("_", "-")


def check_field(key: str, value, label: str | None = None):
    """One field against the schema; None (not given) stays None."""
    if value is None:
        return None
    return _CHECKS[key](label or flag(key), value)


@dataclass
class MergeSpec:
    sft: str
    aligned: str
    alpha: float | list[float]  # several values: a sweep, one output folder per alpha, one read of the inputs
    out: str | None = None
    address: str | None = None
    wait_nodes: int | None = None  # with address: wait until this many Ray nodes are alive (runtime.session)
    wait_timeout: float | None = None  # seconds wait_nodes waits (None: session.DEFAULT_WAIT_TIMEOUT)
    workers: int | None = None
    max_task_bytes: int | None = None  # None: DEFAULT_TASK_BYTES, or for an s3:// output s3_task_bytes()
    max_shard_size: int = parse_size(DEFAULT_SHARD_SIZE)
    overwrite: bool = False
    max_attempts: int = 4
    cache_dir: str | None = None  # Hugging Face Hub cache for Hub sources (default: HF_HUB_CACHE / HF_HOME)
    alpha_rules: list | None = None  # per-tensor alpha: see expo_dist.rules
    io: str | None = None  # auto | direct | buffered (None: EXPO_IO, else auto: merge.settings_for)
    device: str = "auto"  # auto | cuda | cpu: see DEVICE_HELP

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
        if is_s3(self.out):
            return [f"{self.out}/alpha-{a:g}" for a in self.alphas]
        return [os.path.join(self.out, f"alpha-{a:g}") for a in self.alphas]

    def rules(self):
        return parse_rules(self.alpha_rules)

    def validate(self, need_out: bool = True) -> MergeSpec:
        for key in ("sft", "aligned"):
            if getattr(self, key) is None:
                raise ExpoError(f"missing --{key} (a model folder or Hub repo id)")
        if need_out and self.out is None:
            raise ExpoError("missing --out (the output folder)")
        if self.alpha is None:
            raise ExpoError("missing --alpha")
        for key in FIELDS:  # every field against the schema, named by its flag
            setattr(self, key, check_field(key, getattr(self, key)))
        if self.max_task_bytes is None:
            self.max_task_bytes = s3_task_bytes(len(self.alphas)) if is_s3(self.out) else DEFAULT_TASK_BYTES
        if self.max_shard_size is None:
            self.max_shard_size = parse_size(DEFAULT_SHARD_SIZE)
        if self.overwrite is None:
            self.overwrite = False
        if self.max_attempts is None:
            self.max_attempts = 4
        if self.device is None:
            self.device = "auto"
        if self.wait_nodes and self.wait_nodes > 1 and not self.address:
            raise ExpoError(f"--wait-nodes {self.wait_nodes} needs --address (Ray started here has one node)")
        if is_s3(self.out):
            split(self.out)  # a bucket and a clean key, or one line
            self.out = self.out.rstrip("/")
        elif self.out:
            self.out = os.path.abspath(os.path.expanduser(self.out))
        if self.cache_dir:
            self.cache_dir = os.path.abspath(os.path.expanduser(self.cache_dir))
        for key in ("sft", "aligned"):
            val = os.path.expanduser(getattr(self, key))
            if os.path.exists(val):
                setattr(self, key, os.path.abspath(val))
        return self


def load_config(path: str) -> dict:
    """A YAML merge config, every key checked against FIELDS (one ExpoError line naming the key)."""
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_CONFIG_BYTES + 1)
    except OSError as e:
        raise ExpoError(f"{path}: cannot read config ({e.strerror or e.__class__.__name__})") from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise ExpoError(f"{path}: larger than {MAX_CONFIG_BYTES} bytes; a merge config is a few lines of YAML")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ExpoError(f"{path}: not a UTF-8 text file (byte {e.start} is 0x{raw[e.start]:02x}); a config is "
                        "YAML text") from None
    try:
        doc = yaml.load(text, Loader=_LOADER)  # safe: plain data only, never Python objects
    except yaml.YAMLError as e:
        first = " ".join(str(e).split())[:160]
        raise ExpoError(f"{path}: not valid YAML ({first or e.__class__.__name__})") from None
    except RecursionError:
        raise ExpoError(f"{path}: not a usable config (nested too deeply)") from None
    except ValueError as e:  # e.g. an integer too long to read
        raise ExpoError(f"{path}: not a usable config ({str(e).splitlines()[0][:100]})") from None
    if doc is None:
        doc = {}
    if not isinstance(doc, dict):
        raise ExpoError(f"{path}: a config must be a YAML mapping of merge options, got {kind_of(doc)}")
    known = set(FIELDS) | set(COMMENT_KEYS)
    cfg = {}
    for key, val in doc.items():
        k = key.replace("-", "_") if isinstance(key, str) else None
        if k not in known:
            raise ExpoError(f"{path}: unknown key {show_value(key).rsplit(' (', 1)[0]} (known: {', '.join(FIELDS)}; "
                            "`expo-dist merge --help` describes them)")
        if k in cfg:
            raise ExpoError(f"{path}: key {k} given twice")
        cfg[k] = val
    cfg.pop("description", None)
    cfg.pop("notes", None)
    for k, val in cfg.items():
        cfg[k] = check_field(k, val, f"{path}: {k}")
    return cfg


def build_spec(config: str | None, overrides: dict) -> MergeSpec:
    values = load_config(config) if config else {}
    values.update({k: v for k, v in overrides.items() if v is not None})
    missing = [k for k in ("sft", "aligned", "alpha") if values.get(k) is None]
    if missing:
        raise ExpoError("missing " + ", ".join("--" + m for m in missing) + " (on the command line or in --config)")
    return MergeSpec(**values)
