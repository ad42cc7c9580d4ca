"""The repeated phases: each round measures ray_startup and the I/O floor (unless --no-floor or --memory), then
the merge, the page cache dropped before each; summarize() turns the rounds into the figures."""

from __future__ import annotations

import json
import os
import statistics

from expo_dist.testing.rss import GiB, fmt_bytes

from . import floor, merge, raystart
from .context import Bench, log
from .pair import largest_tensor


def med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def run_round(b: Bench, i: int) -> dict:
    """One round: {"ray_startup": s, "io_floor": {...}, "io_floor_direct": {...}, "merge": {...}}."""
    rd: dict = {}
    p = b.pair
    if b.floor:
        b.cache.drop(p.paths)
        rd["ray_startup"] = raystart.run(b.env)
        path = os.path.join(b.workdir, "floor.bin")
        b.cache.drop(p.paths)
        rd["io_floor"] = floor.run(p.sft_files, p.aligned_files, p.out_guess, path, b.args.floor_overlap)
        b.cache.drop(p.paths)
        rd["io_floor_direct"] = floor.run(p.sft_files, p.aligned_files, p.out_guess, path, b.args.floor_overlap, True)
        log(f"round {i + 1}/{b.repeat}: ray start-up {rd['ray_startup']:.2f}s, io floor "
            f"{rd['io_floor']['seconds']:.2f}s (page cache), {rd['io_floor_direct']['seconds']:.2f}s (direct)")
    rd["merge"] = merge.run(b, i)
    return rd


def run(b: Bench) -> list[dict]:
    return [run_round(b, i) for i in range(b.repeat)]


def summarize(b: Bench, rounds: list[dict]) -> tuple[dict, dict]:
    """(figures, worst): the rounds' medians, GB/s, the floor, ratios, the criterion, RSS and the memory criterion;
    and the RSS summary of the round with the largest worker peak (the report's per-process table)."""
    in_bytes = b.pair.in_bytes
    out_bytes = rounds[-1]["merge"]["out_bytes"]
    whole = [rd["merge"]["whole_seconds"] for rd in rounds]
    mphase = [rd["merge"]["merge_seconds"] for rd in rounds]
    fig: dict = {"in_bytes": in_bytes, "out_bytes": out_bytes,
                 "merge_whole": {"median": med(whole), "runs": whole,
                                 "gbps": (in_bytes + out_bytes) / med(whole) / 1e9},
                 "merge_phase": {"median": med(mphase), "runs": mphase,
                                 "gbps": (in_bytes + out_bytes) / med(mphase) / 1e9 if med(mphase) else None}}
    if b.floor:
        rs = [rd["ray_startup"] for rd in rounds]
        fig["ray_startup"] = {"median": med(rs), "runs": rs}
        for key, how in (("io_floor_cached", "io_floor"), ("io_floor_direct", "io_floor_direct")):
            fl = [rd[how]["seconds"] for rd in rounds]
            fb = rounds[0][how]["bytes_read"] + rounds[0][how]["bytes_written"]
            fig[key] = {"median": med(fl), "runs": fl, "gbps": fb / med(fl) / 1e9, "bytes": fb,
                        "read_runs": [rd[how]["read_seconds"] for rd in rounds],
                        "write_runs": [rd[how]["write_seconds"] for rd in rounds],
                        "overlap": b.args.floor_overlap, "how": how}
        # the floor is the faster way of moving those bytes on this machine: the hardware's limit as reached
        fig["io_floor"] = min(fig["io_floor_cached"], fig["io_floor_direct"], key=lambda d: d["median"])
        f, w, m_, s = fig["io_floor"]["median"], med(whole), med(mphase), med(rs)
        fig["ratios"] = {"merge_over_floor": m_ / f if m_ else None, "whole_over_floor": w / f}
        limit = f + s + 5.0
        fig["criterion"] = {"text": "whole <= floor + ray_startup + 5 s", "whole": w, "limit": limit,
                            "pass": w <= limit}
    hashes = [json.dumps(rd["merge"]["sha256"], sort_keys=True) for rd in rounds]
    fig["identical_outputs_across_runs"] = len(set(hashes)) == 1 if rounds[0]["merge"]["sha256"] else None
    fig["sha256"] = rounds[-1]["merge"]["sha256"]  # the local output's files, as its manifest has them (phase s3)
    fig["workers"] = rounds[-1]["merge"]["workers"]
    worst = max(rounds, key=lambda rd: (rd["merge"]["rss"]["worker_peak_rss"] or 0,
                                        rd["merge"]["rss"]["driver_peak_rss"] or 0))
    wr = worst["merge"]["rss"]
    fig["rss"] = {k: wr[k] for k in ("driver_peak_rss", "worker_peak_rss", "workers", "raylet_peak_rss",
                                     "gcs_peak_rss", "other_peak_rss", "tree_peak_total_rss")}
    fig["rss"]["over_1gib"] = [f"{p['role']} pid {p['pid']} {fmt_bytes(p['peak_rss'])}"
                               for rd in rounds for p in rd["merge"]["rss"]["over_limit"]]
    if b.args.memory:
        fig["memory"] = memory_criterion(b, rounds)
    return fig, wr


def memory_criterion(b: Bench, rounds: list[dict]) -> dict:
    """--memory: PASS if the driver and every MergeWorker stayed under 1 GiB RSS on a pair of 1 GiB tensors."""
    dw = [rd["merge"]["rss"] for rd in rounds]
    top = max([s["driver_peak_rss"] or 0 for s in dw] + [s["worker_peak_rss"] or 0 for s in dw])
    every = max(pp["peak_rss"] for s in dw for pp in s["per_process"])
    return {"largest_tensor_bytes": largest_tensor(b.pair.aligned),
            "max_task_bytes": b.extra[b.extra.index("--max-task-bytes") + 1],
            "driver_and_workers_max_rss": top, "all_processes_max_rss": every,
            "pass": top < GiB and all(s["workers"] for s in dw)}
