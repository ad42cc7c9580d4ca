"""Object storage (s3://bucket/prefix) on any S3-compatible endpoint: URLs, the one client per process, the one line
a user sees for each S3 failure, and positional reads (ranged GETs).

Credentials and endpoint come the way boto3 users already set them: AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY /
AWS_SESSION_TOKEN, AWS_PROFILE and ~/.aws/config, instance and pod roles, AWS_ENDPOINT_URL (or
AWS_ENDPOINT_URL_S3) for MinIO, Ceph, R2, GCS's XML API or SeaweedFS. worker_env() forwards the AWS_* variables
of the driver to the worker actors on every node. Transient failures (5xx, throttling, timeouts, dropped
connections) are retried by botocore's "standard" retry mode with exponential backoff (S3_ATTEMPTS tries).

boto3 is an extra (`pip install expo_dist[s3]`): it is imported only when an s3:// URL is used.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass

from ..errors import ExpoError

SCHEME = "s3://"
S3_ATTEMPTS = 8  # botocore standard retry mode: tries of one request, exponential backoff with jitter
MIN_PART = 5 << 20  # S3's limits on a multipart upload: every part but the last at least 5 MiB,
MAX_PART = 5 << 30  # at most 5 GiB,
MAX_PARTS = 10_000  # and at most 10,000 parts
FORWARD_PREFIXES = ("AWS_",)  # what worker_env() forwards

_LOCAL = threading.local()
_LOCK = threading.Lock()
_CLIENTS: dict[int, object] = {}


def is_s3(url) -> bool:
    return isinstance(url, str) and url.startswith(SCHEME)


def split(url: str) -> tuple[str, str]:
    """'s3://bucket/a/b' -> ('bucket', 'a/b'); the key may be empty (the bucket's top)."""
    if not is_s3(url):
        raise ExpoError(f"{url}: not an s3:// URL")
    bucket, _, key = url[len(SCHEME):].partition("/")
    if not bucket or not (3 <= len(bucket) <= 63):
        raise ExpoError(f"{url}: no valid bucket name after s3:// (3 to 63 characters)")
    if any(p in (".", "..") for p in key.split("/")) or "//" in key.strip("/"):
        raise ExpoError(f"{url}: '.', '..' or an empty part in the key; give s3://bucket/prefix")
    return bucket, key


def prefix(url: str) -> str:
    """The URL of a folder-like prefix, without its trailing slash."""
    return url.rstrip("/")


def join(url: str, *names: str) -> str:
    return "/".join([prefix(url), *names])


def parent(url: str) -> str:
    return prefix(url).rpartition("/")[0]


def basename(url: str) -> str:
    return prefix(url).rpartition("/")[2]


def client():
    """This process's S3 client (boto3 clients are thread-safe; one per process, made on first use)."""
    pid = os.getpid()
    c = _CLIENTS.get(pid)
    if c is not None:
        return c
    with _LOCK:
        c = _CLIENTS.get(pid)
        if c is None:
            try:
                import boto3
                from botocore.config import Config
            except ImportError:
                raise ExpoError("s3:// needs boto3: pip install 'expo_dist[s3]' (on the driver and every "
                                "node)") from None
            cfg = Config(retries={"mode": "standard", "max_attempts": S3_ATTEMPTS}, connect_timeout=10,
                         read_timeout=120, max_pool_connections=32, tcp_keepalive=True)
            c = _CLIENTS[pid] = boto3.session.Session().client("s3", config=cfg)
    return c


def endpoint() -> str:
    try:
        return client().meta.endpoint_url
    except ExpoError:
        raise
    except Exception:  # noqa: BLE001 - only for messages
        return "the S3 endpoint"


def worker_env() -> dict[str, str]:
    """The driver's AWS_* settings, for the worker actors on every node (runtime_env env_vars). Note that Ray shows
    a job's runtime_env in its dashboard: on a shared cluster give the nodes a role or a profile instead of keys."""
    return {k: v for k, v in os.environ.items() if k.startswith(FORWARD_PREFIXES)}


_CREDS = ("InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken", "AuthorizationHeaderMalformed",
          "InvalidClientTokenId", "UnrecognizedClientException")
_EXPIRED = ("ExpiredToken", "TokenRefreshRequired", "RequestExpired", "ExpiredTokenException")
_DENIED = ("AccessDenied", "AllAccessDisabled", "AccountProblem", "Forbidden", "403")
_MISSING_BUCKET = ("NoSuchBucket",)
_MISSING_KEY = ("NoSuchKey", "404", "NotFound")


def s3_exceptions() -> tuple[type[BaseException], ...]:
    from botocore.exceptions import BotoCoreError, ClientError

    return (ClientError, BotoCoreError)


def error_code(e: BaseException) -> str:
    resp = getattr(e, "response", None) or {}
    return str((resp.get("Error") or {}).get("Code") or "")


def s3_error(e: BaseException, url: str, doing: str = "", cls: type[ExpoError] = ExpoError) -> ExpoError:
    """The one line a user sees for an S3 failure on url (doing: 'reading', 'writing', ...)."""
    from botocore import exceptions as bx

    err = _s3_error(e, url, doing, cls)
    # the store cannot be reached or the credentials expired: a rerun resumes (nothing could be aborted anyway)
    err.resumable = isinstance(e, (bx.EndpointConnectionError, bx.ConnectTimeoutError, bx.ConnectionClosedError,
                                   bx.ReadTimeoutError)) or error_code(e) in _EXPIRED
    return err


def _s3_error(e: BaseException, url: str, doing: str, cls: type[ExpoError]) -> ExpoError:
    from botocore import exceptions as bx

    what = f"{url}: {doing + ': ' if doing else ''}"
    if isinstance(e, (bx.NoCredentialsError, bx.PartialCredentialsError)):
        return cls(f"{what}no S3 credentials found; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or "
                   "AWS_PROFILE, or give the nodes a role) where the driver runs; workers get the driver's AWS_* "
                   "variables")
    if isinstance(e, (bx.EndpointConnectionError, bx.ConnectTimeoutError, bx.ConnectionClosedError,
                      bx.ReadTimeoutError)):
        return cls(f"{what}cannot reach the S3 endpoint {endpoint()} ({e.__class__.__name__}, retried "
                   f"{S3_ATTEMPTS} times); check AWS_ENDPOINT_URL and the network")
    code = error_code(e)
    bucket = split(url)[0] if is_s3(url) else "?"
    if code in _CREDS:
        return cls(f"{what}the S3 endpoint refused these credentials ({code}); check AWS_ACCESS_KEY_ID and "
                   "AWS_SECRET_ACCESS_KEY (or the profile)")
    if code in _EXPIRED:
        return cls(f"{what}the S3 credentials have expired ({code}); refresh them (e.g. `aws sso login`) and rerun "
                   "the same command to resume")
    if code in _MISSING_BUCKET:
        return cls(f"{what}bucket {bucket} does not exist; create it or fix the URL")
    if code in _DENIED:
        return cls(f"{what}access denied ({code}); these credentials may not "
                   f"{'write to' if doing.startswith(('writ', 'upload', 'delet')) else 'read'} s3://{bucket}")
    if code in _MISSING_KEY:
        return cls(f"{what}no such object")
    msg = ((getattr(e, "response", None) or {}).get("Error") or {}).get("Message") or str(e)
    return cls(f"{what}S3 error {code or e.__class__.__name__}: {' '.join(str(msg).split())[:200]}")


def check_bucket(url: str, doing: str) -> None:
    """Fail early, with one line, on missing credentials, a missing bucket, an unreachable endpoint."""
    bucket, _ = split(url)
    try:
        client().head_bucket(Bucket=bucket)
    except s3_exceptions() as e:
        if error_code(e) in ("404", "NotFound"):
            raise ExpoError(f"{url}: {doing}: bucket {bucket} does not exist; create it or fix the URL") from None
        if error_code(e) == "403":  # HEAD carries no error body: 403 is wrong keys or no permission
            raise ExpoError(f"{url}: {doing}: the S3 endpoint answers 403 Forbidden for bucket {bucket} (wrong "
                            "credentials, or no permission on this bucket)") from None
        raise s3_error(e, url, doing) from None


@dataclass
class Listed:
    size: int
    etag: str


def list_top(url: str) -> dict[str, Listed]:
    """The objects directly under a prefix (not in its sub-prefixes): name -> size, ETag."""
    bucket, key = split(url)
    key = key.rstrip("/") + "/" if key.strip("/") else ""
    out: dict[str, Listed] = {}
    try:
        for page in client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=key, Delimiter="/"):
            for o in page.get("Contents", ()):
                out[o["Key"][len(key):]] = Listed(int(o["Size"]), str(o.get("ETag", "")).strip('"'))
    except s3_exceptions() as e:
        raise s3_error(e, url, "listing") from None
    return out


