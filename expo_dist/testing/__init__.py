"""For tests and benchmarks only (nothing in the package imports it): model pairs, the float64 reference, RSS."""

from .reference import assert_exact, assert_same
from .rss import TreeSampler, fmt_bytes
from .synth import make_pair

__all__ = ["assert_exact", "assert_same", "TreeSampler", "fmt_bytes", "make_pair"]
