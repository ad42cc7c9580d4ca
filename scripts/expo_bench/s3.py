"""Once-phase --s3: the merge to s3:// against a real S3 server on this machine (SeaweedFS on 127.0.0.1, its data in
the work folder), next to the floors it is judged by, the page cache dropped before each:

  read floor    reading both inputs (the rounds' io_floor read part, the faster of page cache and O_DIRECT;
                measured here when the rounds did not: --no-floor, --memory)
  upload floor  one multipart upload of the output's size with boto3, from memory: the merge's part size, as many
                parts in flight as the merge has workers, each part with its CRC-32 (as the workers upload)
  merge         `expo-dist merge ... --out s3://expo-bench/merge-I --json -q` in a subprocess, the peak RSS of
                every process of its tree sampled every 50 ms

Target (issue 12): merge <= 1.3 x (read floor + upload floor), every process <= 1 GiB RSS. The merged objects are
streamed back and their sha256 compared with the local merge's (the rounds'), so the figure is of a correct merge;
no multipart upload may be left open. --repeat rounds of upload floor + merge, median reported."""

from __future__ import annotations

import concurrent.futures as cf
import hashlib
import os
import statistics
import time
import zlib

from expo_dist.testing.measure import run_merge
from expo_dist.testing.rss import GiB, fmt_bytes

from . import floor
from .context import Bench, log
from .merge import failed
from .report import fmt_runs, gb, rate

NAME = "s3"
BUCKET = "expo-bench"
TARGET = 1.3


def add_arguments(g) -> None:
    g.add_argument("--s3", action="store_true",
                   help="also merge to s3:// on a local SeaweedFS (127.0.0.1, data in the workdir) and measure the "
                        "upload floor (boto3 multipart upload of the output's size, the merge's part size and "
                        "parts in flight); target merge <= 1.3 x (read floor + upload floor), every process <= 1 GiB "
                        "RSS; the objects are checked against the local merge's sha256")


def wanted(args) -> bool:
    return args.s3


def part_bytes(extra: list[str]) -> int:
    """The merge's part size: its task step (--max-task-bytes in --merge-args, else the s3:// default)."""
    from expo_dist.planning.plan import task_step
    from expo_dist.spec import s3_task_bytes
    from expo_dist.testing.synth import parse_size

    n = s3_task_bytes(1)
    for i, a in enumerate(extra):
        if a == "--max-task-bytes" and i + 1 < len(extra):
            n = parse_size(extra[i + 1])
        elif a.startswith("--max-task-bytes="):
            n = parse_size(a.split("=", 1)[1])
    return task_step(n)


def med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def read_floor(b: Bench, fig: dict) -> dict:
    """Seconds to read both inputs: the rounds' figure (the faster of page cache and O_DIRECT), or measured now."""
    have = [k for k in ("io_floor_cached", "io_floor_direct") if k in fig]
    if have:
        best = min(have, key=lambda k: med(fig[k]["read_runs"]))
        runs = fig[best]["read_runs"]
        return {"median": med(runs), "runs": runs, "how": f"rounds' {best} read part"}
    runs, path = {}, os.path.join(b.workdir, "readfloor.bin")
    for direct in (False, True):
        b.cache.drop(b.pair.paths)
        r = [floor.run(b.pair.sft_files, b.pair.aligned_files, 0, path, False, direct)["read_seconds"]
             for _ in range(b.repeat)]
        runs["direct" if direct else "cached"] = r
    best = min(runs, key=lambda k: med(runs[k]))
    return {"median": med(runs[best]), "runs": runs[best], "how": f"measured here ({best})"}


