"""One merge, end to end: index -> plan -> prepare output -> Ray workers -> finish."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os

from . import __version__
from .driver import Scheduler
from .session import Progress, connect, shutdown
from .errors import ExpoError, MergeFailed
from .finalize import check_out_dir, create_shards, finish, output_names, side_files, work_dir
from .index import ModelIndex, index_model
from .journal import Journal
from .outlock import OutputLock
from .owned import clear_owned, record_names
from .plan import Plan, Source, make_plan
from .rules import alphas_for, unused
from .sources import is_ref
from .spec import MergeSpec

log = logging.getLogger("expo_dist")


def sources(index: ModelIndex) -> dict[str, Source]:
    return {n: Source(r.file, r.dtype, r.shape, r.entry.begin) for n, r in index.tensors.items()}


def build_plan(spec: MergeSpec) -> tuple[Plan, ModelIndex, ModelIndex]:
    cache_dir = getattr(spec, "cache_dir", None)
    sft, aligned = index_model(spec.sft, cache_dir), index_model(spec.aligned, cache_dir)
    rules = spec.rules()
    plan = make_plan(sources(sft), sources(aligned), alpha_for=alphas_for(spec.alphas, rules),
                     sft_config=sft.config, aligned_config=aligned.config,
                     max_task_bytes=spec.max_task_bytes, max_shard_size=spec.max_shard_size)
    for rule in unused(rules, plan.decisions):
        plan.warnings.append(f"alpha rule {rule.describe()} matches no tensor")
    side_files(aligned.root, plan.warnings)  # links out of the folder, FIFOs...: said before any work
    return plan, sft, aligned


def fingerprint(plan: Plan, spec: MergeSpec) -> str:
    """What must match for a rerun to resume: inputs (names, sizes, mtimes), alpha, and the output layout."""
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
    file by its ref, which pins the commit (immutable)."""
    if is_ref(f):
        return [f]
    st = os.stat(f)
    return [f, st.st_size, st.st_mtime_ns, st.st_dev, st.st_ino, st.st_ctime_ns]


def prepare_output(spec: MergeSpec, plan: Plan, aligned_root: str) -> tuple[Journal, OutputLock]:
    """Lock the output folder, then resume, refuse, or (--overwrite) clear what an earlier run wrote there."""
    out = spec.out
    check_out_dir(out, [spec.sft, spec.aligned])
    fp = fingerprint(plan, spec)
    if os.path.lexists(out) and not os.path.isdir(out):
        raise ExpoError(f"--out {out} exists and is not a folder")
    lock = OutputLock(work_dir(out), f"--out {out}")
    try:
        fresh = not os.path.isdir(out) or not os.listdir(out)
        ours = not os.path.lexists(work_dir(out))  # a refused run leaves no trace in a folder it did not write
        os.makedirs(out, exist_ok=True)
        lock.acquire()
        try:
            journal = Journal(work_dir(out))
            if not fresh:
                if journal.exists() and journal.fingerprint() == fp and not spec.overwrite:
                    log.warning("resuming the unfinished merge in %s", out)
                elif spec.overwrite:
                    n = clear_owned(out)
                    log.warning("--overwrite: removed %d files an earlier expo_dist run wrote in %s", n, out)
                elif journal.exists():
                    raise ExpoError(f"--out {out} holds an unfinished merge of different inputs or settings; "
                                    "rerun with --overwrite to discard it")
                else:
                    raise ExpoError(f"--out {out} is not empty; choose an empty folder or pass --overwrite "
                                    "(which replaces only an earlier expo_dist output)")
            if not journal.exists():
                journal.start(fp)
            names = output_names(plan, side_files(aligned_root))
            for d in spec.out_dirs():
                os.makedirs(work_dir(d), exist_ok=True)
                record_names(d, names)
        except BaseException:
            lock.release(remove=ours)
            if ours:
                with contextlib.suppress(OSError):
                    os.rmdir(work_dir(out))
            raise
    except OSError as e:
        raise ExpoError(os_error_message(e, out)) from None
    return journal, lock


def os_error_message(e: OSError, path: str) -> str:
    """One line for an OS error on the output side: full disk, read-only disk, anything else."""
    where = e.filename or path
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return (f"{where}: no space left on the output disk ({e.strerror}); free space or choose another --out, "
                "then rerun the same command to resume")
    if e.errno == errno.EROFS or (e.errno in (errno.EACCES, errno.EPERM) and str(where).startswith(path)):
        return f"{where}: the output folder is not writable ({e.strerror}); choose another --out"
    return f"{where}: {e.strerror or e}"


