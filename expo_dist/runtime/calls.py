"""The scheduler's vocabulary, without Ray: where workers go (placement), what a pending Ray call was (one typed
record per call), and what a run adds up to (RunStats)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import ExpoError
from ..planning.plan import Task


@dataclass
class RunStats:
    workers: list[dict] = field(default_factory=list)
    sealed: dict[int, dict[str, dict]] = field(default_factory=dict)  # output number -> file -> sha256, size
    differs: set = field(default_factory=set)
    nonfinite_out: int = 0
    nonfinite_in: int | None = None  # None: the workers do not count non-finite inputs
    attempts: int = 0
    seconds: float = 0.0


# What a pending Ray call was: one record per ref, with its submission number (an actor runs its calls in order).
@dataclass(frozen=True, eq=False)
class Pending:
    actor: object
    seq: int


@dataclass(frozen=True, eq=False)
class StartCall(Pending):  # actor.info(): a replacement worker starting
    pass


@dataclass(frozen=True, eq=False)
class TaskCall(Pending):  # actor.run(task)
    task: Task


@dataclass(frozen=True, eq=False)
class SealCall(Pending):  # actor.seal(paths of file)
    file: str


@dataclass(frozen=True, eq=False)
class HashCall(Pending):  # actor.hash_advance(paths of file, upto)
    file: str
    upto: int


def placement(device: str, resources: dict, workers: int | None) -> tuple[str, int, dict]:
    """(worker device, how many workers, their Ray resource request) for --device on a cluster with these
    resources (ray.cluster_resources()): a worker per GPU, else one per CPU; --workers caps the GPU workers
    and sets the number of CPU workers."""
    if device not in ("auto", "cuda", "cpu"):
        raise ExpoError(f"--device {device!r}: give auto, cuda or cpu")
    gpus, cpus = int(resources.get("GPU", 0)), max(1, int(resources.get("CPU", 1)))
    if device == "cuda" and not gpus:
        raise ExpoError("--device cuda: the Ray cluster has no GPU; use --device cpu (or auto, which uses GPUs "
                        "where there are any) to merge on the CPUs")
    if gpus and device != "cpu":
        return "cuda", min(gpus, workers) if workers else gpus, dict(num_gpus=1, num_cpus=0)
    return "cpu", workers or cpus, dict(num_cpus=1 if workers is None or workers <= cpus else 0)
