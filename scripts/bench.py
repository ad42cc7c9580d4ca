#!/usr/bin/env python
"""Benchmark expo_dist against baselines measured in the same run: figures and ratios, never a timed test.

    python scripts/bench.py                                  # Mistral-7B shapes, 8 layers (≈4.0 GB per model)
    python scripts/bench.py --preset tiny --repeat 1         # seconds, for checking the harness
    python scripts/bench.py --layers 1 --hidden-size 1024 --shard-bytes 60MB,40MB
    python scripts/bench.py --pair /data/pair --keep         # reuse PAIR/sft and PAIR/aligned
    python scripts/bench.py --memory                         # the memory criterion: every process < 1 GiB
    python scripts/bench.py --compare-mergekit --sweep "0.1 0.3 0.5" --json bench.json

Each of --repeat rounds measures, with the page cache dropped before each phase:
  ray_startup  `python -c "import ray; ray.init(address='local'); ray.shutdown()"` (a Ray of its own, no
               dashboard: as the merge's driver starts it)
  io_floor     read both inputs fully (16 MiB reads, one thread per input, at once), then write a file of the
               output's size and fsync it (--floor-overlap: write while reading); twice: through the page
               cache and with O_DIRECT. The faster of the two is the floor the ratios use.
  merge        `expo-dist merge ... --json -q` in a subprocess: the whole command, and the merge phase
               ("merge_seconds" of its JSON / manifest: from starting the worker actors to the last file
               sealed; Ray's start-up, planning and finishing are outside it), with the peak RSS of every
               process of its tree (driver, ray::MergeWorker actors, raylet, gcs_server, Ray's agents)
               sampled every 50 ms
then, once: mergekit task_arithmetic (--compare-mergekit) and a several-α sweep (--sweep).

Generated pairs and outputs live in a temp folder (--workdir) that is removed at the end (--keep keeps
the pair). Figures go to stdout (and --json FILE); progress to stderr.
"""

from __future__ import annotations

import argparse
import datetime
import json
import mmap
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)  # this checkout's expo_dist, installed or not

from expo_dist.formats.folder import MANIFEST  # noqa: E402
from expo_dist.runtime.fileio import fs_type, open_direct  # noqa: E402
from expo_dist.testing import rss  # noqa: E402
from expo_dist.testing.measure import (  # noqa: E402
    Cache,
    child_env,
    evict,
    machine,
    merge_cli,
    model_bytes,
    nbytes,
    parse_shard_bytes,
    run_merge,
    run_sampled,
    tree_weight_files,
    weight_files,
)
from expo_dist.testing.rss import GiB, fmt_bytes  # noqa: E402

IO_BLOCK = 16 << 20
MEMORY_SHAPE = dict(hidden_size=4096, intermediate_size=4096, num_layers=1, num_heads=32, num_kv_heads=8,
                    vocab_size=131072, tie_word_embeddings=False)  # embed_tokens and lm_head: 1 GiB each in bf16
MEMORY_TASK_BYTES = "64MiB"


