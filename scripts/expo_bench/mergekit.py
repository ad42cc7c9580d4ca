"""Once-phase --compare-mergekit: mergekit task_arithmetic on the same pair, if mergekit-yaml is on PATH.

A once-phase is a module with NAME, add_arguments(group), wanted(args), run(bench, figures) -> dict (plain data,
stored as figures[NAME]), rows(data, figures) -> table lines and notes(data, figures) -> lines after the floor's;
cli.ONCE lists them in the order they run and print."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import time

from expo_dist.testing.measure import evict, nbytes, run_sampled, tree_weight_files
from expo_dist.testing.rss import fmt_bytes

from .context import Bench, log, remove
from .report import rate

NAME = "mergekit"


def add_arguments(g) -> None:
    g.add_argument("--compare-mergekit", action="store_true", help="also time mergekit-yaml task_arithmetic, if on PATH")
    g.add_argument("--mergekit-args", default="", help="extra arguments for mergekit-yaml, e.g. '--lazy-unpickle'")


def wanted(args) -> bool:
    return args.compare_mergekit


def config(sft: str, aligned: str, alpha: float, dtype: str) -> str:
    # task_arithmetic: base + sum w_i (m_i - base) = sft + (1+alpha)(aligned - sft) = aligned + alpha(aligned - sft)
    return f"""merge_method: task_arithmetic
base_model: {json.dumps(sft)}
models:
  - model: {json.dumps(aligned)}
    parameters:
      weight: {1 + alpha!r}
parameters:
  normalize: false
dtype: float32
out_dtype: {dtype}
"""


def run(b: Bench, fig: dict) -> dict:
    log("mergekit ...")
    exe = shutil.which("mergekit-yaml")
    if not exe:
        return {"status": "mergekit: not installed, skipped"}
    args, workdir = b.args, b.workdir
    cfg = os.path.join(workdir, "mergekit.yml")
    with open(cfg, "w") as f:
        f.write(config(b.pair.sft, b.pair.aligned, args.alpha, args.dtype))
    out = os.path.join(workdir, "mergekit-out")
    remove(out)
    b.cache.drop(b.pair.paths)
    r = run_sampled([exe, cfg, out, *shlex.split(args.mergekit_args)], os.environ.copy(),
                    os.path.join(workdir, "mergekit.log"), args.timeout)
    res = {"status": "ok" if r["rc"] == 0 else f"failed (exit {r['rc']})", "seconds": r["wall"], "rc": r["rc"],
           "out_bytes": nbytes(tree_weight_files(out)) if os.path.isdir(out) else 0,
           "peak_rss": max((p["peak_rss"] for p in r["rss"]["per_process"]), default=None),
           "tree_peak_total_rss": r["rss"]["tree_peak_total_rss"], "config": open(cfg).read()}
    if r["rc"]:
        res["stderr_tail"] = r["stderr_tail"][-1500:]
    else:
        # mergekit returns with its output still partly in dirty pages; expo_dist fsyncs before it writes the index.
        # Time the fsync of mergekit's files too, for a like-for-like "durable on disk" figure.
        t0 = time.perf_counter()
        for f in tree_weight_files(out):
            fd = os.open(f, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        res["fsync_seconds"] = time.perf_counter() - t0
    evict(out)
    remove(out)
    whole = fig["merge_whole"]["median"]
    if res.get("seconds") and res["rc"] == 0:
        res["ratio_over_expo_whole"] = res["seconds"] / whole
        res["durable_ratio_over_expo_whole"] = (res["seconds"] + res["fsync_seconds"]) / whole
    return res


def rows(mk: dict, fig: dict) -> list[str]:
    if mk.get("seconds") is None:
        return [mk["status"]]
    return [f"{'mergekit (1 run)':<22} {mk['seconds']:>9.2f}  {mk['status']:<26} "
            f"{rate((fig['in_bytes'] + mk['out_bytes']) / mk['seconds'] / 1e9):>6}  max {fmt_bytes(mk['peak_rss'])}"]


def notes(mk: dict, fig: dict) -> list[str]:
    if not mk.get("ratio_over_expo_whole"):
        return []
    return [f"mergekit / expo_dist whole: {mk['ratio_over_expo_whole']:.2f} (mergekit's own time, its output not yet "
            f"fsynced); {mk['durable_ratio_over_expo_whole']:.2f} counting the fsync of its files "
            f"({mk['fsync_seconds']:.2f} s) as expo_dist's time does"]
