"""The pure parts of the s3:// output: part numbering from the plan's task grid, CRC-32 arithmetic, URLs, the upload
body. No server, no Ray."""

import base64
import random
import tempfile
import zlib

import pytest

from expo_dist.errors import ExpoError
from expo_dist.output.s3state import composite_crc32, crc32_combine, file_crc32
from expo_dist.planning.plan import MIB, task_step
from expo_dist.runtime.s3parts import ViewBody, crc_b64, part_span
from expo_dist.sources import s3


def test_crc32_combine_equals_crc_of_concatenation():
    rng = random.Random(7)
    for _ in range(200):
        a = rng.randbytes(rng.randrange(0, 3000))
        b = rng.randbytes(rng.randrange(0, 3000))
        assert crc32_combine(zlib.crc32(a), zlib.crc32(b), len(b)) == zlib.crc32(a + b)
    parts = [rng.randbytes(rng.randrange(1, 5000)) for _ in range(9)]
    assert file_crc32([(zlib.crc32(p), len(p)) for p in parts]) == zlib.crc32(b"".join(parts))
    big = bytes(5 << 20)  # a 5 MiB part: the combine handles lengths far past a table's reach
    assert crc32_combine(zlib.crc32(b"x"), zlib.crc32(big), len(big)) == zlib.crc32(b"x" + big)


def test_composite_checksum_is_crc_of_part_checksums():
    parts = [b"a" * 100, b"b" * 7]
    crcs = [zlib.crc32(p) for p in parts]
    want = base64.b64encode(zlib.crc32(b"".join(c.to_bytes(4, "big") for c in crcs)).to_bytes(4, "big")).decode()
    assert composite_crc32(crcs) == want + "-2"
    assert base64.b64decode(crc_b64(zlib.crc32(b"abc"))) == zlib.crc32(b"abc").to_bytes(4, "big")


@pytest.mark.parametrize("header_len,size,step_mib", [(100, 40 * MIB + 3, 8), (100, 8 * MIB, 8),
                                                      (9 * MIB + 5, 30 * MIB, 8), (8 * MIB, 20 * MIB, 8),
                                                      (4096, 5 * MIB - 1, 5)])
def test_parts_follow_the_task_grid(header_len, size, step_mib):
    """Every task of a file is one part: numbers 1..n in file order, part 1 from byte 0 (the header), every part but
    the last exactly one step long, and together they cover the file once."""
    step = task_step(step_mib * MIB)
    # the task boundaries cut_tasks makes for one file (its loop, over an empty tensor set)
    bounds, lo = [], header_len
    while lo < size:
        hi = min(size, (lo // step + 1) * step)
        bounds.append((lo, hi))
        lo = hi
    spans = [part_span(b, header_len, step) for b, _ in bounds]
    assert [n for n, _ in spans] == list(range(1, len(bounds) + 1))
    starts = [s for _, s in spans]
    assert starts[0] == 0 and starts[1:] == [b for b, _ in bounds[1:]]
    sizes = [e - s for (_, e), s in zip(bounds, starts)]
    assert sum(sizes) == size
    assert all(n == step for n in sizes[1:-1])
    if len(sizes) > 1:
        assert sizes[0] >= step  # (a header past one step makes part 1 longer, never shorter)


def test_part_grid_matches_cut_tasks():
    """part_span over the planner's own tasks (a real plan of a generated pair)."""
    from expo_dist.planning.plan import make_plan, tensor_sources
    from expo_dist.sources.index import index_model
    from expo_dist.testing.synth import make_pair

    with tempfile.TemporaryDirectory() as d:
        sft, aligned = make_pair(d, hidden_size=256, vocab_size=8192, aligned_shard_bytes=1_500_000)
        a, s_ = index_model(str(aligned)), index_model(str(sft))
        plan = make_plan(tensor_sources(s_), tensor_sources(a), alpha_for=lambda n: 0.3, sft_config=s_.config,
                         aligned_config=a.config, max_task_bytes=MIB, max_shard_size=1_500_000)
    step = task_step(MIB)
    for shard in plan.shards:
        tasks = sorted((t for t in plan.tasks if t.file == shard.file), key=lambda t: t.begin)
        nums = [part_span(t.begin, len(shard.layout.header), step)[0] for t in tasks]
        assert nums == list(range(1, len(tasks) + 1))
    assert len(plan.shards) > 1 and len(plan.tasks) > len(plan.shards)  # several files, and files of several parts


def test_urls():
    assert s3.split("s3://bucket/a/b") == ("bucket", "a/b")
    assert s3.split("s3://bucket") == ("bucket", "")
    assert s3.join("s3://b1x/p/", "x", "y") == "s3://b1x/p/x/y"
    for bad in ("s3://", "s3://ab/x", "s3://bucket/a/../b", "s3://bucket/a//b", "/local"):
        with pytest.raises(ExpoError):
            s3.split(bad)


def test_view_body_reads_seeks_and_rereads():
    data = bytes(range(256)) * 10
    body = ViewBody(memoryview(bytearray(data)))
    assert body.read(10) == data[:10]
    assert body.read() == data[10:]
    assert body.read(5) == b""
    body.seek(0)
    assert body.read() == data  # (botocore seeks back to retry a part)
    assert body.seek(0, 2) == len(data) and body.tell() == len(data)


def test_which_s3_failures_a_rerun_resumes():
    """Expired credentials and an unreachable store leave a merge's uploads for the rerun (s3writer.fail keeps
    them); a refusal such as access denied does not."""
    from botocore.exceptions import ClientError, EndpointConnectionError

    def client_error(code):
        return ClientError({"Error": {"Code": code, "Message": "m"}}, "UploadPart")

    expired = s3.s3_error(client_error("ExpiredToken"), "s3://bucket/x", "uploading")
    assert expired.resumable and "expired" in str(expired)
    down = s3.s3_error(EndpointConnectionError(endpoint_url="http://127.0.0.1:9"), "s3://bucket/x")
    assert down.resumable and "cannot reach" in str(down)
    denied = s3.s3_error(client_error("AccessDenied"), "s3://bucket/x", "writing")
    assert not denied.resumable and "access denied" in str(denied)
