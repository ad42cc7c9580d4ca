"""Planning, pure (no Ray, no I/O): match tensors, choose ops, lay out shards, cut tasks and windows, report."""

from .plan import (
                   COPY,
                   EXTRAPOLATE,
                   Plan,
                   Segment,
                   Shard,
                   Task,
                   TensorDecision,
                   make_plan,
                   natural_key,
                   parse_size,
                   tensor_sources,
)
from .report import format_report, plan_report
from .rules import Rule, alphas_for, parse_alpha, parse_rules, show_value, unused
from .windows import ALIGN, CHUNK_BYTES, Window, windows

__all__ = ["COPY", "EXTRAPOLATE", "Plan", "Segment", "Shard", "Task", "TensorDecision", "make_plan",
           "natural_key", "parse_size", "tensor_sources", "format_report", "plan_report", "Rule", "alphas_for",
           "parse_alpha", "parse_rules", "show_value", "unused", "ALIGN", "CHUNK_BYTES", "Window", "windows"]
