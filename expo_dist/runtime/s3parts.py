"""Worker side of an s3:// output: each task's byte range is one part of its file's multipart upload.

Part number = the task's index within its file + 1; part 1 starts at byte 0 and so carries the safetensors header;
every part but a file's last is one task step long (planning.plan.task_step), which the driver keeps between 5 MiB
and 5 GiB. A task's output is gathered in one buffer per output (window by window, as Runner computes it) and
uploaded as that part with its CRC-32, which S3 checks against the bytes it received. Uploading the same part again
(a retried task) replaces it with the same bytes: idempotent. No local disk is used.
"""

from __future__ import annotations

import base64
import io
import zlib
from dataclasses import dataclass

from ..errors import ExpoError, MergeFailed
from ..planning.plan import Plan
from ..sources import s3


@dataclass(frozen=True)
class PartTarget:
    """One output on S3 as the workers see it."""

    url: str  # s3://bucket/prefix of this output (OUT, or OUT/alpha-<value> of a sweep)
    uploads: dict[str, str]  # weight file -> multipart upload id
    headers: dict[str, bytes]  # weight file -> its safetensors header (the first bytes of part 1)
    step: int  # the plan's task step: every part but a file's last is this long


def part_span(begin: int, header_len: int, step: int) -> tuple[int, int]:
    """(part number, first byte of the part in the file) of the task that starts at `begin`."""
    number = begin // step - header_len // step + 1
    return number, 0 if number == 1 else begin


def crc_b64(crc: int) -> str:
    """A CRC-32 as S3's x-amz-checksum-crc32 header writes it."""
    return base64.b64encode((crc & 0xFFFFFFFF).to_bytes(4, "big")).decode()


def check_part_size(plan: Plan, step: int, out: str) -> None:
    """The task step is the part size: S3 wants 5 MiB to 5 GiB and at most 10,000 parts per file."""
    if step < s3.MIN_PART or step > s3.MAX_PART:
        raise ExpoError(f"--max-task-bytes {step}: an s3:// output uploads one part per task, and S3 parts must be "
                        f"5 MiB to 5 GiB; give --max-task-bytes between 5MiB and 5GiB (the default for s3:// is "
                        "64MiB)")
    worst = max(s.layout.size for s in plan.shards)
    parts = -(-worst // step)
    if parts > s3.MAX_PARTS:
        raise ExpoError(f"--max-task-bytes {step}: a {worst}-byte shard would take {parts} parts; S3 allows "
                        f"{s3.MAX_PARTS} per file: raise --max-task-bytes or lower --max-shard-size ({out})")


class ViewBody(io.RawIOBase):
    """A seekable, read-only file over a memoryview: an upload body without copying the bytes (botocore seeks back
    to retry)."""

    def __init__(self, view: memoryview):
        super().__init__()
        self.view, self.pos = view, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        n = min(len(b), len(self.view) - self.pos)
        if n <= 0:
            return 0
        b[:n] = self.view[self.pos: self.pos + n]
        self.pos += n
        return n

    def seek(self, offset: int, whence: int = 0) -> int:
        base = (0, self.pos, len(self.view))[whence]
        self.pos = max(0, base + offset)
        return self.pos

    def tell(self) -> int:
        return self.pos

    def __len__(self) -> int:
        return len(self.view)


class PartSink:
    """Gathers one task's output per target and uploads it as a part (Runner: begin, put per window, finish)."""

    def __init__(self, targets: list[PartTarget], alloc):
        self.targets = targets
        self.alloc = alloc  # n -> a writable uint8 buffer of n bytes
        self.bufs: list = [None] * len(targets)
        self.start = self.size = self.number = 0

    def begin(self, file: str, begin: int, end: int) -> list[int]:
        """Start the part of the task [begin, end) of file; the CRC-32 of each output so far (of the header)."""
        crcs = []
        for k, t in enumerate(self.targets):
            header = t.headers[file]
            self.number, self.start = part_span(begin, len(header), t.step)
            self.size = end - self.start
            if self.bufs[k] is None or len(self.bufs[k]) < self.size:
                self.bufs[k] = None
                self.bufs[k] = self.alloc(self.size)
            crc = 0
            if self.start == 0:
                self.bufs[k][: len(header)] = memoryview(header)
                crc = zlib.crc32(header)
            crcs.append(crc)
        return crcs

    def put(self, k: int, pos: int, view: memoryview) -> None:
        at = pos - self.start
        self.bufs[k][at: at + len(view)] = view

    def finish(self, file: str, crcs: list[int]) -> None:
        """Upload the part to every output (S3 checks each against its CRC-32)."""
        for k, t in enumerate(self.targets):
            bucket, key = s3.split(s3.join(t.url, file))
            body = ViewBody(memoryview(self.bufs[k])[: self.size])
            try:
                s3.client().upload_part(Bucket=bucket, Key=key, UploadId=t.uploads[file], PartNumber=self.number,
                                        Body=body, ContentLength=self.size, ChecksumCRC32=crc_b64(crcs[k]))
            except s3.s3_exceptions() as e:
                if s3.error_code(e) == "NoSuchUpload":
                    raise MergeFailed(f"{s3.join(t.url, file)}: its multipart upload is gone (aborted by another "
                                      "run's --overwrite, or by a bucket lifecycle rule); rerun the same command "
                                      "to start it again") from None
                raise s3.s3_error(e, s3.join(t.url, file), f"uploading part {self.number}", MergeFailed) from None
