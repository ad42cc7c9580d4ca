"""The one interface between a merge and where its output goes (OutputWriter), and its local-disk implementation.

A merge drives its output through these calls, in this order, whatever the output is:

    prepare(fingerprint)   lock the output; resume an unfinished merge of the same plan, refuse anything else, or
                           (overwrite) first remove only what an earlier expo_dist run wrote; start the journal
    done_tasks()           the journaled tasks whose bytes check out (a resumed merge skips them)
    check_space()          refuse an output that cannot hold what is left to write
    stage(done)            pre-size every shard and write its header (keeping those of done tasks)
    targets                what the workers write their byte ranges into (handed to the scheduler)
    record(task, result)   journal a finished task (the scheduler's on_done)
    close_journal()        no task will finish any more
    commit(infos, sealed)  each output: side files, card, manifest, shards into place, the index last
    fail(err)              the merge failed (called before release): an object-store output aborts its uploads
    release()              close the journal, give the lock up (always, also after a failure)

error_line(e) turns an OSError met on the output side into the one line the user sees. An object-store or Hub
output implements the same calls; only what `targets` holds and how commit() publishes differ.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
from typing import Protocol

from ..errors import ExpoError
from ..formats.folder import side_files
from ..planning.plan import Plan
from .finalize import check_out_dir, create_shards, finish, output_names, work_dir
from .journal import Journal
from .lock import OutputLock
from .manifest import RunInfo
from .owned import clear_owned, record_names

log = logging.getLogger("expo_dist")


class OutputWriter(Protocol):
    """Where one merge's outputs go (one per alpha of a sweep, same layout). See the module's docstring."""

    @property
    def targets(self) -> list: ...

    def prepare(self, fingerprint: str) -> None: ...

    def done_tasks(self) -> set[int]: ...

    def check_space(self) -> None: ...

    def stage(self, done: set[int]) -> None: ...

    def record(self, task, result) -> None: ...

    def close_journal(self) -> None: ...

    def commit(self, infos: list[RunInfo], sealed: dict[int, dict[str, dict]]) -> list[dict]: ...

    def fail(self, err: BaseException) -> None: ...

    def release(self) -> None: ...

    def error_line(self, e: OSError) -> str: ...


class LocalWriter:
    """Output folders on a file system every node sees: shards staged under OUT/.expo/ (per output of a sweep),
    written in place by the workers with positional writes, moved into place by commit().

    out: the --out folder; out_dirs: one folder per output (out itself, or OUT/alpha-<value>/ for a sweep);
    inputs: the input models as given (the output may be neither inside one nor hold one)."""

    def __init__(self, out: str, out_dirs: list[str], plan: Plan, aligned_root: str, inputs: list[str],
                 overwrite: bool = False):
        check_out_dir(out, inputs)
        self.out, self.out_dirs, self.plan, self.aligned_root = out, list(out_dirs), plan, aligned_root
        self.overwrite = overwrite
        self.side = side_files(aligned_root)  # the aligned model's side files that go into each output
        self.journal: Journal | None = None
        self.lock: OutputLock | None = None

    @property
    def targets(self) -> list[str]:
        """The staging folders the workers write into: OUT/.expo/ of each output."""
        return [work_dir(d) for d in self.out_dirs]

    def prepare(self, fingerprint: str) -> None:
        out = self.out
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
                    self._resume_or_clear(journal, fingerprint)
                if not journal.exists():
                    journal.start(fingerprint)
                names = output_names(self.plan, self.side)
                for d in self.out_dirs:
                    os.makedirs(work_dir(d), exist_ok=True)
                    record_names(d, names)
            except BaseException:
                lock.release(remove=ours)
                if ours:
                    with contextlib.suppress(OSError):
                        os.rmdir(work_dir(out))
                raise
        except OSError as e:
            raise ExpoError(self.error_line(e)) from None
        self.journal, self.lock = journal, lock

    def _resume_or_clear(self, journal: Journal, fingerprint: str) -> None:
        """A folder that is not empty: resume the same plan, clear an earlier output (--overwrite), or refuse."""
        out = self.out
        if journal.exists() and journal.fingerprint() == fingerprint and not self.overwrite:
            log.warning("resuming the unfinished merge in %s", out)
        elif self.overwrite:
            n = clear_owned(out)
            log.warning("--overwrite: removed %d files an earlier expo_dist run wrote in %s", n, out)
        elif journal.exists():
            raise ExpoError(f"--out {out} holds an unfinished merge of different inputs or settings; "
                            "rerun with --overwrite to discard it")
        else:
            raise ExpoError(f"--out {out} is not empty; choose an empty folder or pass --overwrite "
                            "(which replaces only an earlier expo_dist output)")

    def done_tasks(self) -> set[int]:
        return self.journal.verified_done(self.plan, self.targets)

    def check_space(self) -> None:
        """Refuse to start when the output disk cannot hold what is left to write (staged shards are sparse:
        the blocks they already have count as written)."""
        need = 0
        side_bytes = sum(os.path.getsize(os.path.join(self.aligned_root, f)) for f in self.side)
        for wdir in self.targets:
            need += 1 << 20  # manifest, card, index, journal
            for shard in self.plan.shards:
                try:
                    st = os.stat(os.path.join(wdir, shard.file))
                    have = st.st_blocks * 512 if st.st_size == shard.layout.size else 0
                except OSError:
                    have = 0
                need += max(0, shard.layout.size - have)
            need += side_bytes
        st = os.statvfs(self.targets[0])
        free = st.f_bavail * st.f_frsize
        if st.f_blocks and free < need:  # f_blocks == 0: the filesystem does not say
            raise ExpoError(f"{self.out}: no space left on the output disk for this merge: it needs {_mb(need)} "
                            f"more, the disk has {_mb(free)} free; free space or choose another --out, then rerun "
                            "the same command to resume")

    def stage(self, done: set[int]) -> None:
        keep = {t.file for t in self.plan.tasks if t.id in done}
        for wdir in self.targets:
            create_shards(self.plan, wdir, keep=keep)

    def record(self, task, result) -> None:
        self.journal.record(task, result)

    def close_journal(self) -> None:
        self.journal.close()

    def commit(self, infos: list[RunInfo], sealed: dict[int, dict[str, dict]]) -> list[dict]:
        """Finish every output folder (finalize.finish: the index last); a sweep's own work folder goes last."""
        manifests = [finish(out, self.plan, self.aligned_root, info, sealed.get(k, {}), variant=k)
                     for k, (out, info) in enumerate(zip(self.out_dirs, infos))]
        if self.out_dirs != [self.out]:
            shutil.rmtree(work_dir(self.out), ignore_errors=True)
        return manifests

    def fail(self, err: BaseException) -> None:
        """(a folder keeps its staged shards and journal: the rerun resumes)"""

    def release(self) -> None:
        if self.journal is not None:
            self.journal.close()
        if self.lock is not None:
            self.lock.release()

    def error_line(self, e: OSError) -> str:
        """One line for an OS error on the output side: full disk, read-only disk, anything else."""
        where, path = e.filename or self.out, self.out
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            return (f"{where}: no space left on the output disk ({e.strerror}); free space or choose another --out, "
                    "then rerun the same command to resume")
        if e.errno == errno.EROFS or (e.errno in (errno.EACCES, errno.EPERM) and str(where).startswith(path)):
            return f"{where}: the output folder is not writable ({e.strerror}); choose another --out"
        return f"{where}: {e.strerror or e}"


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n < 1e9 else f"{n / 1e9:.2f} GB"