def list_all(url: str) -> dict[str, Listed]:
    """Every object under a prefix, sub-prefixes included: relative key -> size, ETag."""
    bucket, key = split(url)
    key = key.rstrip("/") + "/" if key.strip("/") else ""
    out: dict[str, Listed] = {}
    try:
        for page in client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=key):
            for o in page.get("Contents", ()):
                out[o["Key"][len(key):]] = Listed(int(o["Size"]), str(o.get("ETag", "")).strip('"'))
    except s3_exceptions() as e:
        raise s3_error(e, url, "listing") from None
    return out


def identity(url: str) -> list:
    """[size, ETag] of an object: what a resumed merge checks its S3 inputs by (a rewritten object has a new ETag)."""
    bucket, key = split(url)
    try:
        head = client().head_object(Bucket=bucket, Key=key)
    except s3_exceptions() as e:
        raise s3_error(e, url, "reading") from None
    return [int(head["ContentLength"]), str(head.get("ETag", "")).strip('"')]


def get_bytes(url: str, limit: int = 100_000_000) -> bytes:
    """A small object whole (side files, JSON)."""
    bucket, key = split(url)
    try:
        obj = client().get_object(Bucket=bucket, Key=key)
        if int(obj.get("ContentLength", 0)) > limit:
            raise ExpoError(f"{url}: larger than {limit} bytes")
        return obj["Body"].read()
    except s3_exceptions() as e:
        raise s3_error(e, url, "reading") from None


