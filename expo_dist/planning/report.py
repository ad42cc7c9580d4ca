"""The plan report: what a merge will do, from headers alone."""

from __future__ import annotations

from collections import Counter

from ..settings import Settings
from .plan import Plan
from .windows import CHUNK_BYTES


def plan_report(plan: Plan, spec, slots: int = Settings.slots) -> dict:
    """slots: windows in flight per worker (Settings.slots)."""
    ops = Counter(d.op for d in plan.decisions.values())
    largest = max((t.nbytes for t in plan.tasks), default=0)
    return {
        "sft": spec.sft,
        "aligned": spec.aligned,
        "alpha": spec.alpha,
        "alpha_rules": [r.describe() for r in spec.rules()],
        "outputs": spec.out_dirs() if spec.out else None,
        "device": getattr(spec, "device", "auto"),  # auto | cuda | cpu (--device)
        "tensors": dict(ops),
        "decisions": {n: {"op": d.op, "dtype": d.dtype, "shape": list(d.shape), "note": d.note}
                      for n, d in plan.decisions.items() if d.op != "extrapolate"},
        "bytes_read": plan.bytes_read,
        "bytes_written": plan.bytes_written * plan.n_out,
        "tasks": len(plan.tasks),
        "largest_task_bytes": largest,
        # per worker: `slots` windows of (aligned input + SFT input + one buffer per output), bf16 inputs
        "worker_buffer_bytes": slots * (2 + plan.n_out) * CHUNK_BYTES,
        "shards": [{"file": s.file, "bytes": s.layout.size, "tensors": len(s.layout.tensors)} for s in plan.shards],
        "warnings": plan.warnings,
    }


def format_report(r: dict) -> str:
    lines = [f"ExPO plan: alpha={r['alpha']}",
             "tensors: " + ", ".join(f"{n} {k}" for k, n in sorted(r["tensors"].items())),
             f"read {r['bytes_read'] / 1e9:.3f} GB, write {r['bytes_written'] / 1e9:.3f} GB in {r['tasks']} tasks "
             f"(largest {r['largest_task_bytes'] / 2**20:.0f} MiB); "
             f"worker buffers {r['worker_buffer_bytes'] / 2**20:.0f} MiB"]
    for name, d in r["decisions"].items():
        lines.append(f"  {d['op']:>15}  {name}  {d['note']}")
    lines.append("shards:")
    for s in r["shards"]:
        lines.append(f"  {s['file']}  {s['bytes'] / 1e9:.3f} GB  {s['tensors']} tensors")
    for w in r["warnings"]:
        lines.append(f"warning: {w}")
    return "\n".join(lines)
