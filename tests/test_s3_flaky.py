"""Transient S3 failures are retried with backoff: a merge through a proxy that answers the first try of every part
upload and every ranged GET with 503 SlowDown (as S3 does under load) still ends byte-identical, with no upload left
open. The proxy forwards everything else, unchanged, to a real SeaweedFS on 127.0.0.1."""

from __future__ import annotations

import http.client
import os
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from s3server import download_prefix, uploads

from expo_dist.merge import run
from expo_dist.sources import s3
from expo_dist.spec import MergeSpec

pytestmark = pytest.mark.slow
SLOWDOWN = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code><Message>Please reduce your request '
            b'rate.</Message></Error>')


class FlakyProxy:
    """Forwards HTTP to upstream; the first try of each UploadPart (per part) and of each ranged GET (per range)
    gets 503 SlowDown instead."""

    def __init__(self, upstream: str):
        self.upstream = urllib.parse.urlsplit(upstream)
        self.seen: set[tuple] = set()
        self.injected = {"UploadPart": 0, "GetRange": 0}
        self.lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def _handle(self):
                n = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(n) if n else b""
                q = urllib.parse.parse_qs(urllib.parse.urlsplit(self.path).query)
                kind = key = None
                if self.command == "PUT" and "partNumber" in q and "uploadId" in q:
                    kind, key = "UploadPart", (self.path,)
                elif self.command == "GET" and self.headers.get("Range"):
                    kind, key = "GetRange", (self.path, self.headers["Range"])
                if kind is not None:
                    with proxy.lock:
                        first = (kind, *key) not in proxy.seen
                        proxy.seen.add((kind, *key))
                        if first:
                            proxy.injected[kind] += 1
                    if first:
                        self.send_response(503)
                        self.send_header("Content-Type", "application/xml")
                        self.send_header("Content-Length", str(len(SLOWDOWN)))
                        self.end_headers()
                        self.wfile.write(SLOWDOWN)
                        return
                conn = http.client.HTTPConnection(proxy.upstream.hostname, proxy.upstream.port, timeout=120)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("expect", "connection")}
                conn.request(self.command, self.path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                self.send_response(resp.status, resp.reason)
                for k, v in resp.getheaders():
                    if k.lower() not in ("transfer-encoding", "content-length", "connection"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                conn.close()

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()


def test_merge_through_503s_is_exact(srv, pair_factory, local_ray, tmp_path, monkeypatch):
    sft, aligned = (str(p) for p in pair_factory("mid"))
    c = srv.client()
    c.create_bucket(Bucket="flaky-bucket")
    for who, folder in (("sft", sft), ("aligned", aligned)):
        for n in os.listdir(folder):
            c.upload_file(os.path.join(folder, n), "flaky-bucket", f"in/{who}/{n}")
    base = str(tmp_path / "base")
    run(MergeSpec(sft=sft, aligned=aligned, alpha=0.3, out=base, max_shard_size=8_000_000), progress=False)

    proxy = FlakyProxy(srv.endpoint)
    try:
        for k, v in {**srv.env(), "AWS_ENDPOINT_URL": proxy.endpoint}.items():
            monkeypatch.setenv(k, v)
        s3._CLIENTS.clear()
        run(MergeSpec(sft="s3://flaky-bucket/in/sft", aligned="s3://flaky-bucket/in/aligned", alpha=0.3,
                      out="s3://flaky-bucket/out", max_shard_size=8_000_000, max_task_bytes=5 << 20), progress=False)
    finally:
        proxy.close()
        s3._CLIENTS.clear()
    assert proxy.injected["UploadPart"] >= 4 and proxy.injected["GetRange"] >= 4, proxy.injected
    assert uploads(c, "flaky-bucket") == []
    download_prefix(c, "flaky-bucket", "out", str(tmp_path / "dl"))
    for name in sorted(os.listdir(base)):
        if name.endswith(".safetensors") or name.endswith(".json") and name != "expo_manifest.json":
            assert (tmp_path / "dl" / name).read_bytes() == open(os.path.join(base, name), "rb").read(), name
