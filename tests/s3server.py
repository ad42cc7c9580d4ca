"""The tests' S3 server (expo_dist.testing.s3server: SeaweedFS on 127.0.0.1) and what the S3 test modules share:
a fresh bucket per test (the `srv` fixture is in conftest.py), and the comparison of an output with a local-disk one."""

from __future__ import annotations

import itertools
import json
import os
import zlib

from expo_dist.testing.s3server import (  # noqa: F401
    ADMIN,
    READER,
    S3Server,
    _free_ports,
    _wait_writable,
    download_prefix,
    uploads,
    weed_binary,
    weed_server,
)

_names = itertools.count()


def bucket(srv, prefix: str = "expo") -> str:
    """A new, empty bucket."""
    name = f"{prefix}-{os.getpid()}-{next(_names)}"
    srv.client().create_bucket(Bucket=name)
    return name


def files_of(folder: str) -> dict[str, bytes]:
    out = {}
    for dirpath, _, names in os.walk(folder):
        for n in names:
            p = os.path.join(dirpath, n)
            with open(p, "rb") as f:
                out[os.path.relpath(p, folder)] = f.read()
    return out


def assert_same_output(got_dir: str, want_dir: str, same_inputs: bool = True) -> dict:
    """Every file byte-identical but the manifest (timings, workers) and, for inputs named differently, the card
    (which names them); the manifests agree on every file's bytes. Returns the manifests read."""
    got, want = files_of(got_dir), files_of(want_dir)
    assert sorted(got) == sorted(want)
    for name in want:
        if not name.endswith("expo_manifest.json") and (same_inputs or not name.endswith("README.md")):
            assert got[name] == want[name], name
    mans = {}
    for name in want:
        if name.endswith("expo_manifest.json"):
            g, w = json.loads(got[name]), json.loads(want[name])
            assert g["written"] == w["written"] and g["tensors"] == w["tensors"]
            for f, rec in g["files"].items():
                data = got[os.path.join(os.path.dirname(name), f)]
                assert rec["size"] == len(data) == w["files"][f]["size"]
                assert rec["crc32"] == f"{zlib.crc32(data):08x}"
            mans[name] = g
    return mans
