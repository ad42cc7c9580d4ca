"""expo_manifest.json, the one schema of what a finished output records.

The merge fills a RunInfo for each output (one per alpha of a sweep) once its workers are done; finalize.finish
adds what the plan and the sealed files say and writes Manifest.to_json(), whose keys and their order are the
file's. Readers (verify, --overwrite) take any JSON object and check what they use: older manifests lack keys.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

from .._version import __version__

TOOL = "expo_dist"
FORMULA = "theta_expo = theta_aligned + alpha * (theta_aligned - theta_sft), float64, rounded once"


@dataclass
class RunInfo:
    """What the merge knows about one output when its workers are done."""

    sft: str  # as given: a folder, or a Hub repo id[@revision]
    aligned: str
    alpha: float
    alpha_rules: list[dict] = field(default_factory=list)  # Rule.describe() of each rule
    # "sft", "aligned" -> {"path": folder} or {"repo_id", "revision", "commit"}: the commit a Hub revision was
    # pinned to, so the output names exactly the weights it came from
    inputs: dict[str, dict] = field(default_factory=dict)
    sweep: list[float] | None = None  # every alpha of a sweep, None for one alpha
    settings: dict = field(default_factory=dict)  # max_task_bytes, max_shard_size, io, device
    tasks: int = 0
    tasks_resumed: int = 0  # journaled by an earlier run and checked
    task_attempts: int = 0
    workers: list[dict] = field(default_factory=list)  # per worker: node, pid, device, tasks, bytes, Hub fetches
    nonfloat_differs: list[str] = field(default_factory=list)  # non-float tensors whose SFT bytes differ
    nonfinite_out: int = 0
    nonfinite_in: int | None = None  # None: the workers did not count
    bytes_read: int = 0
    merge_seconds: float = 0.0


@dataclass
class Manifest:
    info: RunInfo
    total_size: int  # tensor bytes, as the index's metadata.total_size
    files: dict[str, dict]  # weight file -> {"file", "sha256", "size"}
    tensors: dict[str, dict]  # tensor -> {"op", "dtype", "shape", "alpha"}
    warnings: list[str]
    written: list[str]  # every name this run wrote at the output's top (what --overwrite may remove)
    created: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    version: str = __version__

    def to_json(self) -> dict:
        return {"tool": TOOL, "version": self.version, "created": self.created, "formula": FORMULA,
                **asdict(self.info), "total_size": self.total_size, "files": self.files, "tensors": self.tensors,
                "warnings": self.warnings, "written": self.written}
