"""One merge, end to end: index -> plan -> prepare the output -> Ray workers -> commit the output.

The output is driven only through its writer (output.writer.OutputWriter; on disk, LocalWriter)."""

from __future__ import annotations

import hashlib
import json
import logging
import os

from ._version import __version__
from .errors import MergeFailed, check_terminated
from .formats.folder import side_files
from .output.manifest import RunInfo
from .output.writer import LocalWriter, OutputWriter
from .planning.plan import Plan, make_plan, tensor_sources
from .planning.rules import alphas_for, unused
from .runtime.scheduler import Scheduler
from .runtime.session import Progress, connect, shutdown
from .settings import Settings
from .sources import s3
from .sources.index import ModelIndex, index_model
from .sources.refs import is_ref
from .sources.s3 import is_s3
from .spec import DEFAULT_TASK_BYTES, MergeSpec

log = logging.getLogger("expo_dist")


def settings_for(spec: MergeSpec) -> Settings:
    """The merge's settings, made once on the driver: the config's (--io, YAML) over the environment's (EXPO_*)."""
    return Settings.from_env({"io": spec.io})


def build_plan(spec: MergeSpec, settings: Settings | None = None) -> tuple[Plan, ModelIndex, ModelIndex]:
    settings = settings if settings is not None else settings_for(spec)
    cache_dir = getattr(spec, "cache_dir", None)
    sft = index_model(spec.sft, cache_dir, settings.hub_attempts)
    aligned = index_model(spec.aligned, cache_dir, settings.hub_attempts)
    rules = spec.rules()
    plan = make_plan(tensor_sources(sft), tensor_sources(aligned), alpha_for=alphas_for(spec.alphas, rules),
                     sft_config=sft.config, aligned_config=aligned.config,
                     max_task_bytes=plan_task_bytes(spec), max_shard_size=spec.max_shard_size)
    for rule in unused(rules, plan.decisions):
        plan.warnings.append(f"alpha rule {rule.describe()} matches no tensor")
    side_files(aligned.root, plan.warnings)  # links out of the folder, FIFOs...: said before any work
    return plan, sft, aligned


def fingerprint(plan: Plan, spec: MergeSpec) -> str:
    """What must match for a rerun to resume: inputs (see _input_identity), alpha, and the output layout."""
    files = sorted({s.a_file for t in plan.tasks for s in t.segments}
                   | {s.s_file for t in plan.tasks for s in t.segments if s.s_file})
    doc = {
        "alpha": spec.alpha,
        "alphas": {n: d.alphas for n, d in sorted(plan.decisions.items())},
        "inputs": [_input_identity(f) for f in files],
        "shards": [[s.file, hashlib.sha256(s.layout.header).hexdigest(), s.layout.size] for s in plan.shards],
        "tasks": [[t.file, t.begin, t.end] for t in plan.tasks],
        "version": __version__,
    }
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()


def _input_identity(f: str) -> list:
    """A local file by name, size, mtime, device, inode and ctime (a file rewritten in place with its mtime set
    back still gets a new ctime, which no one can set back; a file replaced by another gets a new inode); a Hub
    file by its ref, which pins the commit (immutable); an object by its size and ETag."""
    if is_ref(f):
        return [f]
    if is_s3(f):
        return [f, *s3.identity(f)]
    st = os.stat(f)
    return [f, st.st_size, st.st_mtime_ns, st.st_dev, st.st_ino, st.st_ctime_ns]


def input_pins(plan: Plan) -> dict[str, str]:
    """Each s3:// input -> its ETag now, which every worker read asks for (If-Match): an object rewritten during the
    merge fails the read with one line instead of mixing two versions' bytes."""
    files = {f for t in plan.tasks for s in t.segments for f in (s.a_file, s.s_file) if is_s3(f)}
    return {f: s3.identity(f)[1] for f in sorted(files)}


def prepare_output(spec: MergeSpec, plan: Plan, aligned_root: str) -> OutputWriter:
    """The output (a folder, or an s3:// prefix), ready to be written: locked, then resumed, refused, or
    (--overwrite) cleared of what an earlier run wrote there."""
    if is_s3(spec.out):
        from .output.s3writer import S3Writer

        writer = S3Writer(spec.out, spec.out_dirs(), plan, aligned_root, plan_task_bytes(spec), spec.overwrite)
    else:
        writer = LocalWriter(spec.out, spec.out_dirs(), plan, aligned_root, [spec.sft, spec.aligned],
                             spec.overwrite)
    writer.prepare(fingerprint(plan, spec))
    return writer