def log(msg: str) -> None:
    print(f"bench: {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------ the pair

def shape_kwargs(args) -> dict:
    from expo_dist.testing import synth

    if args.memory:
        kw = dict(MEMORY_SHAPE)
    elif args.preset == "tiny":
        kw = dict(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
                  vocab_size=256, tie_word_embeddings=False)
    else:
        kw = synth.mistral7b_shapes_kwargs(num_layers=8)
    for k in ("hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads", "vocab_size"):
        if getattr(args, k) is not None:
            kw[k] = getattr(args, k)
    if args.tie:
        kw["tie_word_embeddings"] = True
    return kw


def get_pair(args, workdir: str) -> tuple[str, str, dict, bool]:
    """(sft_dir, aligned_dir, description, generated_here)."""
    if args.pair and all(os.path.isdir(os.path.join(args.pair, d)) and weight_files(os.path.join(args.pair, d))
                         for d in ("sft", "aligned")):
        sft, aligned = os.path.join(args.pair, "sft"), os.path.join(args.pair, "aligned")
        desc = {"source": f"reused {args.pair}"}
        try:
            cfg = json.load(open(os.path.join(aligned, "config.json")))
            desc.update({k: cfg.get(k) for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                                 "vocab_size", "tie_word_embeddings")})
        except (OSError, ValueError):
            pass
        return sft, aligned, desc, False
    from expo_dist.testing import synth

    kw = shape_kwargs(args)
    target = args.pair or os.path.join(workdir, "pair")
    shard = parse_shard_bytes(args.shard_bytes)
    one = model_bytes(kw, args.dtype)
    log(f"generating a pair in {target}: {one / 1e9:.2f} GB per model ({kw}, {args.dtype}, "
        f"shards sft {shard[0]} / aligned {shard[1]} bytes)")
    t0 = time.perf_counter()
    sft, aligned = synth.make_pair(target, dtype=args.dtype, sft_shard_bytes=shard[0], aligned_shard_bytes=shard[1],
                                   seed=args.seed, **kw)
    gen = time.perf_counter() - t0
    log(f"pair generated in {gen:.1f}s")
    desc = {"source": "generated", "shape": kw, "dtype": args.dtype, "sft_shard_bytes": shard[0],
            "aligned_shard_bytes": shard[1], "generate_seconds": round(gen, 2)}
    return str(sft), str(aligned), desc, True


# ----------------------------------------------------------------------------------------------- baselines

def run_ray_startup(env: dict, timeout: float = 300) -> float:
    """Seconds of `python -c "import ray; ray.init(); ray.shutdown()"`, started as expo_dist's driver starts
    its embedded Ray: address="local" (plain ray.init() joins the cluster /tmp/ray/ray_current_cluster names,
    which may be someone else's `ray start`, or a dead one: it then hangs), no dashboard."""
    code = ("import logging, ray; ray.init(address='local', include_dashboard=False, "
            "logging_level=logging.WARNING); ray.shutdown()")
    t0 = time.perf_counter()
    try:
        r = subprocess.run([sys.executable, "-c", code], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                           text=True, cwd=tempfile.gettempdir(), timeout=timeout)
    except subprocess.TimeoutExpired:
        raise SystemExit(f"bench: ray start-up baseline did not finish in {timeout:.0f}s") from None
    dt = time.perf_counter() - t0
    if r.returncode:
        raise SystemExit(f"bench: ray start-up baseline failed:\n{r.stderr[-2000:]}")
    return dt


def _open(path: str, flags: int, direct: bool) -> tuple[int, bool]:
    """A descriptor, with O_DIRECT when asked and the file system allows it (as the workers open theirs)."""
    fd = open_direct(path, flags) if direct else None
    return (fd, True) if fd is not None else (os.open(path, flags, 0o644), False)


def _read_all(files: list[str], out: list, k: int, direct: bool = False) -> None:
    buf = mmap.mmap(-1, IO_BLOCK)  # page-aligned, as O_DIRECT needs
    view = memoryview(buf)
    total = 0
    for f in files:
        fd, _ = _open(f, os.O_RDONLY, direct)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
            off = 0
            while True:
                n = os.preadv(fd, [view], off)
                off += n
                if n < IO_BLOCK:  # the end of the file (a direct read returns the last partial block short)
                    break
            total += off
        finally:
            os.close(fd)
    out[k] = total


def _write_fsync(path: str, size: int, out: list, k: int, direct: bool = False) -> None:
    block = mmap.mmap(-1, IO_BLOCK)
    block.write(os.urandom(IO_BLOCK))  # not zeros: a compressing filesystem would cheat
    view = memoryview(block)
    fd, direct = _open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, direct)
    try:
        left = size
        while left:
            n = min(left, IO_BLOCK)
            if direct and n % 4096:  # the last partial block through the page cache, as the merge does
                os.close(fd)
                fd, _ = _open(path, os.O_WRONLY, False)
            left -= os.pwrite(fd, view[:n], size - left)
        os.fsync(fd)
    finally:
        os.close(fd)
    out[k] = size