def check_space(plan: Plan, out: str, aligned_root: str, wdirs: list[str]) -> None:
    """Refuse to start when the output disk cannot hold what is left to write (staged shards are sparse:
    the blocks they already have count as written)."""
    need = 0
    for wdir in wdirs:
        need += 1 << 20  # manifest, card, index, journal
        for shard in plan.shards:
            try:
                st = os.stat(os.path.join(wdir, shard.file))
                have = st.st_blocks * 512 if st.st_size == shard.layout.size else 0
            except OSError:
                have = 0
            need += max(0, shard.layout.size - have)
        need += sum(os.path.getsize(os.path.join(aligned_root, f)) for f in side_files(aligned_root))
    wdir = wdirs[0]
    st = os.statvfs(wdir)
    free = st.f_bavail * st.f_frsize
    if st.f_blocks and free < need:  # f_blocks == 0: the filesystem does not say
        raise ExpoError(f"{out}: no space left on the output disk for this merge: it needs {_mb(need)} more, "
                        f"the disk has {_mb(free)} free; free space or choose another --out, then rerun the "
                        "same command to resume")


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n < 1e9 else f"{n / 1e9:.2f} GB"


def run(spec: MergeSpec, progress: bool = True) -> dict:
    spec.validate()
    plan, sft, aligned = build_plan(spec)
    for w in plan.warnings:
        log.warning("%s", w)
    journal, lock = prepare_output(spec, plan, aligned.root)
    try:
        return _run(spec, plan, aligned, journal, progress)
    except OSError as e:  # the output disk filled up or went read-only under us
        raise MergeFailed(os_error_message(e, spec.out)) from None
    finally:
        journal.close()
        lock.release()


def _run(spec: MergeSpec, plan: Plan, aligned: ModelIndex, journal: Journal, progress: bool) -> dict:
    outs = spec.out_dirs()
    wdirs = [work_dir(d) for d in outs]
    done = journal.verified_done(plan, wdirs)
    if done:
        log.warning("%d of %d tasks were already done and check out; redoing the other %d",
                    len(done), len(plan.tasks), len(plan.tasks) - len(done))
    check_space(plan, spec.out, aligned.root, wdirs)
    for wdir in wdirs:
        create_shards(plan, wdir, keep={t.file for t in plan.tasks if t.id in done})
    started = connect(spec.address)
    try:
        sched = Scheduler(plan, wdirs, spec.workers, spec.max_attempts, skip=done, on_done=journal.record,
                          cache_dir=spec.cache_dir, io=spec.io, device=spec.device)
        left = sum(t.nbytes for t in plan.tasks if t.id not in done) * len(outs)
        stats = sched.run(Progress(left, per_task=len(outs)) if progress else None)
    finally:
        journal.close()
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
    manifests = []
    for k, (out, alpha) in enumerate(zip(outs, spec.alphas)):
        info = {
            "sft": spec.sft,
            "aligned": spec.aligned,
            "alpha": alpha,
            "alpha_rules": [r.describe() for r in spec.rules()],
            "sweep": list(spec.alphas) if spec.sweep else None,
            "settings": {"max_task_bytes": spec.max_task_bytes, "max_shard_size": spec.max_shard_size, "io": spec.io,
                         "device": spec.device},
            "tasks": len(plan.tasks),
            "tasks_resumed": len(done),
            "task_attempts": stats.attempts,
            "workers": stats.workers,
            "nonfloat_differs": sorted(stats.differs),
            "nonfinite_out": stats.nonfinite_out,
            "nonfinite_in": stats.nonfinite_in,
            "bytes_read": plan.bytes_read - sum(t.in_bytes for t in plan.tasks if t.id in done),
            "merge_seconds": round(stats.seconds, 3),
        }
        manifests.append(finish(out, plan, aligned.root, info, stats.sealed.get(k, {}), variant=k))
    if spec.sweep:
        import shutil

        shutil.rmtree(work_dir(spec.out), ignore_errors=True)
        return {**manifests[0], "outputs": {f"{a:g}": o for a, o in zip(spec.alphas, outs)}}
    return manifests[0]
