"""One merge, end to end: index -> plan -> prepare output -> Ray workers -> finish."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys

from . import __version__
from .driver import Progress, Scheduler, connect
from .errors import ExpoError
from .finalize import check_out_dir, clear_outputs, create_shards, finish, work_dir
from .index import ModelIndex, index_model
from .journal import Journal
from .plan import Plan, Source, make_plan
from .spec import MergeSpec

log = logging.getLogger("expo_dist")


def sources(index: ModelIndex) -> dict[str, Source]:
    return {n: Source(r.file, r.dtype, r.shape, r.entry.begin) for n, r in index.tensors.items()}


def build_plan(spec: MergeSpec) -> tuple[Plan, ModelIndex, ModelIndex]:
    sft, aligned = index_model(spec.sft), index_model(spec.aligned)
    plan = make_plan(sources(sft), sources(aligned), alpha_for=lambda name: spec.alpha,
                     sft_config=sft.config, aligned_config=aligned.config,
                     max_task_bytes=spec.max_task_bytes, max_shard_size=spec.max_shard_size)
    return plan, sft, aligned


def fingerprint(plan: Plan, spec: MergeSpec) -> str:
    """What must match for a rerun to resume: inputs (names, sizes, mtimes), alpha, and the output layout."""
    files = sorted({s.a_file for t in plan.tasks for s in t.segments}
                   | {s.s_file for t in plan.tasks for s in t.segments if s.s_file})
    doc = {
        "alpha": spec.alpha,
        "inputs": [[f, os.stat(f).st_size, os.stat(f).st_mtime_ns] for f in files],
        "shards": [[s.file, hashlib.sha256(s.layout.header).hexdigest(), s.layout.size] for s in plan.shards],
        "tasks": [[t.file, t.begin, t.end] for t in plan.tasks],
        "version": __version__,
    }
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()


def prepare_output(spec: MergeSpec, plan: Plan) -> Journal:
    out = spec.out
    check_out_dir(out, [spec.sft, spec.aligned])
    fp = fingerprint(plan, spec)
    if os.path.exists(out) and not os.path.isdir(out):
        raise ExpoError(f"--out {out} exists and is not a folder")
    os.makedirs(out, exist_ok=True)
    journal = Journal(work_dir(out))
    if os.listdir(out):
        if journal.exists() and journal.fingerprint() == fp and not spec.overwrite:
            log.warning("resuming the unfinished merge in %s", out)
        elif spec.overwrite:
            clear_outputs(out)
        elif journal.exists():
            raise ExpoError(f"--out {out} holds an unfinished merge of different inputs or settings; "
                            "rerun with --overwrite to discard it")
        else:
            raise ExpoError(f"--out {out} is not empty; choose an empty folder or pass --overwrite")
    if not journal.exists():
        journal.start(fp)
    return journal


def run(spec: MergeSpec, progress: bool = True) -> dict:
    spec.validate()
    plan, sft, aligned = build_plan(spec)
    for w in plan.warnings:
        log.warning("%s", w)
    journal = prepare_output(spec, plan)
    done = journal.verified_done(plan)
    if done:
        log.warning("%d of %d tasks were already done and check out; redoing the other %d",
                    len(done), len(plan.tasks), len(plan.tasks) - len(done))
    create_shards(plan, work_dir(spec.out), keep={t.file for t in plan.tasks if t.id in done})
    started = connect(spec.address)
    try:
        sched = Scheduler(plan, work_dir(spec.out), spec.workers, spec.max_attempts, skip=done,
                          on_done=journal.record)
        left = sum(t.nbytes for t in plan.tasks if t.id not in done)
        stats = sched.run(Progress(left) if progress else None)
    finally:
        journal.close()
        if started:
            import ray

            ray.shutdown()
    if stats.differs:
        log.warning("non-float tensors differ between the models (aligned copied): %s",
                    ", ".join(sorted(stats.differs)))
    if stats.nonfinite_out:
        log.warning("%d output elements are NaN or Inf", stats.nonfinite_out)
    info = {
        "sft": spec.sft,
        "aligned": spec.aligned,
        "alpha": spec.alpha,
        "settings": {"max_task_bytes": spec.max_task_bytes, "max_shard_size": spec.max_shard_size},
        "tasks": len(plan.tasks),
        "tasks_resumed": len(done),
        "task_attempts": stats.attempts,
        "workers": stats.workers,
        "nonfloat_differs": sorted(stats.differs),
        "nonfinite_out": stats.nonfinite_out,
        "merge_seconds": round(stats.seconds, 3),
    }
    return finish(spec.out, plan, aligned.root, info, stats.sealed)