def read_into(url: str, view: memoryview, offset: int, cls: type[ExpoError] = ExpoError,
              etag: str | None = None) -> None:
    """Exactly len(view) bytes at offset, one ranged GET straight into view (an object that ends first, or an
    object that changed under us, is one line naming it). etag: the object must still be that one (If-Match)."""
    n = len(view)
    if n == 0:
        return
    bucket, key = split(url)
    try:
        pin = {"IfMatch": f'"{etag}"'} if etag else {}
        body = client().get_object(Bucket=bucket, Key=key, Range=f"bytes={offset}-{offset + n - 1}", **pin)["Body"]
        done = 0
        while done < n:
            got = body.readinto(view[done:])
            if not got:
                break
            done += got
        body.close()
    except s3_exceptions() as e:
        if error_code(e) in ("PreconditionFailed", "412"):
            raise cls(f"{url}: the object changed during the merge (its ETag is not the one planned from); rerun "
                      "the same command (it plans from the new object)") from None
        if error_code(e) == "InvalidRange":
            raise cls(f"{url}: unexpected end of object at byte {offset} (object changed or truncated?)") from None
        raise s3_error(e, url, "reading", cls) from None
    if done != n:
        raise cls(f"{url}: unexpected end of object at byte {offset + done} (object changed or truncated?)")


class S3Reader:
    """Positional reads of one object (formats.reader.Reader), for the header parsers."""

    def __init__(self, url: str, size: int):
        self.url, self.display, self.size = url, url, size
        self.bytes_fetched = 0

    def read(self, offset: int, n: int) -> bytes:
        if offset < 0 or offset >= self.size or n <= 0:
            return b""
        buf = bytearray(min(n, self.size - offset))
        read_into(self.url, memoryview(buf), offset)
        self.bytes_fetched += len(buf)
        return bytes(buf)

    def close(self) -> None:
        pass
