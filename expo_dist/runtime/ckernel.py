"""The C kernel (expo_dist/runtime/_ckernel.c, built at install where a compiler is there), usable without torch.

It works on raw bytes (anything with the buffer protocol) and dtype codes, so a CPU worker that has it needs
neither torch nor its ~0.8 s import and ~250 MiB of resident memory. Same bytes as kernel.Kernel's torch ops.
Settings.kernel = "torch" (EXPO_KERNEL=torch) has the workers run the torch ops instead (tests compare the two).
"""

from __future__ import annotations

from ..formats.dtypes import KERNEL_FLOATS

try:
    from . import _ckernel
except ImportError:  # pragma: no cover - depends on the install
    _ckernel = None

CODES = {name: code for code, name in enumerate(KERNEL_FLOATS)}  # the C kernel's dtype codes: F64=0 F32=1 F16=2 BF16=3


def available() -> bool:
    """Whether the C kernel is built in this install."""
    return _ckernel is not None


def extrapolate(a, a_dtype: str, s, s_dtype: str, out, out_dtype: str, alpha: float) -> int:
    """out = round_once(a + alpha * (a - s)) on raw bytes; returns how many outputs are not finite."""
    return _ckernel.extrapolate(a, CODES[a_dtype], s, CODES[s_dtype], out, CODES[out_dtype], float(alpha))


def count_nonfinite(raw, dtype: str) -> int:
    return _ckernel.count_nonfinite(raw, CODES[dtype])
