"""The merge phase: `expo-dist merge ... --json -q` in a subprocess, timed whole and by its merge phase, with the
peak RSS of every process of its tree."""

from __future__ import annotations

import os
import shlex

from expo_dist.testing.measure import evict, merge_cli, run_merge
from expo_dist.testing.rss import fmt_bytes

from .context import Bench, log, remove


def failed(r: dict, what: str, who: str = "bench") -> SystemExit:
    """The exit for a merge subprocess that failed: its command line and the tail of its stderr."""
    return SystemExit(f"{who}: {what} failed (exit {r['rc']}): {' '.join(map(shlex.quote, r['cmd']))}\n"
                      f"{r['stderr_tail']}")


def command(b: Bench) -> str:
    """The merge's command line, as the report prints it (OUT for the output folder)."""
    return " ".join(map(shlex.quote, merge_cli() + ["merge", "--sft", b.pair.sft, "--aligned", b.pair.aligned,
                                                    "--alpha", repr(b.args.alpha), "--out", "OUT", "--json", "-q",
                                                    *b.extra]))


def run(b: Bench, i: int) -> dict:
    """Round i's merge (the page cache dropped first): seconds, output bytes, tasks, workers, sha256 and RSS."""
    out = os.path.join(b.workdir, f"out-{i}")
    b.cache.drop(b.pair.paths)
    r = run_merge(b.pair.sft, b.pair.aligned, ["--alpha", repr(b.args.alpha)], out, b.extra, b.env, b.args.timeout,
                  os.path.join(b.workdir, f"merge-{i}.log"))
    evict(out)
    remove(out)
    if r["rc"]:
        raise failed(r, "merge")
    if r["merge_seconds"] is None:
        log("merge printed no merge_seconds; the merge phase is not reported")
    files = (r["manifest"] or r["json"] or {}).get("files", {})
    res = {"whole_seconds": r["wall"], "merge_seconds": r["merge_seconds"], "out_bytes": r["out_bytes"],
           "tasks": (r["json"] or {}).get("tasks"),
           "workers": len((r["json"] or {}).get("workers") or []) or None,
           "sha256": {k: v.get("sha256") for k, v in files.items() if isinstance(v, dict)},
           "rss": r["rss"]}
    log(f"round {i + 1}/{b.repeat}: merge whole {r['wall']:.2f}s, merge phase "
        f"{r['merge_seconds'] if r['merge_seconds'] is not None else '?'}s, driver "
        f"{fmt_bytes(r['rss']['driver_peak_rss'])}, worker max {fmt_bytes(r['rss']['worker_peak_rss'])}")
    return res
