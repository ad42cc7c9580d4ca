"""S3Writer: the OutputWriter (output.writer) for --out s3://bucket/prefix, on any S3-compatible store.

Every weight file is one multipart upload, created by the driver in stage(); the workers upload their tasks'
byte ranges as its parts straight from their buffers (runtime.s3parts), from whichever node they run on: no
bytes pass through the driver, and nothing of the output touches a local disk. commit() completes each upload
with the ETags and sizes ListParts reports (never what workers said), checks that S3's checksum of the whole
object is the one the parts' CRC-32s give, then writes the side files, card and manifest, and the index (or
completes the single model.safetensors) last: a prefix transformers can load is a complete one.

Resume: the journal under PREFIX/.expo/ (output.s3state) holds the plan's fingerprint, the upload ids and each
finished task's part CRC-32s; a rerun keeps the parts S3 still lists at the right size for journaled tasks and
uploads the rest. A merge that fails aborts its uploads and removes its records (and says so); one that is
interrupted (SIGTERM, Ctrl-C) or whose driver is killed leaves them for the rerun to resume.
"""

from __future__ import annotations

import logging

from ..errors import ExpoError, MergeFailed
from ..formats.folder import CARD, INDEX, MANIFEST, WORK, side_files
from ..planning.plan import Plan, task_step
from ..runtime.s3parts import PartTarget, check_part_size, crc_b64, part_span
from ..sources import s3
from .finalize import documents, open_side_file, output_names, skipped_side_files
from .manifest import RunInfo
from .s3state import (
    LOCK,
    OWNED,
    STATE,
    S3Journal,
    S3Lock,
    clear_owned,
    composite_crc32,
    delete_keys,
    file_crc32,
    get_json,
    put_json,
    work_url,
)

log = logging.getLogger("expo_dist")


