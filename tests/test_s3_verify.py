"""`expo-dist verify s3://bucket/prefix` against a real S3 server (SeaweedFS on 127.0.0.1, tests/s3server.py): a
merge to s3:// passes (structure and CRC-32 streamed by ranged GETs; with the inputs, tensors recomputed from
ranged GETs of the output); one flipped byte, a missing object and an unfinished prefix each fail naming what."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import zlib

import pytest
from s3server import bucket, download_prefix

from expo_dist.cli import main
from expo_dist.errors import ExpoError
from expo_dist.formats.safetensors import read_header
from expo_dist.merge import run
from expo_dist.sources import s3
from expo_dist.spec import MergeSpec
from expo_dist.verify import verify

pytestmark = pytest.mark.slow
SHARD = 8_000_000  # three output files
ALPHA = 0.3

_names = itertools.count()


@pytest.fixture(scope="module")
def s3env(srv):
    """The server's credentials and endpoint in this process's environment, as a user sets them."""
    with pytest.MonkeyPatch.context() as mp:
        for k, v in srv.env().items():
            mp.setenv(k, v)
        s3._CLIENTS.clear()
        yield srv
    s3._CLIENTS.clear()


@pytest.fixture(scope="module")
def pair(pair_factory):
    sft, aligned = pair_factory("mid")  # ~19 MB: with 5 MiB parts, files of several parts
    return str(sft), str(aligned)


@pytest.fixture(scope="module")
def merged(s3env, pair, local_ray):
    """One merge to s3://BUCKET/out: (bucket, url). Tests that damage it work on a copy."""
    b = bucket(s3env)
    url = f"s3://{b}/out"
    run(MergeSpec(sft=pair[0], aligned=pair[1], alpha=ALPHA, out=url, max_shard_size=SHARD), progress=False)
    return b, url


def copy_of(srv, merged) -> tuple[str, str]:
    """A private copy of the merged prefix (server-side copies): (key prefix, url)."""
    b, _ = merged
    c = srv.client()
    dest = f"copy{next(_names)}"
    for o in c.list_objects_v2(Bucket=b, Prefix="out/")["Contents"]:
        c.copy_object(Bucket=b, Key=dest + o["Key"][len("out"):], CopySource={"Bucket": b, "Key": o["Key"]})
    return dest, f"s3://{b}/{dest}"


def weight_names(srv, b: str, key: str) -> list[str]:
    index = json.loads(srv.client().get_object(Bucket=b, Key=f"{key}/model.safetensors.index.json")["Body"].read())
    return sorted(set(index["weight_map"].values()))


def cli(capsys, *argv) -> tuple[int, str, str]:
    rc = main(["verify", *map(str, argv)])
    cap = capsys.readouterr()
    lines = cap.out.splitlines()
    assert len(lines) == 1, cap.out  # one verdict line on stdout, details on stderr
    return rc, lines[0], cap.err


def stores_checksums(srv, b: str, key: str) -> bool:
    return "ChecksumCRC32" in srv.client().head_object(Bucket=b, Key=key, ChecksumMode="ENABLED")


