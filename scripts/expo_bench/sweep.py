"""Once-phase --sweep: one merge of several alphas (one read of the inputs, one output folder per alpha), timed
against the rounds' single merge. The once-phase interface: see mergekit.py."""

from __future__ import annotations

import os
import shlex
import subprocess

from expo_dist.formats.folder import MANIFEST
from expo_dist.testing.measure import evict, merge_cli, run_merge
from expo_dist.testing.rss import fmt_bytes

from .context import Bench, log, remove
from .report import rate

NAME = "sweep"


def add_arguments(g) -> None:
    g.add_argument("--sweep", help='several alphas, e.g. "0.1 0.3 0.5": time one sweep merge, if the CLI takes it')
    g.add_argument("--sweep-args", help="how to pass the sweep's alphas, e.g. '--alpha {csv}' or '--alphas {list}' "
                   "(default: tried in turn)")


def wanted(args) -> bool:
    return bool(args.sweep)


def forms(alphas: list[str], help_text: str, template: str | None) -> list[list[str]]:
    """Ways to pass several alphas: '{csv}' -> one word '0.1,0.3,0.5', '{list}' -> one word per alpha."""
    def fill(t: str) -> list[str]:
        words = []
        for w in shlex.split(t):
            words += list(alphas) if w == "{list}" else [w.replace("{csv}", ",".join(alphas))]
        return words

    if template:
        return [fill(template)]
    ways = ["--alpha {csv}", "--alpha {list}"]
    for flag in ("--alphas", "--sweep"):
        if flag in help_text:
            ways = [f"{flag} {{csv}}", f"{flag} {{list}}"] + ways
    return [fill(t) for t in ways]


def run(b: Bench, fig: dict) -> dict:
    args, workdir = b.args, b.workdir
    log(f"sweep {args.sweep} ...")
    single_whole, single_merge = fig["merge_whole"]["median"], fig["merge_phase"]["median"]
    in_bytes = fig["in_bytes"]
    alphas = args.sweep.replace(",", " ").split()
    h = subprocess.run(merge_cli() + ["merge", "--help"], env=b.env, capture_output=True, text=True, cwd=workdir)
    tried = []
    for form in forms(alphas, h.stdout + h.stderr, args.sweep_args):
        out = os.path.join(workdir, "sweep-out")
        remove(out)
        b.cache.drop(b.pair.paths + [out])
        r = run_merge(b.pair.sft, b.pair.aligned, form, out, b.extra, b.env, args.timeout,
                      os.path.join(workdir, "sweep.log"))
        manifests = sum(1 for _, _, fs in os.walk(out) for f in fs if f == MANIFEST) if os.path.isdir(out) else 0
        evict(out)
        remove(out)
        tried.append(" ".join(form))
        if r["rc"] == 0:
            last = (r["stderr_tail"].strip().splitlines() or [""])[-1]
            res = {"status": "ok", "alphas": alphas, "form": " ".join(form), "seconds": r["wall"],
                   "outputs": manifests,
                   "merge_seconds": r["merge_seconds"], "out_bytes": r["out_bytes"],
                   "driver_peak_rss": r["rss"]["driver_peak_rss"], "worker_peak_rss": r["rss"]["worker_peak_rss"],
                   "vs_single_whole": r["wall"] / single_whole if single_whole else None,
                   "vs_n_singles_whole": r["wall"] / (len(alphas) * single_whole) if single_whole else None,
                   "gbps_whole": (in_bytes + r["out_bytes"]) / r["wall"] / 1e9}
            if r["merge_seconds"] and single_merge:
                res["vs_single_merge"] = r["merge_seconds"] / single_merge
            if last and "warn" in last.lower():
                res["last_stderr_line"] = last
            return res
        reason = (r["stderr_tail"].strip().splitlines() or ["?"])[-1]
        tried[-1] += f" -> exit {r['rc']}: {reason[:200]}"
    return {"status": "sweep: not supported by this build", "tried": tried}


def rows(sw: dict, fig: dict) -> list[str]:
    if sw["status"] != "ok":
        return [sw["status"]] + [f"  tried: {t}" for t in sw.get("tried", [])]
    return [f"{'sweep ' + ','.join(sw['alphas']):<22} {sw['seconds']:>9.2f}  {'1 run: ' + sw['form']:<26} "
            f"{rate(sw['gbps_whole']):>6}  driver {fmt_bytes(sw['driver_peak_rss'])}, "
            f"worker max {fmt_bytes(sw['worker_peak_rss'])}"]


def notes(sw: dict, fig: dict) -> list[str]:
    if sw["status"] != "ok":
        return []
    n = len(sw["alphas"])
    lines = [f"sweep of {n} ({sw['outputs']} output folders with a manifest): {sw['vs_single_whole']:.2f}x one "
             f"merge's whole time, {sw['vs_n_singles_whole']:.2f}x {n} separate merges"]
    if sw["outputs"] != n:
        lines.append(f"  NOTE: expected {n} outputs, found {sw['outputs']} manifests")
    return lines
