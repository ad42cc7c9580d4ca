#!/usr/bin/env python
"""GPU check: expo_dist on a GPU gives the same bytes as on the CPU, and how fast its device kernel is.

    python scripts/gpu_check.py                  # medium pair (≈0.6 GB per model), GPU + CPU merge, kernel timing
    python scripts/gpu_check.py --small          # seconds: a 20 MB pair, small kernel tensors (also for CPU-only)

0. self-check: runs expo_dist.runtime.selfcheck.self_check (what every GPU worker runs when it starts: a few thousand
   elements per dtype, ties, double-rounding, overflow, subnormal, NaN/inf and -0 cases, compared byte for
   byte with the CPU kernel) on CUDA, and on the CPU with the torch ops, and prints what it checked.
1. kernel: times expo_dist.runtime.kernel.Kernel(dev).extrapolate on large bf16 tensors (after warm-up; on CUDA with
   torch.cuda.synchronize) and reports elements/s and GB/s (a, s read + out written: 6 bytes per element);
   the CPU paths (the C extension if built, and the torch ops: Kernel(use_c=False)) run on one thread, as in
   the merge workers; on CUDA the output is compared byte for byte with every CPU path's on a slice.
2. merge: generates a pair and runs `expo-dist merge` twice in subprocesses: with --device cuda (Ray sees the
   GPUs, so the workers are GPU actors, each of which self-checks first) and with --device cpu (CPU actors,
   the GPUs left alone). It checks each run's workers used the expected device (and that every GPU worker
   passed its self-check), that the outputs are byte-identical (sha256 of every file we read back), and
   (unless --no-exact) that the output equals the float64 reference of expo_dist/testing/reference.py.
Without CUDA it prints "no CUDA device: GPU part skipped" and still does the CPU kernel timing and CPU merge.
Exit status 0 when every check passed, 1 otherwise. Everything it writes is in a temp folder it removes.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shlex
import shutil
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this checkout's expo_dist

# expo_bench: the benchmark's package next to this script (scripts/ is on sys.path when a script in it runs)
from expo_bench import merge as bench_merge  # noqa: E402
from expo_bench import pair as bench_pair  # noqa: E402
from expo_bench.context import log as bench_log  # noqa: E402
from expo_bench.context import make_workdir  # noqa: E402

from expo_dist.testing import measure  # noqa: E402
from expo_dist.testing.rss import fmt_bytes  # noqa: E402

MEDIUM = dict(hidden_size=2048, intermediate_size=5632, num_layers=4, num_heads=16, num_kv_heads=4,
              vocab_size=32000, tie_word_embeddings=False)  # ≈ 0.62 GB per model in bf16
SMALL = dict(hidden_size=512, intermediate_size=1376, num_layers=2, num_heads=8, num_kv_heads=2,
             vocab_size=8192, tie_word_embeddings=False)  # ≈ 20 MB per model


def log(msg: str) -> None:
    bench_log(msg, "gpu_check")


_DATA: dict = {}


def cpu_impls() -> list[str]:
    """The CPU kernel paths this install has: 'C' (the optional extension) and 'torch' (the torch ops)."""
    from expo_dist.runtime import kernel

    have_c = getattr(kernel, "_ckernel", None) is not None
    return (["C"] if have_c else []) + ["torch"]


def time_kernel(device: str, n: int, reps: int, tile: int | None = None, threads: int | None = None,
                impl: str | None = None) -> dict:
    import torch

    from expo_dist.runtime.kernel import Kernel

    use_c = impl != "torch"  # (Kernel takes the choice; no environment variable)
    if threads is not None:
        old = torch.get_num_threads()
        torch.set_num_threads(threads)
    try:
        if (device, n) not in _DATA:  # the same inputs for every tile size (made once: 2^28 takes seconds)
            _DATA.clear()
            g = torch.Generator(device="cpu").manual_seed(0)
            a = (torch.randn(n, generator=g) * 0.02).to(torch.bfloat16)
            s = (a.float() + torch.randn(n, generator=g) * 2e-4).to(torch.bfloat16)
            _DATA[(device, n)] = (a.to(device), s.to(device))
        a, s = _DATA[(device, n)]
        out = torch.empty(n, dtype=torch.bfloat16, device=device)
        k = Kernel(device, use_c=use_c) if tile is None else Kernel(device, tile=tile, use_c=use_c)
        sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
        k.extrapolate(a, s, 0.3, out)  # warm-up: allocator, kernels, caches
        sync()
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            k.extrapolate(a, s, 0.3, out)
            sync()
            times.append(time.perf_counter() - t0)
        best = min(times)
        label = device if device != "cpu" else f"cpu ({impl or 'default'})"
        return {"device": label, "elements": n, "tile": k.tile, "threads": torch.get_num_threads() if device == "cpu" else "-",
                "seconds": times, "elems_per_s": n / best, "gbps": 6 * n / best / 1e9,
                "a": a, "s": s, "out": out}
    finally:
        if threads is not None:
            torch.set_num_threads(old)


def kernel_part(args, cuda: bool) -> tuple[list[dict], list[str]]:
    import torch

    from expo_dist.runtime.kernel import Kernel

    rows, fails = [], []
    for impl in cpu_impls():  # one thread, as in the merge workers
        rows.append(time_kernel("cpu", args.cpu_kernel_elems, args.reps, threads=1, impl=impl))
    n_cpu = len(rows)
    if cuda:
        tiles = [None] + [int(t) for t in args.tiles.split(",") if t.strip()]
        ref_n = min(args.cpu_kernel_elems, args.kernel_elems)
        first = None
        for tile in tiles:
            r = time_kernel("cuda", args.kernel_elems, args.reps, tile=tile)
            rows.append(r)
            if first is None:
                first = r
        # the same bytes as every CPU path, on a slice
        a, s = first["a"][:ref_n].cpu(), first["s"][:ref_n].cpu()
        wants = {}
        for impl in cpu_impls():
            want = torch.empty(ref_n, dtype=torch.bfloat16)
            Kernel("cpu", use_c=impl != "torch").extrapolate(a, s, 0.3, want)
            wants[impl] = want.view(torch.int16)
        for r in rows[n_cpu:]:
            got = r["out"][:ref_n].cpu().view(torch.int16)
            r["same_as_cpu"] = all(torch.equal(got, w) for w in wants.values())
            for impl, w in wants.items():
                if not torch.equal(got, w):
                    bad = int((got != w).sum())
                    fails.append(f"GPU kernel (tile {r['tile']}) differs from the CPU {impl} kernel in {bad} of "
                                 f"{ref_n} elements")
        del first
    for r in rows:
        for key in ("a", "s", "out"):
            r.pop(key, None)
    _DATA.clear()
    if cuda:
        torch.cuda.empty_cache()
    return rows, fails


def self_check_part(cuda: bool) -> tuple[list[dict], list[str]]:
    """selfcheck.self_check on CUDA (the GPU workers' start-up check) and on the CPU (the torch ops against the
    C kernel, where it is built)."""
    from expo_dist.runtime.selfcheck import KernelCheckFailed, self_check

    rows, fails = [], []
    for device in (["cuda"] if cuda else []) + ["cpu"]:
        row = {"device": device}
        try:
            row.update(self_check(device))
            if device == "cuda":  # a second run: the first paid for CUDA's start-up
                row["seconds_warm"] = self_check(device)["seconds"]
        except KernelCheckFailed as e:
            row["failed"] = str(e)
            fails.append(f"kernel self-check on {device}: {e}")
        except Exception as e:  # noqa: BLE001 - a CUDA error: report it and go on
            row["failed"] = f"{e.__class__.__name__}: {' '.join(str(e).split())[:300]}"
            fails.append(f"kernel self-check on {device}: {row['failed']}")
        rows.append(row)
    return rows, fails


def file_hashes(folder: str) -> dict[str, str]:
    out = {}
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if name.endswith(".safetensors") or name == "model.safetensors.index.json":
            h = hashlib.sha256()
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(16 << 20), b""):
                    h.update(block)
            out[name] = h.hexdigest()
    return out


def merge_once(label, sft, aligned, out, args, env, workdir, in_bytes, device_args=()) -> dict:
    extra = list(device_args) + shlex.split(args.merge_args)
    cache = measure.Cache(enabled=not args.no_drop_caches, who="gpu_check")
    cache.drop([sft, aligned])
    r = measure.run_merge(sft, aligned, ["--alpha", repr(args.alpha)], out, extra, env, args.timeout,
                        os.path.join(workdir, f"merge-{label}.log"))
    if r["rc"]:
        raise bench_merge.failed(r, f"{label} merge", "gpu_check")
    workers = (r["json"] or {}).get("workers") or (r["manifest"] or {}).get("workers") or []
    devices = sorted({str(w.get("device")) for w in workers})
    checks = [w.get("self_check") for w in workers]
    res = {"label": label, "self_checks": checks, "whole_seconds": r["wall"], "merge_seconds": r["merge_seconds"],
           "out_bytes": r["out_bytes"], "devices": devices, "workers": len(workers),
           "gbps_whole": (in_bytes + r["out_bytes"]) / r["wall"] / 1e9,
           "gbps_merge": (in_bytes + r["out_bytes"]) / r["merge_seconds"] / 1e9 if r["merge_seconds"] else None,
           "driver_peak_rss": r["rss"]["driver_peak_rss"], "worker_peak_rss": r["rss"]["worker_peak_rss"],
           "page_cache": cache.status()}
    passed = [c for c in checks if c]
    log(f"{label} merge: {res['whole_seconds']:.2f}s whole, {res['merge_seconds']}s merge phase, "
        f"workers {res['workers']} on {devices}" + (
            f"; {len(passed)} passed the kernel self-check at start ({max(c['seconds'] for c in passed):.3f}s "
            "at most)" if passed else ""))
    return res


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--small", action="store_true", help="a 20 MB pair and small kernel tensors (seconds)")
    p.add_argument("--layers", type=int, help="override the pair's number of layers")
    p.add_argument("--shard-bytes", help="input shard sizes SFT,ALIGNED (default 200MB,150MB; --small 8MB,5MB)")
    p.add_argument("--alpha", type=float, default=0.3)
    p.add_argument("--merge-args", default="", help="extra arguments for expo-dist merge (both runs)")
    p.add_argument("--kernel-elems", type=int, help="elements per tensor for the CUDA kernel timing (default 2^28)")
    p.add_argument("--cpu-kernel-elems", type=int, help="elements for the CPU kernel timing (default 2^24)")
    p.add_argument("--tiles", default=str(1 << 22),
                   help="extra Kernel tile sizes to time on CUDA, comma-separated (the default tile is always timed)")
    p.add_argument("--reps", type=int, default=3, help="timed kernel calls (best reported)")
    p.add_argument("--no-exact", action="store_true", help="skip the float64 reference check of the output")
    p.add_argument("--no-drop-caches", action="store_true")
    p.add_argument("--timeout", type=float, default=600)
    p.add_argument("--workdir", help="temp folder parent (default /var/tmp)")
    p.add_argument("--json", dest="json_file", help="write the figures to this file")
    args = p.parse_args(argv)
    args.kernel_elems = args.kernel_elems or (1 << 22 if args.small else 1 << 28)
    args.cpu_kernel_elems = args.cpu_kernel_elems or (1 << 20 if args.small else 1 << 24)
    shape = dict(SMALL if args.small else MEDIUM)
    if args.layers is not None:
        shape["num_layers"] = args.layers
    shard = measure.parse_shard_bytes(args.shard_bytes or ("8MB,5MB" if args.small else "200MB,150MB"))

    import torch

    cuda = torch.cuda.is_available()
    fails: list[str] = []
    report: dict = {"machine": measure.machine(), "cuda": cuda}
    print(f"gpu_check  torch {torch.__version__}  " + (
        f"CUDA {torch.version.cuda}, {torch.cuda.device_count()} device(s): {torch.cuda.get_device_name(0)}"
        if cuda else "no CUDA"))
    if not cuda:
        print("no CUDA device: GPU part skipped")

    # ---------------------------------------------------------------- kernel self-check
    log("running the kernel self-check ...")
    checks, cf = self_check_part(cuda)
    fails += cf
    report["self_check"] = checks
    for c in checks:
        print(f"self-check {c['device']:<5} " + (
            f"FAILED: {c['failed']}" if "failed" in c else
            f"ok: {c['elements']} elements in {c['cases']} cases byte-identical to the {c['reference']} in "
            f"{c['seconds']:.3f}s" + (f" ({c['seconds_warm']:.3f}s warm)" if "seconds_warm" in c else "")))

    # ---------------------------------------------------------------- kernel throughput
    log("timing the kernel ...")
    rows, kf = kernel_part(args, cuda)
    fails += kf
    report["kernel"] = rows
    print(f"\n{'kernel':<12} {'elements':>12} {'tile':>9} {'threads':>7} {'best s':>8} {'Melem/s':>9} {'GB/s':>7}")
    for r in rows:
        print(f"{r['device']:<12} {r['elements']:>12} {r['tile']:>9} {r['threads']:>7} {min(r['seconds']):>8.4f} "
              f"{r['elems_per_s'] / 1e6:>9.1f} {r['gbps']:>7.2f}" +
              ("" if "same_as_cpu" not in r else "   bytes = CPU kernels: " + ("yes" if r["same_as_cpu"] else "NO")))

    # ---------------------------------------------------------------- merges
    workdir = make_workdir("expo-gpucheck-", args.workdir)
    try:
        sft, aligned, _ = bench_pair.generate(os.path.join(workdir, "pair"), shape, "bfloat16", shard, 0, "gpu_check")
        in_bytes = measure.nbytes(measure.weight_files(sft)) + measure.nbytes(measure.weight_files(aligned))
        extra = shlex.split(args.merge_args)
        runs = []
        if cuda:
            env_gpu = measure.child_env(extra)
            r = merge_once("gpu", sft, aligned, os.path.join(workdir, "out-gpu"), args, env_gpu, workdir, in_bytes,
                           ["--device", "cuda"])
            if not r["devices"] or not all(d.startswith("cuda") for d in r["devices"]):
                fails.append(f"GPU merge ran on {r['devices']}: Ray did not give the workers a GPU")
            if not r["self_checks"] or not all(r["self_checks"]):
                fails.append("GPU merge: not every GPU worker reports a passed self-check in the manifest")
            runs.append(r)
        env_cpu = measure.child_env(extra)
        # --device cpu: CPU actors, even though Ray sees the GPUs
        r = merge_once("cpu", sft, aligned, os.path.join(workdir, "out-cpu"), args, env_cpu, workdir, in_bytes,
                       ["--device", "cpu"])
        if r["devices"] != ["cpu"]:
            fails.append(f"CPU merge ran on {r['devices']}")
        runs.append(r)
        report["merges"] = runs

        hashes = {run["label"]: file_hashes(os.path.join(workdir, f"out-{run['label']}")) for run in runs}
        if cuda:
            same = hashes["gpu"] == hashes["cpu"] and hashes["cpu"]
            report["identical"] = bool(same)
            if not same:
                diff = sorted(k for k in set(hashes["gpu"]) | set(hashes["cpu"])
                              if hashes["gpu"].get(k) != hashes["cpu"].get(k))
                fails.append(f"GPU and CPU outputs differ: {diff}")
        if not args.no_exact:
            log("checking the output against the float64 reference (expo_dist/testing/reference.py) ...")
            try:
                from expo_dist.testing.reference import assert_exact

                label = "gpu" if cuda else "cpu"
                t0 = time.perf_counter()
                n = assert_exact(os.path.join(workdir, f"out-{label}"), sft, aligned, args.alpha,
                                 shape["tie_word_embeddings"])
                report["exact"] = {"output": label, "elements": n, "seconds": time.perf_counter() - t0}
            except AssertionError as e:
                fails.append(f"output differs from the float64 reference: {e}")
                report["exact"] = {"error": str(e)}
            except ImportError as e:
                report["exact"] = {"skipped": str(e)}

        print(f"\npair: {shape}, {in_bytes / 2e9:.2f} GB per model; alpha {args.alpha}")
        print(f"{'merge':<6} {'whole s':>8} {'merge s':>8} {'GB/s whole':>11} {'GB/s merge':>11}  "
              f"{'workers':<18} driver / worker peak RSS")
        for r in runs:
            print(f"{r['label']:<6} {r['whole_seconds']:>8.2f} {r['merge_seconds'] or float('nan'):>8.2f} "
                  f"{r['gbps_whole']:>11.3f} {(r['gbps_merge'] or float('nan')):>11.3f}  "
                  f"{str(r['workers']) + ' on ' + ','.join(r['devices']):<18} "
                  f"{fmt_bytes(r['driver_peak_rss'])} / {fmt_bytes(r['worker_peak_rss'])}")
        print(runs[-1]["page_cache"])
        if cuda:
            print(f"GPU and CPU outputs byte-identical ({len(hashes['cpu'])} files, sha256): "
                  f"{'yes' if report['identical'] else 'NO'}")
        ex = report.get("exact")
        if ex:
            print("float64 reference: " + (f"all {ex['elements']} elements of the {ex['output']} output exact "
                                           f"({ex['seconds']:.1f}s)" if "elements" in ex else
                                           f"skipped ({ex['skipped']})" if "skipped" in ex else "FAILED"))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    report["failures"] = fails
    if args.json_file:
        with open(args.json_file, "w") as f:
            json.dump(report, f, indent=2, default=str)
    print("\n" + ("PASS" if not fails else "FAIL:\n  " + "\n  ".join(fails)))
    return 0 if not fails else 1


if __name__ == "__main__":
    sys.exit(main())
