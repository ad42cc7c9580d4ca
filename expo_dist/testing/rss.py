"""Peak RSS of a process tree, sampled in a thread: the helper behind scripts/bench.py and scripts/gpu_check.py.

    with TreeSampler(popen.pid) as s:
        popen.wait()
    for p in s.processes(): print(p.role, p.pid, p.peak_rss)

An embedded Ray's processes (gcs_server, raylet, the dashboard/runtime-env agents, and the worker processes
that become `ray::MergeWorker` actors) are all descendants of the driver, so sampling the driver's tree sees
every process of one merge and none of the processes of anything else running on the machine. Roles are
read from the command line, which Ray rewrites (`ray::IDLE` → `ray::MergeWorker` → `ray::MergeWorker.run`),
so a process keeps the most specific role it was ever seen with.

RSS counts resident pages of the process, shared library pages included (torch alone is a few hundred MB of
them); the page cache of files a process reads with pread is not in it.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field

import psutil

GiB = 1 << 30
MiB = 1 << 20

# most specific first: a process seen once as an actor stays an actor
ROLE_RANK = {"driver": 0, "MergeWorker": 1, "gcs_server": 2, "raylet": 2, "ray worker (idle)": 3,
             "ray agent": 3, "other": 4, "unknown": 5}


def classify(name: str, cmdline: list[str], is_root: bool) -> str:
    if is_root:
        return "driver"
    head = cmdline[0] if cmdline else ""
    text = " ".join(cmdline)
    if "ray::MergeWorker" in head or head.startswith("ray::MergeWorker"):
        return "MergeWorker"
    if name == "gcs_server" or head.endswith("/gcs_server"):
        return "gcs_server"
    if name == "raylet" or head.endswith("/raylet"):
        return "raylet"
    if head.startswith("ray::") or "default_worker.py" in text:
        return "ray worker (idle)"
    if any(k in text for k in ("dashboard/agent.py", "runtime_env/agent", "log_monitor.py", "dashboard.py",
                               "monitor.py", "ray_client_server")):
        return "ray agent"
    return "other"


def short_cmd(cmdline: list[str]) -> str:
    """'ray::MergeWorker.run', 'raylet', 'python .../dashboard/agent.py' -> short and readable."""
    if not cmdline:
        return ""
    head = cmdline[0].strip()
    if head.startswith("ray::"):
        return head.split()[0].split(".")[0]  # ray::MergeWorker.run -> ray::MergeWorker
    base = os.path.basename(head)
    if base.startswith("python"):
        args = [a for a in cmdline[1:] if not a.startswith("-")]
        if "-m" in cmdline[1:3]:
            return "python -m " + " ".join(cmdline[cmdline.index("-m") + 1:])[:100]
        if args:
            rest = " ".join(a for a in cmdline[cmdline.index(args[0]) + 1:] if not (a.startswith("--") and "=" in a))
            return ("python " + "/".join(args[0].split("/")[-2:]) + " " + rest)[:100].rstrip()
    return (base + " " + " ".join(cmdline[1:]))[:100].rstrip()


@dataclass
class ProcInfo:
    pid: int
    role: str
    name: str
    cmd: str
    peak_rss: int = 0
    peak_at: float = 0.0  # seconds after the sampler started
    first_seen: float = 0.0
    last_seen: float = 0.0
    samples: int = 0

    def as_dict(self) -> dict:
        return {"pid": self.pid, "role": self.role, "name": self.name, "cmd": self.cmd,
                "peak_rss": self.peak_rss, "peak_rss_mib": round(self.peak_rss / MiB, 1),
                "peak_at_s": round(self.peak_at, 2), "seen_s": [round(self.first_seen, 2), round(self.last_seen, 2)],
                "samples": self.samples}


@dataclass
class TreeSampler:
    """Samples RSS of root_pid and all its descendants every `interval` seconds in a daemon thread."""

    root_pid: int
    interval: float = 0.05
    rescan: float = 0.2  # how often to look for new descendants (children() walks /proc)
    procs: dict[int, ProcInfo] = field(default_factory=dict)
    peak_total: int = 0  # largest sum of RSS over the tree at one instant
    ticks: int = 0

    def __post_init__(self):
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="rss-sampler", daemon=True)
        self._handles: dict[int, psutil.Process] = {}
        self._t0 = time.monotonic()

    # -- context manager -------------------------------------------------------------------------------
    def __enter__(self) -> TreeSampler:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> None:
        self._t0 = time.monotonic()
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    # -- sampling ----------------------------------------------------------------------------------------
    def _scan(self) -> None:
        try:
            root = psutil.Process(self.root_pid)
            found = [root] + root.children(recursive=True)
        except psutil.Error:
            found = []
        for p in found:
            if p.pid not in self._handles:
                self._handles[p.pid] = p

    def _role(self, p: psutil.Process) -> tuple[str, str, str]:
        try:
            name = p.name()
            cmdline = p.cmdline()
        except psutil.Error:
            return "unknown", "", ""
        return classify(name, cmdline, p.pid == self.root_pid), name, short_cmd(cmdline)

    def _sample(self) -> None:
        now = time.monotonic() - self._t0
        total = 0
        for pid, p in list(self._handles.items()):
            try:
                rss = p.memory_info().rss
            except psutil.Error:
                self._handles.pop(pid, None)
                continue
            total += rss
            info = self.procs.get(pid)
            if info is None:
                role, name, cmd = self._role(p)
                info = self.procs[pid] = ProcInfo(pid, role, name, cmd, first_seen=now)
            elif (ROLE_RANK[info.role] > 1 or not info.cmd) and self.ticks % 5 == 0:
                # Ray retitles its workers (ray::IDLE -> ray::MergeWorker), and a process caught between
                # fork and exec has no command line yet: look again
                role, name, cmd = self._role(p)
                if ROLE_RANK[role] < ROLE_RANK[info.role]:
                    info.role, info.name, info.cmd = role, name, cmd
                elif not info.cmd:
                    info.cmd = cmd
            info.samples += 1
            info.last_seen = now
            if rss > info.peak_rss:
                info.peak_rss, info.peak_at = rss, now
        self.peak_total = max(self.peak_total, total)

    def _loop(self) -> None:
        next_scan = 0.0
        while True:
            t = time.monotonic()
            if t >= next_scan:
                self._scan()
                next_scan = t + self.rescan
            self._sample()
            self.ticks += 1
            if self._stop.wait(self.interval):
                break
        # one last look (the tree may have gone already; that is fine)
        self._sample()

    # -- results -----------------------------------------------------------------------------------------
    def processes(self) -> list[ProcInfo]:
        return sorted(self.procs.values(), key=lambda p: (ROLE_RANK[p.role], -p.peak_rss))

    def summary(self, limit: int = GiB) -> dict:
        """Peak RSS by role: driver, max over MergeWorker actors, raylet, gcs_server, the rest; flags."""
        by_role: dict[str, list[ProcInfo]] = {}
        for p in self.procs.values():
            by_role.setdefault(p.role, []).append(p)

        def peak(role):
            ps = by_role.get(role, [])
            return max((p.peak_rss for p in ps), default=None)

        over = [p for p in self.procs.values() if p.peak_rss >= limit]
        return {
            "driver_peak_rss": peak("driver"),
            "worker_peak_rss": peak("MergeWorker"),
            "workers": len(by_role.get("MergeWorker", [])),
            "raylet_peak_rss": peak("raylet"),
            "gcs_peak_rss": peak("gcs_server"),
            "other_peak_rss": max((p.peak_rss for r, ps in by_role.items()
                                   if r not in ("driver", "MergeWorker", "raylet", "gcs_server") for p in ps),
                                  default=None),
            "tree_peak_total_rss": self.peak_total,
            "processes": len(self.procs),
            "samples": self.ticks,
            "ray_in_tree": "raylet" in by_role and "gcs_server" in by_role,
            "over_limit": [p.as_dict() for p in over],
            "limit": limit,
            "per_process": [p.as_dict() for p in self.processes()],
        }


def fmt_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    if n >= GiB:
        return f"{n / GiB:.2f} GiB"
    return f"{n / MiB:.0f} MiB"


def format_table(procs: list[ProcInfo], limit: int = GiB) -> str:
    lines = [f"  {'role':<18} {'pid':>7} {'peak RSS':>10}  {'at':>6}  command"]
    for p in procs:
        flag = f"  <-- over {fmt_bytes(limit)}" if p.peak_rss >= limit else ""
        cmd = p.cmd if len(p.cmd) <= 70 else p.cmd[:67] + "..."
        lines.append(f"  {p.role:<18} {p.pid:>7} {fmt_bytes(p.peak_rss):>10}  {p.peak_at:5.1f}s  {cmd}{flag}")
    return "\n".join(lines)


if __name__ == "__main__":  # sample any command: python scripts/rss.py CMD ...
    import subprocess
    import sys

    proc = subprocess.Popen(sys.argv[1:])
    with TreeSampler(proc.pid) as s:
        rc = proc.wait()
    print(format_table(s.processes()), file=sys.stderr)
    sys.exit(rc)
