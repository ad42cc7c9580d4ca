"""Verify a merged output: index, headers, sizes, manifest sha256; with the inputs, recompute its tensors."""

from .check import verify
from .verdict import Report

__all__ = ["verify", "Report"]