def run_io_floor(sft_files: list[str], aligned_files: list[str], out_size: int, path: str,
                 overlap: bool, direct: bool = False) -> dict:
    """Read both inputs (one thread each, at once) + write out_size bytes and fsync; seconds of each part.
    direct: with O_DIRECT (the disk's own speed, without the page cache), where the file system allows it."""
    got = [0, 0, 0]
    readers = [threading.Thread(target=_read_all, args=(fs, got, k, direct))
               for k, fs in enumerate((sft_files, aligned_files))]
    writer = threading.Thread(target=_write_fsync, args=(path, out_size, got, 2, direct))
    t0 = time.perf_counter()
    for t in readers:
        t.start()
    if overlap:
        writer.start()
    for t in readers:
        t.join()
    t_read = time.perf_counter() - t0
    if not overlap:
        writer.start()
    writer.join()
    total = time.perf_counter() - t0
    evict(path)
    os.unlink(path)
    return {"seconds": total, "read_seconds": t_read, "write_seconds": total - t_read if not overlap else None,
            "bytes_read": got[0] + got[1], "bytes_written": got[2]}


# ---------------------------------------------------------------------------------------------- the merge

def remove(path: str) -> None:
    if os.path.isdir(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.exists(path):
        os.unlink(path)


def merge_failed(r: dict, what: str) -> SystemExit:
    return SystemExit(f"bench: {what} failed (exit {r['rc']}): {' '.join(map(shlex.quote, r['cmd']))}\n"
                      f"{r['stderr_tail']}")


# --------------------------------------------------------------------------------------------- mergekit

def run_mergekit(sft, aligned, alpha, dtype, workdir, cache: Cache, paths, timeout, extra) -> dict:
    exe = shutil.which("mergekit-yaml")
    if not exe:
        return {"status": "mergekit: not installed, skipped"}
    cfg = os.path.join(workdir, "mergekit.yml")
    # task_arithmetic: base + sum w_i (m_i - base) = sft + (1+alpha)(aligned - sft) = aligned + alpha(aligned - sft)
    with open(cfg, "w") as f:
        f.write(f"""merge_method: task_arithmetic
base_model: {json.dumps(sft)}
models:
  - model: {json.dumps(aligned)}
    parameters:
      weight: {1 + alpha!r}
parameters:
  normalize: false
dtype: float32
out_dtype: {dtype}
""")
    out = os.path.join(workdir, "mergekit-out")
    remove(out)
    cache.drop(paths)
    r = run_sampled([exe, cfg, out, *extra], os.environ.copy(), os.path.join(workdir, "mergekit.log"), timeout)
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
    return res


# ------------------------------------------------------------------------------------------------ sweep

def sweep_forms(alphas: list[str], help_text: str, template: str | None) -> list[list[str]]:
    """Ways to pass several alphas: '{csv}' -> one word '0.1,0.3,0.5', '{list}' -> one word per alpha."""
    def fill(t: str) -> list[str]:
        words = []
        for w in shlex.split(t):
            words += list(alphas) if w == "{list}" else [w.replace("{csv}", ",".join(alphas))]
        return words

    if template:
        return [fill(template)]
    forms = ["--alpha {csv}", "--alpha {list}"]
    for flag in ("--alphas", "--sweep"):
        if flag in help_text:
            forms = [f"{flag} {{csv}}", f"{flag} {{list}}"] + forms
    return [fill(t) for t in forms]


def run_sweep(args, sft, aligned, workdir, cache: Cache, paths, env, extra, single_whole, single_merge, in_bytes):
    alphas = args.sweep.replace(",", " ").split()
    h = subprocess.run(merge_cli() + ["merge", "--help"], env=env, capture_output=True, text=True, cwd=workdir)
    help_text = h.stdout + h.stderr
    tried = []
    for form in sweep_forms(alphas, help_text, args.sweep_args):
        out = os.path.join(workdir, "sweep-out")
        remove(out)
        cache.drop(paths + [out])
        r = run_merge(sft, aligned, form, out, extra, env, args.timeout, os.path.join(workdir, "sweep.log"))
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


# ----------------------------------------------------------------------------------------------- report

def med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def rate(x) -> str:
    return "" if x is None else (f"{x:.2f}" if x >= 0.1 else f"{x:.3f}")


def fmt_runs(xs):
    return " ".join("-" if x is None else f"{x:.2f}" for x in xs)


def print_rss(summary: dict, title: str) -> None:
    procs = [rss.ProcInfo(**{k: p[k] for k in ("pid", "role", "name", "cmd", "peak_rss")},
                          peak_at=p["peak_at_s"]) for p in summary["per_process"]]
    print(f"\n{title} (sampled every 50 ms; {summary['processes']} processes; "
          f"sum over the tree at its peak {fmt_bytes(summary['tree_peak_total_rss'])}, shared pages counted in each):")
    print(rss.format_table(procs))
    if not summary["ray_in_tree"]:
        print("  NOTE: no raylet/gcs_server under the merge's process tree: it joined an existing Ray cluster "
              "(RAY_ADDRESS or a `ray start` cluster on this machine); Ray workers were not sampled")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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
    m.add_argument("--compare-mergekit", action="store_true", help="also time mergekit-yaml task_arithmetic, if on PATH")
    m.add_argument("--mergekit-args", default="", help="extra arguments for mergekit-yaml, e.g. '--lazy-unpickle'")
    m.add_argument("--sweep", help='several alphas, e.g. "0.1 0.3 0.5": time one sweep merge, if the CLI takes it')
    m.add_argument("--sweep-args", help="how to pass the sweep's alphas, e.g. '--alpha {csv}' or '--alphas {list}' "
                   "(default: tried in turn)")
    m.add_argument("--memory", action="store_true",
                   help=f"memory criterion: a pair whose largest tensor is 1 GiB, merged with --max-task-bytes "
                        f"{MEMORY_TASK_BYTES}; PASS if the driver and every worker stay under 1 GiB RSS")
    m.add_argument("--timeout", type=float, default=3600, help="seconds per merge before it is stopped")
    m.add_argument("--src", help="run the merges with the expo_dist package of this checkout (default: this one)")
    p.add_argument("--json", dest="json_file", help="write all figures to this file")
    args = p.parse_args(argv)
    src = os.path.abspath(args.src) if args.src else ROOT  # the expo_dist checkout the merges run
    if args.src:
        if not os.path.isfile(os.path.join(src, "expo_dist", "cli.py")):
            raise SystemExit(f"bench: --src {args.src} has no expo_dist/cli.py")
    repeat = args.repeat if args.repeat is not None else (1 if args.memory else 3)
    if repeat < 1:
        raise SystemExit("bench: --repeat must be ≥ 1")
    extra = shlex.split(args.merge_args)
    if args.memory and "--max-task-bytes" not in extra:
        extra += ["--max-task-bytes", MEMORY_TASK_BYTES]
    env = child_env(extra, src)

    base = "/var/tmp" if os.path.isdir("/var/tmp") and os.access("/var/tmp", os.W_OK) else None
    workdir = tempfile.mkdtemp(prefix="expo-bench-", dir=args.workdir or base)
    typ = fs_type(os.path.realpath(workdir)) or "?"
    log(f"workdir {workdir} ({typ})")
    if typ in ("tmpfs", "ramfs"):
        log(f"WARNING: {workdir} is on {typ}: I/O figures measure RAM, not a disk; pass --workdir on a disk")
    cache = Cache(enabled=not args.no_drop_caches)
    pair_generated = False
    sft = aligned = None
    results: dict = {"when": datetime.datetime.now().isoformat(timespec="seconds"), "machine": machine(src),
                     "argv": sys.argv[1:], "workdir_fs": typ, "src": src}
    try:
        if not args.pair or not os.path.isdir(os.path.join(args.pair, "sft")):
            kw = shape_kwargs(args)
            need = model_bytes(kw, args.dtype) * (3 + (len(args.sweep.split()) if args.sweep else 0)) * 1.05
            free = shutil.disk_usage(args.pair and os.path.dirname(os.path.abspath(args.pair)) or workdir).free
            if need > free:
                raise SystemExit(f"bench: needs ~{need / 1e9:.1f} GB of disk, {free / 1e9:.1f} GB free there")
        sft, aligned, desc, pair_generated = get_pair(args, workdir)
        sft_files, aligned_files = weight_files(sft), weight_files(aligned)
        in_bytes = nbytes(sft_files) + nbytes(aligned_files)
        out_guess = nbytes(aligned_files)
        desc.update(sft=sft, aligned=aligned, sft_bytes=nbytes(sft_files), aligned_bytes=nbytes(aligned_files),
                    sft_files=len(sft_files), aligned_files=len(aligned_files))
        results["pair"] = desc
        results["merge_command"] = " ".join(map(shlex.quote, merge_cli() + ["merge", "--sft", sft, "--aligned",
                                                                            aligned, "--alpha", repr(args.alpha),
                                                                            "--out", "OUT", "--json", "-q", *extra]))
        pair_paths = [sft, aligned]

        rounds = []
        for i in range(repeat):
            rd: dict = {}
            if not args.no_floor and not args.memory:
                cache.drop(pair_paths)
                rd["ray_startup"] = run_ray_startup(env)
                cache.drop(pair_paths)
                rd["io_floor"] = run_io_floor(sft_files, aligned_files, out_guess,
                                              os.path.join(workdir, "floor.bin"), args.floor_overlap)
                cache.drop(pair_paths)
                rd["io_floor_direct"] = run_io_floor(sft_files, aligned_files, out_guess,
                                                     os.path.join(workdir, "floor.bin"), args.floor_overlap, True)
                log(f"round {i + 1}/{repeat}: ray start-up {rd['ray_startup']:.2f}s, io floor "
                    f"{rd['io_floor']['seconds']:.2f}s (page cache), {rd['io_floor_direct']['seconds']:.2f}s (direct)")
            out = os.path.join(workdir, f"out-{i}")
            cache.drop(pair_paths)
            r = run_merge(sft, aligned, ["--alpha", repr(args.alpha)], out, extra, env, args.timeout,
                          os.path.join(workdir, f"merge-{i}.log"))
            evict(out)
            remove(out)
            if r["rc"]:
                raise merge_failed(r, "merge")
            if r["merge_seconds"] is None:
                log("merge printed no merge_seconds; the merge phase is not reported")
            files = (r["manifest"] or r["json"] or {}).get("files", {})
            rd["merge"] = {"whole_seconds": r["wall"], "merge_seconds": r["merge_seconds"], "out_bytes": r["out_bytes"],
                           "tasks": (r["json"] or {}).get("tasks"),
                           "workers": len((r["json"] or {}).get("workers") or []) or None,
                           "sha256": {k: v.get("sha256") for k, v in files.items() if isinstance(v, dict)},
                           "rss": r["rss"]}
            log(f"round {i + 1}/{repeat}: merge whole {r['wall']:.2f}s, merge phase "
                f"{r['merge_seconds'] if r['merge_seconds'] is not None else '?'}s, driver "
                f"{fmt_bytes(r['rss']['driver_peak_rss'])}, worker max {fmt_bytes(r['rss']['worker_peak_rss'])}")
            rounds.append(rd)
        results["rounds"] = rounds

        # ---------------------------------------------------------------- figures
        out_bytes = rounds[-1]["merge"]["out_bytes"]
        whole = [rd["merge"]["whole_seconds"] for rd in rounds]
        mphase = [rd["merge"]["merge_seconds"] for rd in rounds]
        fig: dict = {"in_bytes": in_bytes, "out_bytes": out_bytes,
                     "merge_whole": {"median": med(whole), "runs": whole,
                                     "gbps": (in_bytes + out_bytes) / med(whole) / 1e9},
                     "merge_phase": {"median": med(mphase), "runs": mphase,
                                     "gbps": (in_bytes + out_bytes) / med(mphase) / 1e9 if med(mphase) else None}}
        if not args.no_floor and not args.memory:
            rs = [rd["ray_startup"] for rd in rounds]
            fig["ray_startup"] = {"median": med(rs), "runs": rs}
            for key, how in (("io_floor_cached", "io_floor"), ("io_floor_direct", "io_floor_direct")):
                fl = [rd[how]["seconds"] for rd in rounds]
                fb = rounds[0][how]["bytes_read"] + rounds[0][how]["bytes_written"]
                fig[key] = {"median": med(fl), "runs": fl, "gbps": fb / med(fl) / 1e9, "bytes": fb,
                            "read_runs": [rd[how]["read_seconds"] for rd in rounds],
                            "write_runs": [rd[how]["write_seconds"] for rd in rounds],
                            "overlap": args.floor_overlap, "how": how}
            # the floor is the faster way of moving those bytes on this machine: the hardware's limit as reached
            fig["io_floor"] = min(fig["io_floor_cached"], fig["io_floor_direct"], key=lambda d: d["median"])
            f, w, m_, s = fig["io_floor"]["median"], med(whole), med(mphase), med(rs)
            fig["ratios"] = {"merge_over_floor": m_ / f if m_ else None, "whole_over_floor": w / f}
            limit = f + s + 5.0
            fig["criterion"] = {"text": "whole <= floor + ray_startup + 5 s", "whole": w, "limit": limit,
                                "pass": w <= limit}
        hashes = [json.dumps(rd["merge"]["sha256"], sort_keys=True) for rd in rounds]
        fig["identical_outputs_across_runs"] = len(set(hashes)) == 1 if rounds[0]["merge"]["sha256"] else None
        worst = max(rounds, key=lambda rd: (rd["merge"]["rss"]["worker_peak_rss"] or 0,
                                            rd["merge"]["rss"]["driver_peak_rss"] or 0))
        wr = worst["merge"]["rss"]
        fig["rss"] = {k: wr[k] for k in ("driver_peak_rss", "worker_peak_rss", "workers", "raylet_peak_rss",
                                         "gcs_peak_rss", "other_peak_rss", "tree_peak_total_rss")}
        fig["rss"]["over_1gib"] = [f"{p['role']} pid {p['pid']} {fmt_bytes(p['peak_rss'])}"
                                   for rd in rounds for p in rd["merge"]["rss"]["over_limit"]]
        if args.memory:
            dw = [rd["merge"]["rss"] for rd in rounds]
            top = max([s["driver_peak_rss"] or 0 for s in dw] + [s["worker_peak_rss"] or 0 for s in dw])
            every = max(pp["peak_rss"] for s in dw for pp in s["per_process"])
            largest = largest_tensor(aligned)
            fig["memory"] = {"largest_tensor_bytes": largest, "max_task_bytes": extra[extra.index("--max-task-bytes") + 1],
                             "driver_and_workers_max_rss": top, "all_processes_max_rss": every,
                             "pass": top < GiB and all(s["workers"] for s in dw)}
        if args.compare_mergekit:
            log("mergekit ...")
            fig["mergekit"] = run_mergekit(sft, aligned, args.alpha, args.dtype, workdir, cache, pair_paths,
                                           args.timeout, shlex.split(args.mergekit_args))
            if fig["mergekit"].get("seconds") and fig["mergekit"]["rc"] == 0:
                fig["mergekit"]["ratio_over_expo_whole"] = fig["mergekit"]["seconds"] / med(whole)
                fig["mergekit"]["durable_ratio_over_expo_whole"] = (
                    (fig["mergekit"]["seconds"] + fig["mergekit"]["fsync_seconds"]) / med(whole))
        if args.sweep:
            log(f"sweep {args.sweep} ...")
            fig["sweep"] = run_sweep(args, sft, aligned, workdir, cache, pair_paths, env, extra, med(whole), med(mphase),
                                     in_bytes)
        fig["page_cache"] = cache.status()
        results["figures"] = fig
        report(args, results, worst, repeat)
        if args.json_file:
            with open(args.json_file, "w") as f:
                json.dump(results, f, indent=2, default=str)
            log(f"figures written to {args.json_file}")
        return 0 if not args.memory or fig["memory"]["pass"] else 1
    finally:
        if pair_generated and args.keep and not args.pair:
            for name in os.listdir(workdir):
                if name != "pair":
                    remove(os.path.join(workdir, name))
            log(f"pair kept: {os.path.join(workdir, 'pair')} (reuse with --pair; delete it when done)")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
        if args.pair and pair_generated:
            log(f"pair kept: {args.pair} (--pair); delete it when done")


def largest_tensor(folder: str) -> int:
    """Largest tensor's bytes in a model folder, from the safetensors headers."""
    best = 0
    for f in weight_files(folder):
        with open(f, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(n))
        for k, v in header.items():
            if k != "__metadata__":
                best = max(best, v["data_offsets"][1] - v["data_offsets"][0])
    return best


def report(args, results: dict, worst: dict, repeat: int) -> None:
    fig, pair, mach = results["figures"], results["pair"], results["machine"]
    print(f"expo_dist benchmark  {results['when']}  ({mach.get('cpus')} CPUs, {mach.get('ram_gib')} GiB RAM, "
          f"torch {mach.get('torch')}, ray {mach.get('ray')}, git {mach.get('git')})")
    shape = pair.get("shape") or {k: v for k, v in pair.items() if k in ("hidden_size", "num_hidden_layers", "vocab_size")}
    print(f"pair: {pair['source']} {shape}; sft {gb(pair['sft_bytes'])} in {pair['sft_files']} files, "
          f"aligned {gb(pair['aligned_bytes'])} in {pair['aligned_files']} files; "
          f"output {gb(fig['out_bytes'])}; alpha {args.alpha}")
    print(f"merge: {results['merge_command']}" + ("" if results["src"] == ROOT else f"  (expo_dist from {results['src']})"))
    print(f"{fig['page_cache']}; workdir on {results['workdir_fs']}; {repeat} round(s), median reported")
    rs = fig["rss"]
    rows = []
    if "ray_startup" in fig:
        rows.append(("ray_startup", fig["ray_startup"], None, ""))
        for key, label in (("io_floor_cached", "io_floor page cache"), ("io_floor_direct", "io_floor direct")):
            fl = fig[key]
            rows.append((label + (" (overlap)" if fl["overlap"] else ""), fl, fl["gbps"],
                         "<- the floor" if fl is fig["io_floor"] else ""))
    rows.append(("merge whole", fig["merge_whole"], fig["merge_whole"]["gbps"],
                 f"driver {fmt_bytes(rs['driver_peak_rss'])}, worker max {fmt_bytes(rs['worker_peak_rss'])} "
                 f"({rs['workers']} actors)"))
    rows.append(("merge phase", fig["merge_phase"], fig["merge_phase"]["gbps"], ""))
    print(f"\n{'phase':<22} {'median s':>9}  {'runs (s)':<26} {'GB/s':>6}  peak RSS")
    for name, d, gbps, r in rows:
        print(f"{name:<22} {d['median'] if d['median'] is not None else float('nan'):>9.2f}  "
              f"{fmt_runs(d['runs']):<26} {rate(gbps):>6}  {r}")
    mk = fig.get("mergekit")
    if mk:
        if mk.get("seconds") is not None:
            print(f"{'mergekit (1 run)':<22} {mk['seconds']:>9.2f}  {mk['status']:<26} "
                  f"{rate((fig['in_bytes'] + mk['out_bytes']) / mk['seconds'] / 1e9):>6}  "
                  f"max {fmt_bytes(mk['peak_rss'])}")
        else:
            print(mk["status"])
    sw = fig.get("sweep")
    if sw:
        if sw["status"] == "ok":
            print(f"{'sweep ' + ','.join(sw['alphas']):<22} {sw['seconds']:>9.2f}  {'1 run: ' + sw['form']:<26} "
                  f"{rate(sw['gbps_whole']):>6}  driver {fmt_bytes(sw['driver_peak_rss'])}, "
                  f"worker max {fmt_bytes(sw['worker_peak_rss'])}")
        else:
            print(sw["status"])
            for t in sw.get("tried", []):
                print(f"  tried: {t}")
    if "io_floor" in fig:
        fl = fig["io_floor"]
        print(f"\nio_floor moves {gb(fl['bytes'])} (read both inputs, write the output size, fsync), the faster of "
              f"page cache and O_DIRECT ({'direct' if fl['how'] == 'io_floor_direct' else 'page cache'}); "
              f"read part {fmt_runs(fl['read_runs'])} s" +
              ("" if fl["overlap"] else f", write+fsync part {fmt_runs(fl['write_runs'])} s"))
        ra = fig["ratios"]
        print(f"ratios: merge/floor {ra['merge_over_floor']:.2f}  whole/floor {ra['whole_over_floor']:.2f}"
              if ra["merge_over_floor"] else f"ratios: whole/floor {ra['whole_over_floor']:.2f}")
        if fig["merge_phase"]["median"] is not None:
            print(f"outside the merge phase (start-up, planning, finishing): "
                  f"{fig['merge_whole']['median'] - fig['merge_phase']['median']:.2f} s; "
                  f"ray start-up baseline {fig['ray_startup']['median']:.2f} s")
        c = fig["criterion"]
        print(f"criterion whole <= floor + ray_startup + 5 s: {c['whole']:.2f} <= "
              f"{fig['io_floor']['median']:.2f} + {fig['ray_startup']['median']:.2f} + 5 = {c['limit']:.2f}: "
              f"{'PASS' if c['pass'] else 'FAIL'}")
    if mk and mk.get("ratio_over_expo_whole"):
        print(f"mergekit / expo_dist whole: {mk['ratio_over_expo_whole']:.2f} (mergekit's own time, its output not yet "
              f"fsynced); {mk['durable_ratio_over_expo_whole']:.2f} counting the fsync of its files "
              f"({mk['fsync_seconds']:.2f} s) as expo_dist's time does")
    if sw and sw["status"] == "ok":
        n = len(sw["alphas"])
        print(f"sweep of {n} ({sw['outputs']} output folders with a manifest): {sw['vs_single_whole']:.2f}x one "
              f"merge's whole time, {sw['vs_n_singles_whole']:.2f}x {n} separate merges")
        if sw["outputs"] != n:
            print(f"  NOTE: expected {n} outputs, found {sw['outputs']} manifests")
    idem = fig["identical_outputs_across_runs"]
    if repeat > 1 and idem is not None:
        print(f"outputs identical across runs (sha256): {'yes' if idem else 'NO'}")
    print(f"processes over 1 GiB RSS: {', '.join(rs['over_1gib']) if rs['over_1gib'] else 'none'}")
    print_rss(worst["merge"]["rss"], "peak RSS per process of the merge" + (" (round with the largest worker peak)"
                                                                            if repeat > 1 else ""))
    if "memory" in fig:
        mm = fig["memory"]
        print(f"\nmemory criterion: largest tensor {fmt_bytes(mm['largest_tensor_bytes'])}, --max-task-bytes "
              f"{mm['max_task_bytes']}: driver and every MergeWorker < 1 GiB RSS: max "
              f"{fmt_bytes(mm['driver_and_workers_max_rss'])}: {'PASS' if mm['pass'] else 'FAIL'} "
              f"(all processes of the tree: max {fmt_bytes(mm['all_processes_max_rss'])})")


if __name__ == "__main__":
    sys.exit(main())