class S3Writer:
    """out: the --out prefix; out_dirs: one prefix per output (out, or OUT/alpha-<value> of a sweep)."""

    def __init__(self, out: str, out_dirs: list[str], plan: Plan, aligned_root: str, max_task_bytes: int,
                 overwrite: bool = False):
        self.out, self.out_dirs = s3.prefix(out), [s3.prefix(d) for d in out_dirs]
        self.plan, self.aligned_root, self.overwrite = plan, aligned_root, overwrite
        self.step = task_step(max_task_bytes)
        check_part_size(plan, self.step, self.out)
        self.side = side_files(aligned_root)
        self.lock: S3Lock | None = None
        self.journal = S3Journal(self.out)
        self.uploads: list[dict[str, str]] = [{} for _ in self.out_dirs]
        self.parts: list[dict[str, dict[int, dict]]] = [{} for _ in self.out_dirs]  # ListParts, per file
        self.fingerprint = ""
        self.finished = False

    # ---- names -------------------------------------------------------------------------------------------------

    def _rel(self, d: str) -> str:
        return d[len(self.out) + 1:] + "/" if d != self.out else ""

    def _names(self) -> list[str]:
        """Every key this run may write, relative to out (its own .expo/ records aside)."""
        names = output_names(self.plan, self.side)
        return sorted(self._rel(d) + n for d in self.out_dirs for n in names)

    def _key(self, k: int, name: str) -> tuple[str, str]:
        return s3.split(s3.join(self.out_dirs[k], name))

    @property
    def targets(self) -> list[PartTarget]:
        headers = {s.file: s.layout.header for s in self.plan.shards}
        return [PartTarget(d, dict(self.uploads[k]), headers, self.step) for k, d in enumerate(self.out_dirs)]

    # ---- the OutputWriter calls ---------------------------------------------------------------------------------

    def prepare(self, fingerprint: str) -> None:
        s3.check_bucket(self.out, "writing the output")
        self.fingerprint = fingerprint
        lock = S3Lock(self.out).acquire()
        try:
            listing = {k: v for k, v in s3.list_all(self.out).items() if k != f"{WORK}/{LOCK}"}
            state = get_json(work_url(self.out, STATE)) if f"{WORK}/{STATE}" in listing else None
            same = isinstance(state, dict) and state.get("fingerprint") == fingerprint
            if listing and same and not self.overwrite:
                log.warning("resuming the unfinished merge in %s", self.out)
                self._load_state(state)
            else:
                if listing and self.overwrite:
                    clear_owned(self.out, listing, state)
                elif listing and isinstance(state, dict):
                    raise ExpoError(f"--out {self.out} holds an unfinished merge of different inputs or settings; "
                                    "rerun with --overwrite to discard it")
                elif listing:
                    raise ExpoError(f"--out {self.out} is not empty; choose an empty prefix or pass --overwrite "
                                    "(which replaces only an earlier expo_dist output)")
                put_json(work_url(self.out, OWNED), {"names": self._names()})
                self._save_state()
        except BaseException:
            lock.release()
            raise
        self.lock = lock

    def _load_state(self, state: dict) -> None:
        ups = state.get("uploads")
        ups = ups if isinstance(ups, dict) else {}
        for k, d in enumerate(self.out_dirs):
            for shard in self.plan.shards:
                uid = ups.get(self._rel(d) + shard.file)
                if isinstance(uid, str):
                    self.uploads[k][shard.file] = uid
        self.journal.load()

    def _save_state(self) -> None:
        """The fingerprint and every open upload, by key relative to out (a later --overwrite aborts them whatever
        its own alphas are)."""
        flat = {self._rel(d) + f: uid for d, ups in zip(self.out_dirs, self.uploads) for f, uid in ups.items()}
        put_json(work_url(self.out, STATE), {"fingerprint": self.fingerprint, "uploads": flat})

    def _list_parts(self, k: int, file: str) -> dict[int, dict] | None:
        """Part number -> {ETag, Size} of an open upload; None where the upload is gone."""
        bucket, key = self._key(k, file)
        out: dict[int, dict] = {}
        try:
            for page in s3.client().get_paginator("list_parts").paginate(Bucket=bucket, Key=key,
                                                                         UploadId=self.uploads[k][file]):
                for p in page.get("Parts", ()):
                    out[int(p["PartNumber"])] = {"ETag": p["ETag"], "Size": int(p["Size"])}
        except s3.s3_exceptions() as e:
            if s3.error_code(e) in ("NoSuchUpload", "404"):
                return None
            raise s3.s3_error(e, s3.join(self.out_dirs[k], file), "listing its parts") from None
        return out

    def _span(self, task) -> tuple[int, int]:
        """(part number, part size) of a task."""
        header = len(self.plan.shards[task.shard].layout.header)
        number, start = part_span(task.begin, header, self.step)
        return number, task.end - start

    def done_tasks(self) -> set[int]:
        for k in range(len(self.out_dirs)):
            for file in list(self.uploads[k]):
                parts = self._list_parts(k, file)
                if parts is None:
                    del self.uploads[k][file]
                else:
                    self.parts[k][file] = parts
        done = set()
        for t in self.plan.tasks:
            crcs = self.journal.crcs.get(t.id)
            number, size = self._span(t)
            if crcs is not None and len(crcs) == len(self.out_dirs) and all(
                    self.parts[k].get(t.file, {}).get(number, {}).get("Size") == size
                    for k in range(len(self.out_dirs))):
                done.add(t.id)
        return done

    def check_space(self) -> None:
        """(an object store has no disk to fill)"""

    def stage(self, done: set[int]) -> None:
        """Open a multipart upload for every weight file that has none (or whose upload is gone)."""
        made = 0
        for k in range(len(self.out_dirs)):
            for shard in self.plan.shards:
                if shard.file in self.uploads[k]:
                    continue
                bucket, key = self._key(k, shard.file)
                try:
                    up = s3.client().create_multipart_upload(Bucket=bucket, Key=key, ChecksumAlgorithm="CRC32",
                                                             ContentType="application/octet-stream")
                except s3.s3_exceptions() as e:
                    raise s3.s3_error(e, s3.join(self.out_dirs[k], shard.file), "writing") from None
                self.uploads[k][shard.file] = up["UploadId"]
                made += 1
        if made:
            self._save_state()

    def record(self, task, result) -> None:
        self.journal.record(task.id, result.crc32s)

    def close_journal(self) -> None:
        self.journal.flush()

    def commit(self, infos: list[RunInfo], sealed: dict[int, dict[str, dict]]) -> list[dict]:
        side, skipped = skipped_side_files(self.plan, self.aligned_root)
        manifests = []
        for k, info in enumerate(infos):
            records = {s.file: self._check_parts(k, s.file) for s in self.plan.shards}
            manifest, docs = documents(self.plan, info, {f: r["record"] for f, r in records.items()}, side,
                                       self.plan.warnings + skipped, k)
            for name in side:
                self._put_side(k, name)
            self._put(k, CARD, docs[CARD])
            self._put(k, MANIFEST, docs[MANIFEST])
            for file, r in records.items():  # the index (or the single file) last
                self._complete(k, file, r)
            if INDEX in docs:
                self._put(k, INDEX, docs[INDEX])
            manifests.append(manifest)
        self.finished = True
        self._remove_records()
        return manifests

    def _check_parts(self, k: int, file: str) -> dict:
        """Every part present at its size (from ListParts), with the CRC-32 the journal holds for it."""
        parts = self._list_parts(k, file)
        url = s3.join(self.out_dirs[k], file)
        if parts is None:
            raise MergeFailed(f"{url}: its multipart upload is gone before it was completed (aborted by another run "
                              "or a lifecycle rule); rerun the same command")
        tasks = sorted((t for t in self.plan.tasks if t.file == file), key=lambda t: t.begin)
        listed, crcs, total = [], [], 0
        for t in tasks:
            number, size = self._span(t)
            p = parts.get(number)
            if p is None or p["Size"] != size or t.id not in self.journal.crcs:
                raise MergeFailed(f"{url}: part {number} is missing or has the wrong size after the merge; rerun "
                                  "the same command to upload it again")
            crc = self.journal.crcs[t.id][k]
            listed.append({"PartNumber": number, "ETag": p["ETag"], "ChecksumCRC32": crc_b64(crc)})
            crcs.append((crc, size))
            total += size
        record = {"file": file, "size": total, "crc32": f"{file_crc32(crcs):08x}",
                  "s3_checksum_crc32": composite_crc32([c for c, _ in crcs]), "sha256": None}
        return {"parts": listed, "record": record}

    def _complete(self, k: int, file: str, r: dict) -> None:
        bucket, key = self._key(k, file)
        url = s3.join(self.out_dirs[k], file)
        try:
            resp = s3.client().complete_multipart_upload(Bucket=bucket, Key=key, UploadId=self.uploads[k][file],
                                                         MultipartUpload={"Parts": r["parts"]})
        except s3.s3_exceptions() as e:
            raise s3.s3_error(e, url, "completing the upload", MergeFailed) from None
        got = resp.get("ChecksumCRC32")
        if got and got != r["record"]["s3_checksum_crc32"]:
            raise MergeFailed(f"{url}: S3's checksum of the completed object ({got}) is not the one its parts give "
                              f"({r['record']['s3_checksum_crc32']}); the object is not trustworthy, rerun with "
                              "--overwrite")

    def _put(self, k: int, name: str, data: bytes) -> None:
        bucket, key = self._key(k, name)
        try:
            s3.client().put_object(Bucket=bucket, Key=key, Body=data, ChecksumAlgorithm="CRC32")
        except s3.s3_exceptions() as e:
            raise s3.s3_error(e, s3.join(self.out_dirs[k], name), "writing", MergeFailed) from None

    def _put_side(self, k: int, name: str) -> None:
        with open_side_file(self.aligned_root, name) as f:
            self._put(k, name, f.read())

    def release(self) -> None:
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def fail(self, err: BaseException) -> None:
        """A merge that failed: abort its uploads and remove its records, and say so. One interrupted (SIGTERM,
        Ctrl-C), or stopped by expired credentials or an unreachable store, keeps them for the rerun to resume."""
        if self.lock is None or self.finished:
            return
        open_uploads = sum(len(u) for u in self.uploads)
        if isinstance(err, KeyboardInterrupt) or getattr(err, "resumable", False):
            if open_uploads:
                log.warning("left %d multipart uploads open under %s: rerun the same command to resume (or with "
                            "--overwrite to discard them)", open_uploads, self.out)
            return
        try:
            self.journal.pending = []
            n = self._abort_all()
            self._remove_records()
            log.warning("aborted %d multipart uploads under %s; a rerun starts this output again", n, self.out)
        except ExpoError as e:
            log.warning("could not abort the multipart uploads under %s (%s); a bucket lifecycle rule "
                        "(AbortIncompleteMultipartUpload) removes them", self.out, e)

    def error_line(self, e: OSError) -> str:
        return f"{e.filename or self.aligned_root}: {e.strerror or e}"

    # ---- --overwrite and clean-up --------------------------------------------------------------------------------

    def _abort_all(self) -> int:
        n = 0
        for k, ups in enumerate(self.uploads):
            for file, uid in list(ups.items()):
                bucket, key = self._key(k, file)
                try:
                    s3.client().abort_multipart_upload(Bucket=bucket, Key=key, UploadId=uid)
                    n += 1
                except s3.s3_exceptions() as e:
                    if s3.error_code(e) not in ("NoSuchUpload", "404"):
                        raise s3.s3_error(e, s3.join(self.out_dirs[k], file), "aborting the upload") from None
                del ups[file]
        return n

    def _remove_records(self) -> None:
        """The run's own .expo/ objects (the lock aside: release() removes it)."""
        names = [n for n in s3.list_all(work_url(self.out)) if n != LOCK]
        delete_keys(self.out, [s3.split(work_url(self.out, n))[1] for n in names])
