"""An s3:// output's own records, under PREFIX/.expo/ (what a folder keeps in OUT/.expo/):

    lock            the run that holds the prefix: host, pid, start (a conditional PUT, If-None-Match: *; a lock
                    whose object was not renewed for STALE seconds, or whose pid on this host is gone, belongs to a
                    run that is gone and is taken over)
    state.json      the plan's fingerprint and the multipart upload of every weight file (per output of a sweep)
    owned.json      the names the run will write under each output (what --overwrite may remove)
    journal/N.json  finished tasks and the CRC-32 of each of their parts, in batches (a part S3 lists whose task is
                    not journaled is simply uploaded again)

and the CRC-32 arithmetic that turns the part checksums S3 verified into one checksum of the whole file.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import socket
import threading
import time

from ..errors import ExpoError
from ..formats.folder import MANIFEST, WORK, plain_name
from ..formats.jsonsafe import loads
from ..sources import s3

log = logging.getLogger("expo_dist")

STALE = 90.0  # seconds without a renewal after which a lock is taken over
RENEW = 10.0  # seconds between renewals
STATE, OWNED, LOCK, JOURNAL = "state.json", "owned.json", "lock", "journal"


def work_url(out: str, name: str = "") -> str:
    return s3.join(out, WORK, name) if name else s3.join(out, WORK)


def put_json(url: str, doc, **kw) -> None:
    bucket, key = s3.split(url)
    s3.client().put_object(Bucket=bucket, Key=key, Body=json.dumps(doc).encode(), ContentType="application/json",
                           **kw)


def get_json(url: str):
    """A small JSON object of ours, or None where it is missing or damaged."""
    try:
        return loads(s3.get_bytes(url, 10_000_000), url)
    except ExpoError:
        return None


def _dead_here(holder: dict) -> bool:
    """A lock taken on this host by a process that no longer runs (a killed driver): free at once."""
    pid = holder.get("pid")
    if holder.get("host") != socket.gethostname() or not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:
        return False
    return False


class S3Lock:
    """One run per output prefix (see the module's docstring)."""

    def __init__(self, out: str):
        self.out, self.url = out, work_url(out, LOCK)
        self.stop = threading.Event()
        self.thread: threading.Thread | None = None

    def _record(self) -> dict:
        return {"host": socket.gethostname(), "pid": os.getpid(),
                "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}

    def acquire(self) -> S3Lock:
        bucket, key = s3.split(self.url)
        for _ in range(2):
            try:
                put_json(self.url, self._record(), IfNoneMatch="*")
                break
            except s3.s3_exceptions() as e:
                if s3.error_code(e) not in ("PreconditionFailed", "ConditionalRequestConflict", "412"):
                    raise s3.s3_error(e, self.url, "writing the lock") from None
            try:
                head = s3.client().head_object(Bucket=bucket, Key=key)
            except s3.s3_exceptions():
                continue  # released meanwhile: try again
            age = (datetime.datetime.now(datetime.timezone.utc) - head["LastModified"]).total_seconds()
            holder = get_json(self.url) or {}
            if age < STALE and not _dead_here(holder):
                raise ExpoError(f"--out {self.out} is in use by pid {holder.get('pid', '?')} on "
                                f"{holder.get('host', '?')} (since {holder.get('started', '?')}); wait for that "
                                "merge to finish or stop it (a lock not renewed for "
                                f"{STALE:.0f} s is taken over)")
            log.warning("%s: taking over the lock of pid %s on %s (%s)", self.url, holder.get("pid", "?"),
                        holder.get("host", "?"), "no longer running" if _dead_here(holder) else
                        f"not renewed for {age:.0f} s")
            s3.client().delete_object(Bucket=bucket, Key=key)
        else:
            raise ExpoError(f"--out {self.out}: could not take the lock {self.url}; try again")
        self.thread = threading.Thread(target=self._renew, name="expo-s3-lock", daemon=True)
        self.thread.start()
        return self

    def _renew(self) -> None:
        while not self.stop.wait(RENEW):
            try:
                put_json(self.url, self._record())
            except Exception as e:  # noqa: BLE001 - the next renewal may get through
                log.warning("%s: could not renew the lock (%s)", self.url, e.__class__.__name__)

    def release(self) -> None:
        self.stop.set()
        if self.thread is not None:
            self.thread.join(RENEW + 5)
            bucket, key = s3.split(self.url)
            try:
                s3.client().delete_object(Bucket=bucket, Key=key)
            except s3.s3_exceptions() as e:
                log.warning("%s: could not remove the lock (%s); the next run takes it over after %.0f s",
                            self.url, s3.error_code(e) or e.__class__.__name__, STALE)
            self.thread = None


class S3Journal:
    """Finished tasks, flushed in batches under PREFIX/.expo/journal/ (see the module's docstring)."""

    def __init__(self, out: str, every: int = 64, seconds: float = 5.0):
        self.out = out
        self.every, self.seconds = every, seconds
        self.crcs: dict[int, list[int]] = {}
        self.pending: list[list] = []
        self.seq = 0
        self.last = time.monotonic()

    def load(self) -> dict[int, list[int]]:
        for name in sorted(s3.list_all(work_url(self.out, JOURNAL))):
            doc = get_json(work_url(self.out, f"{JOURNAL}/{name}"))
            if isinstance(doc, list):
                for rec in doc:
                    if (isinstance(rec, list) and len(rec) == 2 and isinstance(rec[0], int)
                            and isinstance(rec[1], list) and all(isinstance(c, int) for c in rec[1])):
                        self.crcs[rec[0]] = rec[1]
            stem = name.partition(".")[0]
            if stem.isdigit():
                self.seq = max(self.seq, int(stem) + 1)
        return self.crcs

    def record(self, task_id: int, crcs: list[int]) -> None:
        self.crcs[task_id] = list(crcs)
        self.pending.append([task_id, list(crcs)])
        if len(self.pending) >= self.every or time.monotonic() - self.last >= self.seconds:
            self.flush()

    def flush(self) -> None:
        if self.pending:
            put_json(work_url(self.out, f"{JOURNAL}/{self.seq:08d}.json"), self.pending)
            self.seq += 1
            self.pending = []
        self.last = time.monotonic()


# ---- --overwrite -------------------------------------------------------------------------------------------------

WORK_NAMES = {STATE, OWNED, LOCK}
SHOWN = 5  # strangers named in a refusal


def delete_keys(out: str, keys: list[str]) -> None:
    bucket = s3.split(out)[0]
    for i in range(0, len(keys), 1000):
        try:
            s3.client().delete_objects(Bucket=bucket, Delete={"Objects": [{"Key": k} for k in keys[i:i + 1000]],
                                                              "Quiet": True})
        except s3.s3_exceptions() as e:
            raise s3.s3_error(e, out, "deleting") from None


def clear_owned(out: str, listing: dict, state) -> None:
    """--overwrite: remove what an earlier expo_dist run wrote under the prefix (its objects and its open
    uploads), or refuse, removing nothing, if anything else is there."""
    ours = set()
    owned = get_json(work_url(out, OWNED))
    if isinstance(owned, dict) and isinstance(owned.get("names"), list):
        ours.update(n for n in owned["names"] if isinstance(n, str))
    for rel in listing:
        if rel == MANIFEST or (rel.endswith("/" + MANIFEST) and rel.count("/") == 1
                               and rel.startswith("alpha-")):
            man = get_json(s3.join(out, rel))
            if isinstance(man, dict) and man.get("tool") == "expo_dist" and isinstance(man.get("written"), list):
                base = rel[: -len(MANIFEST)]
                ours.update(base + n for n in man["written"] if plain_name(n))
    work = f"{WORK}/"
    strangers = [r for r in sorted(listing) if r not in ours and not (
        r.startswith(work) and (r[len(work):] in WORK_NAMES or r.startswith(f"{work}{JOURNAL}/")))]
    if strangers:
        more = f" and {len(strangers) - SHOWN} more" if len(strangers) > SHOWN else ""
        raise ExpoError(f"--out {out} holds objects expo_dist did not write ({', '.join(strangers[:SHOWN])}"
                        f"{more}); --overwrite only replaces an earlier expo_dist output: move them away or "
                        "choose another prefix")
    aborted = 0
    ups = state.get("uploads") if isinstance(state, dict) else None
    for rel, uid in (ups.items() if isinstance(ups, dict) else ()):
        parts = rel.split("/") if isinstance(rel, str) else []
        if not isinstance(uid, str) or not all(plain_name(p) for p in parts) or not 1 <= len(parts) <= 2:
            continue
        bucket, key = s3.split(s3.join(out, rel))
        try:
            s3.client().abort_multipart_upload(Bucket=bucket, Key=key, UploadId=uid)
            aborted += 1
        except s3.s3_exceptions() as e:
            if s3.error_code(e) not in ("NoSuchUpload", "404"):
                raise s3.s3_error(e, s3.join(out, rel), "aborting the upload") from None
    delete_keys(out, [s3.split(s3.join(out, r))[1] for r in sorted(listing)])
    log.warning("--overwrite: removed %d objects and aborted %d multipart uploads an earlier expo_dist run "
                "left under %s", len(listing), aborted, out)


# ---- CRC-32 of a whole file from the CRC-32 of its parts (zlib's crc32_combine) -------------------------------


def _times(mat: list[int], vec: int) -> int:
    s, i = 0, 0
    while vec:
        if vec & 1:
            s ^= mat[i]
        vec >>= 1
        i += 1
    return s


def _square(mat: list[int]) -> list[int]:
    return [_times(mat, mat[n]) for n in range(32)]


def crc32_combine(crc1: int, crc2: int, len2: int) -> int:
    """The CRC-32 of A + B from crc32(A), crc32(B) and len(B)."""
    if len2 <= 0:
        return crc1
    odd = [0xEDB88320] + [1 << n for n in range(31)]  # the operator for one zero bit
    even = _square(odd)  # two zero bits
    odd = _square(even)  # four zero bits
    while True:
        even = _square(odd)
        if len2 & 1:
            crc1 = _times(even, crc1)
        len2 >>= 1
        if not len2:
            break
        odd = _square(even)
        if len2 & 1:
            crc1 = _times(odd, crc1)
        len2 >>= 1
        if not len2:
            break
    return crc1 ^ crc2


def file_crc32(parts: list[tuple[int, int]]) -> int:
    """The CRC-32 of a file from its parts' (crc32, size), in order."""
    crc = 0
    for c, n in parts:
        crc = crc32_combine(crc, c, n)
    return crc


def composite_crc32(part_crcs: list[int]) -> str:
    """The checksum S3 gives a multipart object uploaded with CRC-32 part checksums: the CRC-32 of the parts'
    checksums, base64, then '-' and the number of parts."""
    import base64
    import zlib

    raw = b"".join((c & 0xFFFFFFFF).to_bytes(4, "big") for c in part_crcs)
    return base64.b64encode(zlib.crc32(raw).to_bytes(4, "big")).decode() + f"-{len(part_crcs)}"
