"""The benchmark's command line and its wiring: parse, set up the run, call the phases in order, print.

Phases return plain data; this module only passes it along. The once-phases run after the rounds, each with its
own flags, figures key, table rows and notes (the interface: see mergekit.py); adding one is a module in this
package and one entry in ONCE."""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import sys

from expo_dist.runtime.fileio import fs_type
from expo_dist.testing.measure import Cache, child_env, machine

from . import __doc__ as DOC
from . import merge, mergekit, pair, report, rounds, s3, sweep
from .context import ROOT, Bench, log, make_workdir

MEMORY_TASK_BYTES = "64MiB"
ONCE = [mergekit, sweep, s3]  # once-phases, in the order they run and print


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bench.py", description=DOC, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("the pair")
    g.add_argument("--pair", help="folder with sft/ and aligned/ to reuse (generated there, and kept, if missing)")
    g.add_argument("--preset", choices=["mistral7b", "tiny"], default="mistral7b",
                   help="shapes: mistral7b (Mistral-7B, 8 layers unless --layers; default) or tiny")
    g.add_argument("--layers", type=int, dest="num_layers")
    g.add_argument("--hidden-size", type=int, dest="hidden_size")
    g.add_argument("--intermediate-size", type=int, dest="intermediate_size")
    g.add_argument("--heads", type=int, dest="num_heads")
    g.add_argument("--kv-heads", type=int, dest="num_kv_heads")
    g.add_argument("--vocab", type=int, dest="vocab_size")
    g.add_argument("--tie", action="store_true", help="tied embeddings (no lm_head.weight)")
    g.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    g.add_argument("--shard-bytes", default="1GB,700MB",
                   help="input shard sizes SFT[,ALIGNED] (default 1GB,700MB so boundaries differ; 'none': one file)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--workdir", help="where pairs and outputs go (default: a new temp folder under /var/tmp)")
    g.add_argument("--keep", action="store_true", help="keep the generated pair (its path is printed)")
    m = p.add_argument_group("what to measure")
    m.add_argument("--repeat", type=int, default=None, help="rounds of ray_startup + io_floor + merge (default 3; "
                   "1 with --memory)")
    m.add_argument("--alpha", type=float, default=0.3)
    m.add_argument("--merge-args", default="", help="extra arguments for expo-dist merge, e.g. '--workers 2'")
    m.add_argument("--floor-overlap", action="store_true", help="io_floor writes while it reads")
    m.add_argument("--no-floor", action="store_true", help="skip ray_startup and io_floor")
    m.add_argument("--no-drop-caches", action="store_true", help="only evict the benchmark's files (fadvise)")
    m.add_argument("--memory", action="store_true",
                   help=f"memory criterion: a pair whose largest tensor is 1 GiB, merged with --max-task-bytes "
                        f"{MEMORY_TASK_BYTES}; PASS if the driver and every worker stay under 1 GiB RSS")
    m.add_argument("--timeout", type=float, default=3600, help="seconds per merge before it is stopped")
    m.add_argument("--src", help="run the merges with the expo_dist package of this checkout (default: this one)")
    for phase in ONCE:
        phase.add_arguments(m)
    p.add_argument("--json", dest="json_file", help="write all figures to this file")
    return p


def setup(args) -> Bench:
    """The run's settings and its work folder (made here; pair.cleanup removes it)."""
    src = os.path.abspath(args.src) if args.src else ROOT  # the expo_dist checkout the merges run
    if args.src and not os.path.isfile(os.path.join(src, "expo_dist", "cli.py")):
        raise SystemExit(f"bench: --src {args.src} has no expo_dist/cli.py")
    repeat = args.repeat if args.repeat is not None else (1 if args.memory else 3)
    if repeat < 1:
        raise SystemExit("bench: --repeat must be ≥ 1")
    extra = shlex.split(args.merge_args)
    if args.memory and "--max-task-bytes" not in extra:
        extra += ["--max-task-bytes", MEMORY_TASK_BYTES]
    env = child_env(extra, src)
    workdir = make_workdir("expo-bench-", args.workdir)
    typ = fs_type(os.path.realpath(workdir)) or "?"
    log(f"workdir {workdir} ({typ})")
    if typ in ("tmpfs", "ramfs"):
        log(f"WARNING: {workdir} is on {typ}: I/O figures measure RAM, not a disk; pass --workdir on a disk")
    return Bench(args=args, src=src, workdir=workdir, workdir_fs=typ, env=env, extra=extra,
                 cache=Cache(enabled=not args.no_drop_caches), repeat=repeat)


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    b = setup(args)
    results: dict = {"when": datetime.datetime.now().isoformat(timespec="seconds"), "machine": machine(b.src),
                     "argv": sys.argv[1:] if argv is None else list(argv), "workdir_fs": b.workdir_fs, "src": b.src}
    try:
        pair.check_disk(b)
        b.pair = pair.run(b)
        results["pair"] = b.pair.desc
        results["merge_command"] = merge.command(b)
        results["rounds"] = rounds.run(b)
        fig, worst_rss = rounds.summarize(b, results["rounds"])
        for phase in ONCE:
            if phase.wanted(args):
                fig[phase.NAME] = phase.run(b, fig)
        fig["page_cache"] = b.cache.status()
        results["figures"] = fig
        report.print_report(args, results, worst_rss, b.repeat, ONCE)
        if args.json_file:
            with open(args.json_file, "w") as f:
                json.dump(results, f, indent=2, default=str)
            log(f"figures written to {args.json_file}")
        return 0 if not args.memory or fig["memory"]["pass"] else 1
    finally:
        pair.cleanup(b)