def upload_floor(client, key: str, size: int, part: int, inflight: int) -> float:
    """Seconds of one multipart upload of `size` bytes (random, from memory): parts of `part` bytes, `inflight`
    at once, each with its CRC-32 computed in the timed part (as a worker does), then completed."""
    from expo_dist.runtime.s3parts import ViewBody, crc_b64

    block = memoryview(os.urandom(part))  # not zeros: no store may compress them away
    count = max(1, -(-size // part))

    def one(number: int, upload: str) -> dict:
        n = min(part, size - (number - 1) * part)
        crc = crc_b64(zlib.crc32(block[:n]))
        r = client.upload_part(Bucket=BUCKET, Key=key, UploadId=upload, PartNumber=number, Body=ViewBody(block[:n]),
                               ContentLength=n, ChecksumCRC32=crc)
        return {"PartNumber": number, "ETag": r["ETag"], "ChecksumCRC32": crc}

    t0 = time.perf_counter()
    upload = client.create_multipart_upload(Bucket=BUCKET, Key=key, ChecksumAlgorithm="CRC32")["UploadId"]
    try:
        with cf.ThreadPoolExecutor(inflight) as pool:
            parts = list(pool.map(lambda k: one(k, upload), range(1, count + 1)))
        client.complete_multipart_upload(Bucket=BUCKET, Key=key, UploadId=upload, MultipartUpload={"Parts": parts})
    except BaseException:
        client.abort_multipart_upload(Bucket=BUCKET, Key=key, UploadId=upload)
        raise
    dt = time.perf_counter() - t0
    client.delete_object(Bucket=BUCKET, Key=key)
    return dt


def objects(client, prefix: str) -> dict[str, int]:
    """Every object under prefix/: relative name -> size."""
    out = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix + "/"):
        for o in page.get("Contents", ()):
            out[o["Key"][len(prefix) + 1:]] = o["Size"]
    return out


def sha256_object(client, key: str) -> str:
    h = hashlib.sha256()
    for chunk in client.get_object(Bucket=BUCKET, Key=key)["Body"].iter_chunks(8 << 20):
        h.update(chunk)
    return h.hexdigest()


def check(client, prefix: str, local: dict) -> dict:
    """The merged weight files streamed back from the bucket, their sha256 against the local merge's manifest."""
    names = objects(client, prefix)
    weights = sorted(n for n in names if n.endswith(".safetensors"))
    want = {n: h for n, h in (local or {}).items() if n.endswith(".safetensors") and h}
    got = {n: sha256_object(client, f"{prefix}/{n}") for n in weights}
    open_uploads = len(client.list_multipart_uploads(Bucket=BUCKET).get("Uploads", []))
    return {"out_bytes": sum(names[n] for n in weights), "objects": len(names), "weight_files": len(weights),
            "identical": bool(want) and got == want, "compared": len(want), "open_uploads": open_uploads,
            "mismatch": sorted(set(got) ^ set(want) | {n for n in got if n in want and got[n] != want[n]})}


def merge_round(b: Bench, srv, client, i: int, local: dict) -> dict:
    prefix = f"merge-{i}"
    b.cache.drop(b.pair.paths)
    r = run_merge(b.pair.sft, b.pair.aligned, ["--alpha", repr(b.args.alpha)], f"s3://{BUCKET}/{prefix}", b.extra,
                  {**b.env, **srv.env()}, b.args.timeout, os.path.join(b.workdir, f"s3-merge-{i}.log"))
    if r["rc"]:
        raise failed(r, "merge to s3://")
    js = r["json"] or {}
    res = {"whole_seconds": r["wall"], "merge_seconds": r["merge_seconds"], "tasks": js.get("tasks"),
           "workers": len(js.get("workers") or []) or None, "rss": r["rss"], **check(client, prefix, local)}
    for key in objects(client, prefix):
        client.delete_object(Bucket=BUCKET, Key=f"{prefix}/{key}")
    return res


def run(b: Bench, fig: dict) -> dict:
    from expo_dist.testing.s3server import weed_server

    log("s3: starting SeaweedFS on 127.0.0.1 ...")
    part, workers = part_bytes(b.extra), fig.get("workers") or fig["rss"]["workers"] or 1
    size = fig["out_bytes"]
    res: dict = {"part_bytes": part, "inflight": workers, "bucket": BUCKET, "loadavg_before": os.getloadavg()[0]}
    t0 = time.perf_counter()
    with weed_server(os.path.join(b.workdir, "weed")) as srv:
        import boto3
        from botocore.config import Config

        res["server_start_seconds"] = time.perf_counter() - t0
        env = srv.env()
        client = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
                              aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"], region_name="us-east-1",
                              config=Config(max_pool_connections=max(10, workers), retries={"mode": "standard"}))
        client.create_bucket(Bucket=BUCKET)
        res["read_floor"] = read_floor(b, fig)
        ups, merges = [], []
        for i in range(b.repeat):
            b.cache.drop(b.pair.paths)
            ups.append(upload_floor(client, f"floor-{i}.bin", size, part, workers))
            log(f"s3 round {i + 1}/{b.repeat}: upload floor {ups[-1]:.2f}s ({size / ups[-1] / 1e9:.2f} GB/s, "
                f"{fmt_bytes(part)} parts, {workers} in flight)")
            m = merge_round(b, srv, client, i, fig.get("sha256"))
            merges.append(m)
            log(f"s3 round {i + 1}/{b.repeat}: merge whole {m['whole_seconds']:.2f}s, merge phase "
                f"{m['merge_seconds']}s, identical to the local merge: {m['identical']}, max RSS "
                f"{fmt_bytes(max(p['peak_rss'] for p in m['rss']['per_process']))}")
    rd, up = res["read_floor"]["median"], med(ups)
    whole, phase = [m["whole_seconds"] for m in merges], [m["merge_seconds"] for m in merges]
    moved = fig["in_bytes"] + merges[-1]["out_bytes"]
    worst = max(merges, key=lambda m: max(p["peak_rss"] for p in m["rss"]["per_process"]))
    top = max(worst["rss"]["per_process"], key=lambda p: p["peak_rss"])
    limit = TARGET * (rd + up)
    res.update({
        "upload_floor": {"median": up, "runs": ups, "gbps": size / up / 1e9},
        "floor_sum": rd + up,
        "merge_whole": {"median": med(whole), "runs": whole, "gbps": moved / med(whole) / 1e9},
        "merge_phase": {"median": med(phase), "runs": phase, "gbps": moved / med(phase) / 1e9 if med(phase) else None},
        "ratio_phase": med(phase) / (rd + up) if med(phase) else None, "ratio_whole": med(whole) / (rd + up),
        "limit": limit, "pass": med(phase) is not None and med(phase) <= limit,
        "merge_workers": [m["workers"] for m in merges], "tasks": merges[-1]["tasks"],
        "out_bytes": merges[-1]["out_bytes"], "objects": merges[-1]["objects"],
        "identical": all(m["identical"] for m in merges), "compared": merges[-1]["compared"],
        "mismatch": sorted({n for m in merges for n in m["mismatch"]}),
        "open_uploads": max(m["open_uploads"] for m in merges),
        "driver_peak_rss": worst["rss"]["driver_peak_rss"], "worker_peak_rss": worst["rss"]["worker_peak_rss"],
        "max_rss": top["peak_rss"], "max_rss_process": f"{top['role']} pid {top['pid']}",
        "over_1gib": [f"{p['role']} pid {p['pid']} {fmt_bytes(p['peak_rss'])}"
                      for m in merges for p in m["rss"]["per_process"] if p["peak_rss"] > GiB],
        "rss": {k: v for k, v in worst["rss"].items() if k != "over_limit"}})
    return res


