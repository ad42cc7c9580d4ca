"""--out s3:// and s3:// inputs against a real S3 server (SeaweedFS on 127.0.0.1, tests/s3server.py) with an
embedded Ray: byte-identical to a local-disk merge, loadable by transformers, no multipart upload left behind,
resume after the driver is killed, abort after a failure, --overwrite that removes only what expo_dist wrote."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import faulthooks
import pytest
from s3server import assert_same_output, bucket, download_prefix, uploads

from expo_dist.errors import ExpoError
from expo_dist.merge import run
from expo_dist.sources import s3
from expo_dist.spec import MergeSpec
from expo_dist.testing.reference import assert_exact

pytestmark = pytest.mark.slow
MIB = 1 << 20
SHARD = 8_000_000  # output shards of ~8 MB: with 5 MiB parts, files of one and of two parts


@pytest.fixture
def s3env(srv, monkeypatch):
    """The server's credentials and endpoint in this process's environment (the driver's), as a user sets them;
    the workers get them from the driver."""
    for k, v in srv.env().items():
        monkeypatch.setenv(k, v)
    s3._CLIENTS.clear()
    yield srv
    s3._CLIENTS.clear()


@pytest.fixture(scope="module")
def pair(pair_factory):
    sft, aligned = pair_factory("mid")  # ~19 MB: with 5 MiB parts, files of several parts
    return str(sft), str(aligned)


@pytest.fixture(scope="module")
def baseline(pair, local_ray, tmp_path_factory):
    """Local-disk merges of the pair: one alpha, and a sweep (same output shard size)."""
    d = tmp_path_factory.mktemp("s3base")
    one = str(d / "one")
    run(MergeSpec(sft=pair[0], aligned=pair[1], alpha=0.3, out=one, max_shard_size=SHARD), progress=False)
    sweep = str(d / "sweep")
    run(MergeSpec(sft=pair[0], aligned=pair[1], alpha=[0.1, 0.5], out=sweep, max_shard_size=SHARD), progress=False)
    return one, sweep


def test_merge_to_s3_is_byte_identical_and_loads(s3env, pair, baseline, local_ray, tmp_path):
    srv = s3env
    b = bucket(srv)
    c = srv.client()
    res = run(MergeSpec(sft=pair[0], aligned=pair[1], alpha=0.3, out=f"s3://{b}/models/expo", max_shard_size=SHARD),
              progress=False)
    assert res["settings"]["max_task_bytes"] == 64 * MIB  # the s3:// default part size
    assert uploads(c, b) == []  # every multipart upload completed
    names = download_prefix(c, b, "models/expo", str(tmp_path / "dl"))
    assert not any(n.startswith(".expo") for n in names)  # the run's records are gone
    mans = assert_same_output(str(tmp_path / "dl"), baseline[0])
    files = mans["expo_manifest.json"]["files"]
    assert len(files) == 3
    for f, rec in files.items():  # the checksum S3 itself computed from the parts' verified CRC-32s
        head = c.head_object(Bucket=b, Key=f"models/expo/{f}", ChecksumMode="ENABLED")
        assert head.get("ChecksumCRC32", rec["s3_checksum_crc32"]) == rec["s3_checksum_crc32"]
    assert_exact(str(tmp_path / "dl"), pair[0], pair[1], 0.3, False)

    import torch
    from transformers import AutoModelForCausalLM

    ids = torch.tensor([[1, 5, 9, 200, 17, 3]])
    with torch.no_grad():
        got = AutoModelForCausalLM.from_pretrained(str(tmp_path / "dl")).eval()(ids).logits
        want = AutoModelForCausalLM.from_pretrained(baseline[0]).eval()(ids).logits
    assert torch.equal(got, want)


def test_sweep_from_s3_inputs_to_s3(s3env, pair, baseline, local_ray, tmp_path):
    """Inputs read with ranged GETs from the bucket, two alphas written in one pass: nothing on local disk."""
    srv = s3env
    b = bucket(srv)
    c = srv.client()
    for who, folder in (("sft", pair[0]), ("aligned", pair[1])):
        for n in os.listdir(folder):
            c.upload_file(os.path.join(folder, n), b, f"in/{who}/{n}")
    res = run(MergeSpec(sft=f"s3://{b}/in/sft", aligned=f"s3://{b}/in/aligned", alpha=[0.1, 0.5],
                        out=f"s3://{b}/out", max_shard_size=SHARD, max_task_bytes=5 * MIB), progress=False)
    assert res["inputs"]["aligned"] == {"url": f"s3://{b}/in/aligned"}
    assert uploads(c, b) == []
    download_prefix(c, b, "out", str(tmp_path / "dl"))
    mans = assert_same_output(str(tmp_path / "dl"), baseline[1], same_inputs=False)
    assert f"s3://{b}/in/aligned" in (tmp_path / "dl" / "alpha-0.1" / "README.md").read_text()
    assert sorted(mans) == ["alpha-0.1/expo_manifest.json", "alpha-0.5/expo_manifest.json"]
    assert mans["alpha-0.1/expo_manifest.json"]["tasks"] > 3  # several 5 MiB parts per file


def test_failed_merge_aborts_its_uploads(srv, pair, tmp_path):
    """A task that fails every attempt: the merge fails, says so, aborts every upload and leaves nothing."""
    b = bucket(srv)
    c = srv.client()
    faults = tmp_path / "faults.json"
    faults.write_text(json.dumps({"crash": [1]}))
    env = {**os.environ, **srv.env(), **faulthooks.env(faults=faults)}
    env.pop("RAY_ADDRESS", None)
    r = cli(["merge", "--sft", pair[0], "--aligned", pair[1], "--alpha", "0.3", "--out", f"s3://{b}/x",
             "--max-shard-size", str(SHARD), "--max-task-bytes", "5MiB", "--max-attempts", "2", "-q"], env)
    assert r.returncode == 1, r.stderr
    assert "task 1" in r.stderr and "aborted 3 multipart uploads" in r.stderr, r.stderr
    assert uploads(c, b) == []
    assert c.list_objects_v2(Bucket=b).get("KeyCount", 0) == 0


def cli(args: list[str], env: dict, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "expo_dist.cli", *args], env=env, capture_output=True, text=True,
                          timeout=timeout)


def start_and_kill(srv, pair, b: str, prefix: str) -> tuple[list[str], dict]:
    """Start a merge to s3://b/prefix in a subprocess and SIGKILL it once a journal batch is under the prefix;
    (its arguments, its environment without the test hooks)."""
    c = srv.client()
    env = {**os.environ, **srv.env(), **faulthooks.env(delay=0.5)}
    env.pop("RAY_ADDRESS", None)
    args = ["merge", "--sft", pair[0], "--aligned", pair[1], "--alpha", "0.3", "--out", f"s3://{b}/{prefix}",
            "--max-shard-size", str(SHARD), "--max-task-bytes", "5MiB", "--workers", "2", "-q"]
    p = subprocess.Popen([sys.executable, "-m", "expo_dist.cli", *args], env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:  # until a journal batch is under the prefix
        if c.list_objects_v2(Bucket=b, Prefix=f"{prefix}/.expo/journal/").get("KeyCount", 0):
            break
        time.sleep(0.2)
    else:
        p.kill()
        pytest.fail("no journal written in 120 s: " + p.stderr.read().decode()[-2000:])
    os.killpg(p.pid, signal.SIGKILL)
    p.wait()
    assert uploads(c, b)  # left open for the rerun
    return args, {k: v for k, v in env.items() if k not in faulthooks.env(delay=0)}


def test_driver_killed_then_rerun_resumes(srv, pair, baseline, tmp_path):
    """SIGKILL the driver mid-merge; the rerun keeps the parts already uploaded and journaled, ends byte-identical,
    and no upload is left open."""
    b = bucket(srv)
    c = srv.client()
    args, env = start_and_kill(srv, pair, b, "resume")
    r = cli([*args[:-1], "--json", "-q"], env)
    assert r.returncode == 0, r.stderr
    man = json.loads(r.stdout)
    assert man["tasks_resumed"] > 0
    assert uploads(c, b) == []
    download_prefix(c, b, "resume", str(tmp_path / "dl"))
    assert_same_output(str(tmp_path / "dl"), baseline[0])


def test_other_merge_refused_then_overwrite_aborts_it(srv, pair, baseline, tmp_path):
    """A prefix holding another (unfinished) merge is refused without --overwrite, untouched; with it, that merge's
    multipart uploads are aborted (and said), and the new merge is exact."""
    b = bucket(srv)
    c = srv.client()
    args, env = start_and_kill(srv, pair, b, "other")
    def keys():  # (the killed driver's lock aside: the refused run takes it over, a dead pid's, and frees it)
        return sorted(o["Key"] for o in c.list_objects_v2(Bucket=b)["Contents"] if o["Key"] != "other/.expo/lock")

    before = keys()
    open_before = sorted(u["UploadId"] for u in uploads(c, b))
    other = [a if a != "0.3" else "0.5" for a in args]
    r = cli(other, env)
    assert r.returncode == 2 and "holds an unfinished merge of different inputs or settings" in r.stderr, r.stderr
    assert keys() == before
    assert sorted(u["UploadId"] for u in uploads(c, b)) == open_before
    r = cli([*other, "--overwrite"], env)
    assert r.returncode == 0, r.stderr
    assert f"aborted {len(open_before)} multipart uploads" in r.stderr, r.stderr
    assert uploads(c, b) == []
    download_prefix(c, b, "other", str(tmp_path / "dl"))
    want = os.path.join(baseline[1], "alpha-0.5")  # the sweep's alpha 0.5: the same weights
    for name in os.listdir(want):
        if name.endswith(".safetensors") or name == "model.safetensors.index.json":
            assert (tmp_path / "dl" / name).read_bytes() == open(os.path.join(want, name), "rb").read(), name


def test_input_rewritten_mid_merge_fails_with_one_line(srv, pair, tmp_path):
    """Every ranged GET of an s3:// input asks for the object the plan was made from (If-Match its ETag): an input
    rewritten during the merge stops it with one line naming it, instead of mixing two versions' bytes."""
    b = bucket(srv)
    c = srv.client()
    for who, folder in (("sft", pair[0]), ("aligned", pair[1])):
        for n in os.listdir(folder):
            c.upload_file(os.path.join(folder, n), b, f"in/{who}/{n}")
    weights = sorted(n for n in os.listdir(pair[1]) if n.endswith(".safetensors"))
    env = {**os.environ, **srv.env(), **faulthooks.env(delay=1.0)}
    env.pop("RAY_ADDRESS", None)
    out = tmp_path / "out"
    p = subprocess.Popen([sys.executable, "-m", "expo_dist.cli", "merge", "--sft", f"s3://{b}/in/sft", "--aligned",
                          f"s3://{b}/in/aligned", "--alpha", "0.3", "--out", str(out), "--max-task-bytes", "1MiB",
                          "--workers", "1", "-q"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    journal = out / ".expo" / "journal.jsonl"
    deadline = time.monotonic() + 120
    while not (journal.exists() and journal.read_text().strip()):
        assert time.monotonic() < deadline and p.poll() is None, "the merge did not start"
        time.sleep(0.1)
    for n in weights:  # same size, other bytes: every remaining read must notice
        data = bytearray(open(os.path.join(pair[1], n), "rb").read())
        data[-1] ^= 0xFF
        c.put_object(Bucket=b, Key=f"in/aligned/{n}", Body=bytes(data))
    _, err = p.communicate(timeout=300)
    assert p.returncode == 1, err
    lines = [ln for ln in err.splitlines() if ln.startswith("expo-dist: error:")]
    assert len(lines) == 1 and "the object changed during the merge" in lines[0], err
    assert f"s3://{b}/in/aligned/" in lines[0]
    assert not (out / "expo_manifest.json").exists()


BAD = [
    ("no credentials", {"AWS_ACCESS_KEY_ID": None, "AWS_SECRET_ACCESS_KEY": None}, "no S3 credentials"),
    ("wrong secret", {"AWS_SECRET_ACCESS_KEY": "wrong"}, "403 Forbidden"),
    ("read-only keys", "reader", "access denied"),
    ("unreachable", {"AWS_ENDPOINT_URL": "http://127.0.0.1:9"}, "cannot reach the S3 endpoint"),
]


@pytest.mark.parametrize("what,change,line", BAD, ids=[b[0] for b in BAD])
def test_bad_credentials_and_endpoints_are_one_line(srv, pair, what, change, line, tmp_path):
    from s3server import READER

    b = bucket(srv)
    env = {**os.environ, **(srv.env(READER) if change == "reader" else srv.env())}
    if isinstance(change, dict):
        for k, v in change.items():
            if v is None:
                env.pop(k, None)
            else:
                env[k] = v
    env["HOME"] = str(tmp_path)  # no ~/.aws to fall back on
    env["AWS_MAX_ATTEMPTS"] = "1"
    r = cli(["merge", "--sft", pair[0], "--aligned", pair[1], "--alpha", "0.3", "--out", f"s3://{b}/o"], env)
    assert r.returncode == 2, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and line in lines[0], r.stderr
    assert "Traceback" not in r.stderr
    assert srv.client().list_objects_v2(Bucket=b).get("KeyCount", 0) == 0


def test_missing_bucket_bad_part_size_and_strangers(srv, pair, tmp_path):
    b = bucket(srv)
    c = srv.client()
    env = {**os.environ, **srv.env()}
    base = ["merge", "--sft", pair[0], "--aligned", pair[1], "--alpha", "0.3"]
    r = cli([*base, "--out", "s3://no-such-bucket-expo/o"], env)
    assert r.returncode == 2 and "bucket no-such-bucket-expo does not exist" in r.stderr, r.stderr
    r = cli([*base, "--out", f"s3://{b}/o", "--max-task-bytes", "2MiB"], env)
    assert r.returncode == 2 and "5 MiB to 5 GiB" in r.stderr, r.stderr
    c.put_object(Bucket=b, Key="o/notes.txt", Body=b"mine")
    r = cli([*base, "--out", f"s3://{b}/o"], env)
    assert r.returncode == 2 and "is not empty" in r.stderr, r.stderr
    r = cli([*base, "--out", f"s3://{b}/o", "--overwrite"], env)
    assert r.returncode == 2 and "did not write (notes.txt)" in r.stderr, r.stderr
    keys = [o["Key"] for o in c.list_objects_v2(Bucket=b)["Contents"]]
    assert keys == ["o/notes.txt"]  # untouched, nothing added
    assert c.get_object(Bucket=b, Key="o/notes.txt")["Body"].read() == b"mine"
    assert uploads(c, b) == []


def test_lock_and_overwrite_of_an_earlier_output(s3env, pair, local_ray):
    """A live lock refuses a second run; --overwrite replaces an earlier output (only its objects) once free."""
    srv = s3env
    b = bucket(srv)
    c = srv.client()
    out = f"s3://{b}/m"
    spec = dict(sft=pair[0], aligned=pair[1], out=out, max_shard_size=SHARD)
    run(MergeSpec(alpha=0.1, **spec), progress=False)
    c.put_object(Bucket=b, Key="m/.expo/lock", Body=json.dumps({"pid": 4242, "host": "elsewhere"}).encode())
    with pytest.raises(ExpoError, match="in use by pid 4242 on elsewhere"):
        run(MergeSpec(alpha=0.3, overwrite=True, **spec), progress=False)
    c.delete_object(Bucket=b, Key="m/.expo/lock")
    c.put_object(Bucket=b, Key="other/keep.txt", Body=b"not under the prefix")
    res = run(MergeSpec(alpha=0.3, overwrite=True, **spec), progress=False)
    assert res["alpha"] == 0.3
    man = json.loads(c.get_object(Bucket=b, Key="m/expo_manifest.json")["Body"].read())
    assert man["alpha"] == 0.3
    keys = sorted(o["Key"] for o in c.list_objects_v2(Bucket=b)["Contents"])
    assert "other/keep.txt" in keys and not any(k.startswith("m/.expo") for k in keys)
    assert uploads(c, b) == []
