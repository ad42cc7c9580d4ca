"""The `expo-dist` command."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys

from ._version import __version__
from .errors import TERMINATED, ExpoError, Terminated


def _merge_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML file with the same fields as the flags (flags override it)")
    p.add_argument("--sft", help="the SFT model (the starting point of alignment): a folder, or a Hub repo id "
                                 "org/name[@revision]")
    p.add_argument("--aligned", help="the aligned (DPO/RLHF) model trained from the SFT model: a folder, or a Hub "
                                     "repo id org/name[@revision]")
    p.add_argument("--alpha", type=str, nargs="+", help="extrapolation strength, e.g. 0.3 (the paper used 0.1-0.5); "
                   "several values sweep: one output folder OUT/alpha-<value> each, from one read of the inputs")
    p.add_argument("--out", help="output folder (on a path every node sees)")
    p.add_argument("--address", help="join a Ray cluster: 'auto', HOST:PORT or ray://HOST:PORT "
                                     "(default: start Ray on this machine)")
    p.add_argument("--wait-nodes", type=int, metavar="N",
                   help="with --address: first wait until N Ray nodes are alive (e.g. a batch job's nodes still "
                        "running `ray start`); one error line and exit 2 after --wait-timeout")
    p.add_argument("--wait-timeout", metavar="SECONDS", help="how long --wait-nodes waits (default 300)")
    p.add_argument("--workers", type=int, help="at most this many worker actors (default: one per GPU, else per CPU)")
    p.add_argument("--max-task-bytes", help="output bytes per task, e.g. 256MiB (default 256MiB)")
    p.add_argument("--max-shard-size", help="output shard size, e.g. 5GB (default 5GB)")
    p.add_argument("--overwrite", action="store_true", default=None,
                   help="replace what is in --out (an unfinished merge of the same plan resumes without it)")
    p.add_argument("--max-attempts", type=int, help="runs of one task before the merge fails (default 4)")
    p.add_argument("--cache-dir", help="Hugging Face cache for Hub models, on every node (default: HF_HUB_CACHE, "
                                       "i.e. $HF_HOME/hub); workers fetch only the weight files they read into it")
    p.add_argument("--io", choices=("auto", "direct", "buffered"),
                   help="how workers read and write: direct (O_DIRECT: large transfers bypass the page cache), "
                        "buffered (through the page cache), or auto (default: direct on local ext4/xfs/btrfs, "
                        "buffered on network and parallel file systems)")
    p.add_argument("--device", choices=("auto", "cuda", "cpu"),
                   help="auto: a GPU per worker where the cluster has GPUs, else CPU; cpu: never use GPUs; "
                        "cuda: require GPUs")
    p.add_argument("--json", action="store_true", help="print a JSON summary on stdout")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    from .spec import fields_help

    p.formatter_class = argparse.RawDescriptionHelpFormatter  # keeps the field list's lines; flags as usual
    p.epilog = ("--config YAML keys (each flag above is its key with dashes and overrides the file), each checked "
                "against its type:\n" + fields_help())


def _spec(args):
    from .spec import build_spec

    overrides = {k: getattr(args, k) for k in ("sft", "aligned", "alpha", "out", "address", "wait_nodes",
                                               "wait_timeout", "workers",
                                               "max_task_bytes", "max_shard_size", "overwrite", "max_attempts",
                                               "cache_dir", "io", "device")}
    if overrides["alpha"] is not None and len(overrides["alpha"]) == 1:
        overrides["alpha"] = overrides["alpha"][0]
    return build_spec(args.config, overrides)


def cmd_merge(args) -> int:
    from .merge import run

    spec = _spec(args)
    manifest = run(spec, progress=not args.quiet)
    if args.json:
        print(json.dumps({"out": spec.out, "files": manifest["files"], "tasks": manifest["tasks"],
                          "tasks_resumed": manifest["tasks_resumed"], "workers": manifest["workers"],
                          "merge_seconds": manifest["merge_seconds"]}, indent=2))
    else:
        print(spec.out)
    return 0


def cmd_plan(args) -> int:
    from .merge import build_plan, settings_for
    from .planning.report import plan_report

    spec = _spec(args).validate(need_out=False)
    settings = settings_for(spec)
    plan, _, _ = build_plan(spec, settings)
    report = plan_report(plan, spec, settings.slots)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        from .planning.report import format_report

        print(format_report(report))
    return 0


def cmd_verify(args) -> int:
    from .settings import Settings
    from .verify.check import verify

    sft, aligned, alpha = args.sft, args.aligned, args.alpha
    if args.config:
        from .spec import load_config

        cfg = load_config(args.config)
        sft, aligned = sft or cfg.get("sft"), aligned or cfg.get("aligned")
        if alpha is None and not isinstance(cfg.get("alpha"), list):  # a sweep: each folder's manifest says
            alpha = cfg.get("alpha")
    report = verify(args.out, sft=sft, aligned=aligned, alpha=alpha, sample=None if args.full else args.sample,
                    seed=args.seed, verbose=args.verbose, hub_attempts=Settings.from_env().hub_attempts)
    print(report.verdict())
    return 0 if report.ok else 1


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="expo-dist", description="Exact, distributed ExPO model extrapolation "
                                     "(theta_aligned + alpha * (theta_aligned - theta_sft)) on Ray.")
    parser.add_argument("--version", action="version", version=f"expo-dist {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("merge", help="merge an SFT/aligned pair into an ExPO checkpoint")
    _merge_args(p)
    p.set_defaults(func=cmd_merge)
    p = sub.add_parser("plan", help="show what merge would do, reading only headers")
    _merge_args(p)
    p.set_defaults(func=cmd_plan)
    p = sub.add_parser("verify", help="check a merged folder or s3:// prefix: index, headers, sizes, checksums; "
                                      "with the inputs, recompute tensors against the float64 reference")
    p.add_argument("out", help="the merge's output folder or s3://bucket/prefix")
    p.add_argument("--sft", help="the SFT model folder (with --aligned: recompute tensors)")
    p.add_argument("--aligned", help="the aligned model folder")
    p.add_argument("--alpha", type=str, help="alpha to check against (default: the manifest's)")
    p.add_argument("--config", help="YAML merge config to take --sft, --aligned and --alpha from")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--sample", type=int, default=8, metavar="N",
                   help="recompute N random extrapolated tensors (default 8); copied elements are always checked")
    g.add_argument("--full", action="store_true", help="recompute every tensor")
    p.add_argument("--seed", type=int, default=0, help="seed of the --sample choice (default 0)")
    p.set_defaults(func=cmd_verify)
    return parser


def main(argv: list[str] | None = None) -> int:
    stop_on_sigterm()
    try:
        args = _parser().parse_args(argv)
        logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, stream=sys.stderr,
                            format="expo-dist: %(message)s")
        return args.func(args)
    except ExpoError as e:
        print(f"expo-dist: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:  # Ray's waits re-raise a plain KeyboardInterrupt: the flag says which signal it was
        if TERMINATED.is_set():
            print("expo-dist: terminated (SIGTERM); Ray stopped, the finished tasks are kept: rerun the same "
                  "command to resume", file=sys.stderr)
            return 143
        print("expo-dist: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130


def stop_on_sigterm() -> None:
    """SIGTERM unwinds like Ctrl-C: the merge's finally blocks close the journal and stop the embedded Ray
    (its processes would otherwise be left to notice the driver is gone). Only where nobody set a handler.
    (session.connect keeps Ray from putting in its own handler while it starts.)"""
    def handler(signum, frame):
        TERMINATED.set()
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM ends the process at once
        raise Terminated()

    if signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
        signal.signal(signal.SIGTERM, handler)
        previous = sys.unraisablehook

        def unraisable(info):  # Terminated raised inside a callback Python cannot unwind: the flag carries it
            if not (info.exc_type is not None and issubclass(info.exc_type, Terminated)):
                previous(info)

        sys.unraisablehook = unraisable


def entry() -> None:
    """The console script: main(), then exit. After a SIGTERM the merge has already closed its journal and stopped
    Ray; leaving through os._exit skips the interpreter's teardown, where Ray's C++ core worker, hit by the same
    SIGTERM, can abort (exit -6 in 2 of 8 runs with SIGTERM while the workers started) after our one line."""
    stop_on_sigterm()  # as early as we can: a SIGTERM before this (interpreter start-up) ends the process as -15
    code = main()
    if code == 143 and TERMINATED.is_set():
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(143)
    sys.exit(code)


if __name__ == "__main__":
    entry()