def rows(s: dict, fig: dict) -> list[str]:
    def row(name, d, gbps, note=""):
        return (f"{name:<22} {d['median'] if d['median'] is not None else float('nan'):>9.2f}  "
                f"{fmt_runs(d['runs']):<26} {rate(gbps):>6}  {note}")

    rf = s["read_floor"]
    return [row("s3 read floor", rf, fig["in_bytes"] / rf["median"] / 1e9, f"({rf['how']})"),
            row("s3 upload floor", s["upload_floor"], s["upload_floor"]["gbps"],
                f"({fmt_bytes(s['part_bytes'])} parts, {s['inflight']} in flight)"),
            row("s3 merge whole", s["merge_whole"], s["merge_whole"]["gbps"],
                f"driver {fmt_bytes(s['driver_peak_rss'])}, worker max {fmt_bytes(s['worker_peak_rss'])}, "
                f"any process max {fmt_bytes(s['max_rss'])}"),
            row("s3 merge phase", s["merge_phase"], s["merge_phase"]["gbps"])]


def notes(s: dict, fig: dict) -> list[str]:
    c = s["ratio_phase"]
    return [
        f"s3: SeaweedFS on 127.0.0.1 (data in the workdir), bucket {s['bucket']}; output {gb(s['out_bytes'])} in "
        f"{s['objects']} objects, {s['tasks']} tasks = parts of {fmt_bytes(s['part_bytes'])}, merge workers "
        f"{'/'.join(str(w) for w in s['merge_workers'])}, upload floor {s['inflight']} parts in flight; load average "
        f"{s['loadavg_before']:.1f} before the phase",
        f"s3 criterion merge phase <= {TARGET} x (read floor + upload floor): {s['merge_phase']['median']:.2f} <= "
        f"{TARGET} x ({s['read_floor']['median']:.2f} + {s['upload_floor']['median']:.2f}) = {s['limit']:.2f}: "
        f"{'PASS' if s['pass'] else 'FAIL'} (ratio {c:.2f}; whole/floors {s['ratio_whole']:.2f})"
        if c is not None else "s3: the merge printed no merge_seconds",
        f"s3 memory: every process of the merge's tree <= 1 GiB RSS: max {fmt_bytes(s['max_rss'])} "
        f"({s['max_rss_process']}): {'PASS' if not s['over_1gib'] else 'FAIL: ' + ', '.join(s['over_1gib'])}",
        f"s3 output = the local merge's (sha256 of {s['compared']} weight files streamed from the bucket): "
        f"{'yes' if s['identical'] else 'NO ' + ', '.join(s['mismatch'])}; multipart uploads left open: "
        f"{s['open_uploads']}"]