def plan_task_bytes(spec: MergeSpec) -> int:
    return spec.max_task_bytes or DEFAULT_TASK_BYTES


def run(spec: MergeSpec, progress: bool = True, settings: Settings | None = None) -> dict:
    """settings: as settings_for(spec) makes them when None."""
    spec.validate()
    settings = settings if settings is not None else settings_for(spec)
    plan, sft, aligned = build_plan(spec, settings)
    for w in plan.warnings:
        log.warning("%s", w)
    check_terminated()
    writer = prepare_output(spec, plan, aligned.root)
    try:
        return _run(spec, settings, plan, writer, progress, {"sft": sft.origin, "aligned": aligned.origin})
    except OSError as e:  # the output disk filled up or went read-only under us
        writer.fail(e)
        raise MergeFailed(writer.error_line(e)) from None
    except BaseException as e:
        writer.fail(e)
        raise
    finally:
        writer.release()


def _run(spec: MergeSpec, settings: Settings, plan: Plan, writer: OutputWriter, progress: bool,
         inputs: dict[str, dict]) -> dict:
    outs = spec.out_dirs()
    done = writer.done_tasks()
    if done:
        log.warning("%d of %d tasks were already done and check out; redoing the other %d",
                    len(done), len(plan.tasks), len(plan.tasks) - len(done))
    writer.check_space()
    writer.stage(done)
    check_terminated()
    started = connect(spec.address, wait_nodes=spec.wait_nodes, wait_timeout=spec.wait_timeout)
    try:
        check_terminated()
        sched = Scheduler(plan, writer.targets, spec.workers, spec.max_attempts, skip=done, on_done=writer.record,
                          cache_dir=spec.cache_dir, settings=settings, device=spec.device,
                          worker_args={"pins": input_pins(plan)})
        left = sum(t.nbytes for t in plan.tasks if t.id not in done) * len(outs)
        stats = sched.run(Progress(left, per_task=len(outs)) if progress else None)
    finally:
        writer.close_journal()
        if started:
            shutdown()
    if stats.differs:
        log.warning("non-float tensors differ between the models (aligned copied): %s",
                    ", ".join(sorted(stats.differs)))
    if stats.nonfinite_in:
        log.warning("the inputs hold %d NaN or Inf elements; %d output elements are NaN or Inf",
                    stats.nonfinite_in, stats.nonfinite_out)
    elif stats.nonfinite_out and stats.nonfinite_in == 0:
        log.warning("%d output elements are NaN or Inf where the inputs had none (alpha too large for the "
                    "dtype's range?)", stats.nonfinite_out)
    elif stats.nonfinite_out:  # the workers did not count the inputs
        log.warning("%d output elements are NaN or Inf (NaN/Inf in the inputs, or alpha too large for the "
                    "dtype's range?)", stats.nonfinite_out)
    infos = [RunInfo(
        sft=spec.sft, aligned=spec.aligned, alpha=alpha, alpha_rules=[r.describe() for r in spec.rules()],
        inputs=inputs, sweep=list(spec.alphas) if spec.sweep else None,
        settings={"max_task_bytes": spec.max_task_bytes, "max_shard_size": spec.max_shard_size, "io": settings.io,
                  "device": spec.device},
        tasks=len(plan.tasks), tasks_resumed=len(done), task_attempts=stats.attempts, workers=stats.workers,
        nonfloat_differs=sorted(stats.differs), nonfinite_out=stats.nonfinite_out, nonfinite_in=stats.nonfinite_in,
        bytes_read=plan.bytes_read - sum(t.in_bytes for t in plan.tasks if t.id in done),
        merge_seconds=round(stats.seconds, 3)) for alpha in spec.alphas]
    check_terminated()
    manifests = writer.commit(infos, stats.sealed)
    if spec.sweep:
        return {**manifests[0], "outputs": {f"{a:g}": o for a, o in zip(spec.alphas, outs)}}
    return manifests[0]