def test_good_output_passes_through_the_cli(merged, s3env, capsys):
    b, url = merged
    env = {**os.environ, **s3env.env()}
    env.pop("RAY_ADDRESS", None)
    r = subprocess.run([sys.executable, "-m", "expo_dist.cli", "verify", url], env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.startswith(f"verify: OK {url}: 3 file(s)") and "CRC-32 of 3 file(s) match" in r.stdout, r.stdout
    rc, verdict, err = cli(capsys, url)
    assert rc == 0 and "problem" not in err, verdict
    names = weight_names(s3env, b, "out")
    if stores_checksums(s3env, b, f"out/{names[0]}"):  # S3's own composite checksum agrees with the manifest's
        assert "S3's stored checksum of 3" in verdict, verdict


def test_recompute_reads_the_output_by_ranged_gets(merged, pair, monkeypatch, capsys):
    b, url = merged
    reads = []
    real = s3.read_into

    def spy(u, view, offset, cls=ExpoError):
        reads.append((u, len(view)))
        return real(u, view, offset, cls)

    monkeypatch.setattr(s3, "read_into", spy)
    rc, verdict, _ = cli(capsys, url, "--sft", pair[0], "--aligned", pair[1], "--alpha", ALPHA, "--full")
    assert rc == 0 and "all exact" in verdict and "extrapolated tensor(s) recomputed" in verdict, verdict
    out_reads = [n for u, n in reads if u.startswith(url + "/model-")]
    assert out_reads and max(out_reads) <= 64 << 20  # tensor bytes and checksums: bounded ranged GETs
    rc, verdict, _ = cli(capsys, url, "--sft", pair[0], "--aligned", pair[1], "--sample", "2")  # alpha: manifest
    assert rc == 0, verdict


def test_one_flipped_byte_fails_naming_the_file(s3env, merged, pair, capsys):
    b, _ = merged
    key, url = copy_of(s3env, merged)
    c = s3env.client()
    victim = weight_names(s3env, b, key)[1]
    data = bytearray(c.get_object(Bucket=b, Key=f"{key}/{victim}")["Body"].read())
    header = read_header(s3.S3Reader(f"{url}/{victim}", len(data)))
    name, entry = max(header.tensors.items(), key=lambda kv: kv[1].nbytes)
    data[entry.begin + 1000] ^= 0x5A
    c.put_object(Bucket=b, Key=f"{key}/{victim}", Body=bytes(data))
    rc, verdict, err = cli(capsys, url)
    assert rc == 1 and verdict.startswith(f"verify: FAILED {url}"), verdict
    assert f"{url}/{victim}: CRC-32" in verdict and "differs from the manifest's" in verdict, verdict
    # the manifest made to agree with the damaged object: only recomputing from the inputs can tell
    man = json.loads(c.get_object(Bucket=b, Key=f"{key}/expo_manifest.json")["Body"].read())
    man["files"][victim]["crc32"] = f"{zlib.crc32(data):08x}"
    del man["files"][victim]["s3_checksum_crc32"]
    c.put_object(Bucket=b, Key=f"{key}/expo_manifest.json", Body=json.dumps(man).encode())
    assert cli(capsys, url)[0] == 0
    rep = verify(url, pair[0], pair[1], sample=None, say=lambda m: None)
    assert not rep.ok and any(p.startswith(f"tensor '{name}': 1 ") and "element(s) differ" in p
                              for p in rep.problems), rep.problems


def test_missing_object_fails_naming_it(s3env, merged, capsys):
    b, _ = merged
    key, url = copy_of(s3env, merged)
    victim = weight_names(s3env, b, key)[2]
    s3env.client().delete_object(Bucket=b, Key=f"{key}/{victim}")
    rc, verdict, _ = cli(capsys, url)
    assert rc == 1 and f"names {victim}, which is missing" in verdict, verdict


def test_s3_stored_checksum_is_compared(s3env, merged, capsys):
    b, _ = merged
    key, url = copy_of(s3env, merged)
    c = s3env.client()
    victim = weight_names(s3env, b, key)[0]
    man = json.loads(c.get_object(Bucket=b, Key=f"{key}/expo_manifest.json")["Body"].read())
    man["files"][victim]["s3_checksum_crc32"] = "AAAAAA==-2"
    c.put_object(Bucket=b, Key=f"{key}/expo_manifest.json", Body=json.dumps(man).encode())
    stored = c.head_object(Bucket=b, Key=f"{key}/{victim}", ChecksumMode="ENABLED").get("ChecksumCRC32")
    rc, verdict, _ = cli(capsys, url)
    if stored is None or "-" not in stored:  # no composite checksum kept (or a copy's full-object one)
        assert rc == 0, verdict
    else:
        assert rc == 1 and f"{url}/{victim}: S3's stored checksum" in verdict, verdict


def test_unfinished_prefix_is_reported(s3env, merged, capsys):
    b, _ = merged
    key, url = copy_of(s3env, merged)
    c = s3env.client()
    c.put_object(Bucket=b, Key=f"{key}/.expo/state.json", Body=b"{}")
    rc, verdict, _ = cli(capsys, url)
    assert rc == 1 and f"{url}/.expo/ holds objects: the merge did not finish" in verdict, verdict
    # a merge stopped before anything was completed: only its records are there
    c.put_object(Bucket=b, Key="early/.expo/state.json", Body=b"{}")
    rc, verdict, _ = cli(capsys, f"s3://{b}/early")
    assert rc == 1 and "did not finish" in verdict, verdict


def test_bad_prefixes_are_one_line(s3env, merged, capsys):
    b, _ = merged
    assert main(["verify", "s3://no-such-bucket-expov/out"]) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and len(err.strip().splitlines()) == 1, err
    assert main(["verify", f"s3://{b}/nothing-here"]) == 2
    assert "no objects under this prefix" in capsys.readouterr().err


def test_downloaded_s3_output_verifies_by_crc32(s3env, merged, tmp_path, capsys):
    """The s3 manifest records CRC-32 and no sha256: a local copy of the prefix is checked by CRC-32."""
    b, _ = merged
    d = tmp_path / "dl"
    download_prefix(s3env.client(), b, "out", str(d))
    rc, verdict, _ = cli(capsys, d)
    assert rc == 0 and "CRC-32 of 3 file(s) match" in verdict, verdict
    victim = sorted(d.glob("model-*.safetensors"))[0]
    with open(victim, "r+b") as f:
        f.seek(-3, os.SEEK_END)
        byte = f.read(1)
        f.seek(-3, os.SEEK_END)
        f.write(bytes([byte[0] ^ 1]))
    rc, verdict, _ = cli(capsys, d)
    assert rc == 1 and f"{victim}: CRC-32" in verdict, verdict
