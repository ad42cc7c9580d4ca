"""The report phase: the figures as text on stdout (the JSON has them all)."""

from __future__ import annotations

from expo_dist.testing import rss
from expo_dist.testing.rss import fmt_bytes

from .context import ROOT


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


def header(args, results: dict, repeat: int) -> None:
    fig, pair, mach = results["figures"], results["pair"], results["machine"]
    print(f"expo_dist benchmark  {results['when']}  ({mach.get('cpus')} CPUs, {mach.get('ram_gib')} GiB RAM, "
          f"torch {mach.get('torch')}, ray {mach.get('ray')}, git {mach.get('git')})")
    shape = pair.get("shape") or {k: v for k, v in pair.items() if k in ("hidden_size", "num_hidden_layers", "vocab_size")}
    print(f"pair: {pair['source']} {shape}; sft {gb(pair['sft_bytes'])} in {pair['sft_files']} files, "
          f"aligned {gb(pair['aligned_bytes'])} in {pair['aligned_files']} files; "
          f"output {gb(fig['out_bytes'])}; alpha {args.alpha}")
    print(f"merge: {results['merge_command']}" + ("" if results["src"] == ROOT else f"  (expo_dist from {results['src']})"))
    print(f"{fig['page_cache']}; workdir on {results['workdir_fs']}; {repeat} round(s), median reported")


def table(fig: dict, once: list) -> None:
    """The rounds' phases, one row each, then each once-phase's rows."""
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
    for phase in once:
        if phase.NAME in fig:
            print(*phase.rows(fig[phase.NAME], fig), sep="\n")


def floor_notes(fig: dict) -> None:
    if "io_floor" not in fig:
        return
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


def print_report(args, results: dict, worst_rss: dict, repeat: int, once: list) -> None:
    """Everything on stdout: header, the phase table, the floor's notes, each once-phase's notes, RSS, memory."""
    fig = results["figures"]
    header(args, results, repeat)
    table(fig, once)
    floor_notes(fig)
    for phase in once:
        if phase.NAME in fig:
            for line in phase.notes(fig[phase.NAME], fig):
                print(line)
    idem = fig["identical_outputs_across_runs"]
    if repeat > 1 and idem is not None:
        print(f"outputs identical across runs (sha256): {'yes' if idem else 'NO'}")
    rs = fig["rss"]
    print(f"processes over 1 GiB RSS: {', '.join(rs['over_1gib']) if rs['over_1gib'] else 'none'}")
    print_rss(worst_rss, "peak RSS per process of the merge" + (" (round with the largest worker peak)"
                                                                  if repeat > 1 else ""))
    if "memory" in fig:
        mm = fig["memory"]
        print(f"\nmemory criterion: largest tensor {fmt_bytes(mm['largest_tensor_bytes'])}, --max-task-bytes "
              f"{mm['max_task_bytes']}: driver and every MergeWorker < 1 GiB RSS: max "
              f"{fmt_bytes(mm['driver_and_workers_max_rss'])}: {'PASS' if mm['pass'] else 'FAIL'} "
              f"(all processes of the tree: max {fmt_bytes(mm['all_processes_max_rss'])})")
