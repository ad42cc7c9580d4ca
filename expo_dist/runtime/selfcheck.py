"""The kernel's self-check: a device kernel proves it writes the CPU kernel's bytes before it is trusted with a merge.

check_cases() crafts a few thousand elements per dtype (ties, double-rounding cases, overflow, subnormals, NaNs
with payloads, -0); self_check() runs them through the kernel under test and byte-compares every output with the
CPU kernel's (the C kernel where it is built, else the torch ops on the CPU). Every GPU worker runs it when it
starts (worker.py); scripts/gpu_check.py runs it too.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from ..formats.dtypes import DTYPES, KERNEL_FLOATS, itemsize
from . import ckernel
from .fileio import aligned_empty
from .kernel import Kernel


class KernelCheckFailed(Exception):
    """The kernel under test wrote other bytes than the CPU kernel (the first differing element is named)."""

    def __init__(self, case: str, a_dtype: str, s_dtype: str, out_dtype: str, alpha: float, index: int,
                 a: bytes, s: bytes, got: bytes, expected: bytes, differ: int, total: int, detail: str = ""):
        self.case, self.a_dtype, self.s_dtype, self.out_dtype, self.alpha = case, a_dtype, s_dtype, out_dtype, alpha
        self.index, self.a, self.s, self.got, self.expected = index, a, s, got, expected
        self.differ, self.total = differ, total
        if detail:
            msg = f"{case} ({a_dtype}, {s_dtype} -> {out_dtype}, alpha {alpha!r}): {detail}"
        else:
            msg = (f"{case} ({a_dtype}, {s_dtype} -> {out_dtype}, alpha {alpha!r}): element {index} "
                   f"(a={_hex(a)}, s={_hex(s)}) is {_hex(got)}, the CPU kernel writes {_hex(expected)} "
                   f"({differ} of {total} elements differ)")
        super().__init__(msg)


def _hex(b: bytes) -> str:
    """An element's bytes (little endian) as its bit pattern: 0x3f80."""
    return "0x" + bytes(reversed(b)).hex()


# name -> (bits, mantissa bits, numpy unsigned type of that width)
_FMT = {n: (DTYPES[n].itemsize * 8, DTYPES[n].mantissa, np.dtype(f"u{DTYPES[n].itemsize}").type)
        for n in KERNEL_FLOATS}


def _values(bits: np.ndarray, dtype: str) -> np.ndarray:
    """float64 values of bit patterns of dtype (widening is exact)."""
    with np.errstate(invalid="ignore"):  # (signalling NaNs)
        return _widen(bits, dtype)


def _widen(bits: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "BF16":
        return (bits.astype(np.uint32) << np.uint32(16)).view(np.float32).astype(np.float64)
    if dtype == "F16":
        return bits.astype(np.uint16).view(np.float16).astype(np.float64)
    if dtype == "F32":
        return bits.astype(np.uint32).view(np.float32).astype(np.float64)
    return bits.astype(np.uint64).view(np.float64)


def _patterns(dtype: str, rng: np.random.Generator, n: int) -> np.ndarray:
    """n finite bit patterns of dtype, both signs, every exponent (a quarter subnormal, some in the top
    binade), neither zero nor the largest finite value."""
    width, mant, ut = _FMT[dtype]
    top = (1 << (width - 1 - mant)) - 1  # the all-ones exponent: inf / NaN
    exp = rng.integers(0, top, n, dtype=np.int64)
    exp[: n // 4] = 0
    exp[n // 4: n // 4 + n // 16] = top - 1
    m = rng.integers(0, 1 << mant, n, dtype=np.uint64)
    mag = (exp.astype(np.uint64) << np.uint64(mant)) | m
    largest = np.uint64((top << mant) - 1)
    mag = np.where(mag == 0, np.uint64(1), np.where(mag == largest, largest - np.uint64(1), mag))
    sign = rng.integers(0, 2, n, dtype=np.uint64) << np.uint64(width - 1)
    return (mag | sign).astype(ut)


def _limits(dtype: str) -> tuple[float, float, float, float]:
    """(largest finite, half its ulp, smallest subnormal, smallest normal) of dtype."""
    width, mant, _ = _FMT[dtype]
    ebits = width - 1 - mant
    emax = (1 << (ebits - 1)) - 1
    emin = 1 - emax
    p = mant + 1
    return (2 - 2.0 ** (1 - p)) * 2.0 ** emax, 2.0 ** (emax - p), 2.0 ** (emin - p + 1), 2.0 ** emin


def _specials_f64(dtype: str) -> np.ndarray:
    """float64 values at the edges of dtype's rounding: overflow ties, subnormal ties, zeros, inf, NaN."""
    max_f, half, min_sub, min_norm = _limits(dtype)
    vals = [0.0, -0.0, np.inf, -np.inf, 1.0, -1.0, max_f, -max_f,
            max_f + half, -(max_f + half),  # exactly halfway to the next binade: overflows to inf
            max_f + half * (1 - 2.0 ** -40), -(max_f + half * (1 - 2.0 ** -40)),  # just below: max
            max_f + half * (1 + 2.0 ** -40), max_f + half / 2, 1e300, -1e300, 1.7976931348623157e308,
            min_sub, -min_sub, min_sub / 2, -min_sub / 2,  # half the smallest subnormal: a tie to +-0
            min_sub / 2 * (1 + 2.0 ** -40), -min_sub / 2 * (1 + 2.0 ** -40), min_sub / 2 * (1 - 2.0 ** -40),
            min_sub * 1.5, min_sub * 2.5, -min_sub * 2.5, min_sub * 2.5 * (1 + 2.0 ** -45), min_sub / 4,
            1e-300, -1e-300, 5e-324, -5e-324, min_norm, -min_norm, min_norm - min_sub / 2,
            min_norm - min_sub / 2 * (1 + 2.0 ** -40), min_norm - min_sub / 2 * (1 - 2.0 ** -40)]
    nans = np.array([0x7FF8000000000000, 0xFFF8000000000000, 0x7FF8000000000001, 0x7FF0000000000001,
                     0xFFF4000000000000], dtype=np.uint64).view(np.float64)  # quiet, negative, payloads, signalling
    return np.concatenate([np.array(vals, dtype=np.float64), nans])


def _nan_patterns(dtype: str) -> list[int]:
    """NaN bit patterns of dtype: quiet, negative, with payloads, signalling."""
    width, mant, _ = _FMT[dtype]
    exp = ((1 << (width - 1 - mant)) - 1) << mant
    sign, quiet = 1 << (width - 1), 1 << (mant - 1)
    return [exp | quiet, sign | exp | quiet, exp | quiet | 1, exp | 1, sign | exp | 3]


def _edge_patterns(dtype: str) -> list[int]:
    """Bit patterns at dtype's edges: +-0, +-inf, NaNs, +-largest finite, +-smallest subnormal and normal."""
    width, mant, _ = _FMT[dtype]
    sign = 1 << (width - 1)
    inf = ((1 << (width - 1 - mant)) - 1) << mant
    out = []
    for mag in (0, inf, inf - 1, 1, 1 << mant, (1 << mant) - 1):
        out += [mag, sign | mag]
    return out + _nan_patterns(dtype)


def _bytes_of(values: np.ndarray, dtype: str) -> np.ndarray:
    """float64 values as raw bytes of dtype: F64 as they are, F32 rounded by numpy (inputs only: any value
    will do), BF16 the top half of the float32 (truncated)."""
    if dtype == "F64":
        return values.astype(np.float64).view(np.uint8)
    with np.errstate(over="ignore", invalid="ignore"):
        f32 = values.astype(np.float32)
    if dtype == "F32":
        return f32.view(np.uint8)
    if dtype == "F16":
        with np.errstate(over="ignore", invalid="ignore"):
            return values.astype(np.float16).view(np.uint8)
    return (f32.view(np.uint32) >> np.uint32(16)).astype(np.uint16).view(np.uint8)


def _bytes(bits: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(bits).view(np.uint8)


def check_cases() -> list[tuple]:
    """The self-check's cases: (name, a dtype, a bytes, s dtype, s bytes, out dtype, alpha). Deterministic.

    For each output dtype the kernel writes (BF16, F16, F32; F64 too):
    - round: float64 inputs and alpha 0, so the output is a rounded once: midpoints between neighbours
      (ties to even), midpoints moved by 2^-30 relative and by one float64 ulp (double rounding through
      float32 gets these wrong), overflow to inf at exactly the tie above the largest value and not just
      below, subnormal ties, +-0, +-inf, NaNs with payloads, and values across every binade;
    - ties: a and s one ulp apart in dtype with alpha 0.5 (the result is a midpoint), 0.5 + 2^-30 (just past
      it: the double-rounding case) and 0.5 + 2^-20, including the largest value (overflows) and subnormals;
    - mixed / same: random a and s (the SFT in float32, or in the same dtype), NaN, inf, -0, subnormal and
      largest-value inputs, alpha 0.3 and 2.5 (large alphas overflow)."""
    rng = np.random.default_rng(20240601)
    cases = []
    for out in ("BF16", "F16", "F32", "F64"):
        width, mant, ut = _FMT[out]
        if out != "F64":
            p = _patterns(out, rng, 400)
            lo, hi = _values(p, out), _values(p + ut(1), out)
            mids = (lo + hi) / 2  # exact in float64
            moved = np.concatenate([mids * (1 + 2.0 ** -30), mids * (1 - 2.0 ** -30),
                                    np.nextafter(mids, np.inf), np.nextafter(mids, -np.inf)])
            emax = (1 << (width - 2 - mant)) - 1
            e = rng.integers(1 - emax - mant - 4, emax + 3, 600)  # every binade, subnormals, beyond the largest
            wide = (rng.random(600) + 0.5) * np.exp2(e.astype(np.float64)) * rng.choice([-1.0, 1.0], 600)
            x = np.concatenate([mids, moved, _specials_f64(out), wide])
            cases.append((f"{out} rounding", "F64", _bytes(x), "F64", _bytes(np.zeros_like(x)), out, 0.0))
            # a and s one ulp apart (s toward zero, or away from it); plus the largest value and +-0
            a = _patterns(out, rng, 1000)
            down = rng.integers(0, 2, a.size).astype(bool)
            s = np.where(down, a - ut(1), a + ut(1)).astype(ut)
            mag_max = ut(((1 << (width - 1 - mant)) - 1) << mant) - ut(1)  # largest finite magnitude
            sign = ut(1 << (width - 1))
            a = np.concatenate([a, [mag_max, mag_max | sign, mag_max, ut(0), sign]]).astype(ut)
            s = np.concatenate([s, [mag_max - ut(1), (mag_max - ut(1)) | sign, ut(1), ut(1), ut(0)]]).astype(ut)
            for alpha in (0.5, 0.5 + 2.0 ** -30, 0.5 + 2.0 ** -20):
                cases.append((f"{out} ties", out, _bytes(a), out, _bytes(s), out, alpha))
        # random values near each other and edge patterns, s in float32 (BF16 for an F32 output) and in out
        a = _patterns(out, rng, 1000)
        av = _values(a, out)
        edges = np.array(_edge_patterns(out), dtype=ut)
        a = np.concatenate([a, edges, edges[::-1]]).astype(ut)
        for s_dtype in ("F32" if out != "F32" else "BF16", out):
            sv = av * (1 + rng.normal(0, 1e-3, av.size))
            sv[::7] = rng.normal(0, 1, sv[::7].size)  # and some unrelated
            s_raw = np.concatenate([_bytes_of(sv, s_dtype),
                                    _bytes(np.array(_edge_patterns(s_dtype), dtype=_FMT[s_dtype][2])),
                                    _bytes_of(np.full(edges.size, -1.5), s_dtype)])
            for alpha in (0.3, 2.5):
                cases.append((f"{out} mixed" if s_dtype != out else f"{out} same", out, _bytes(a), s_dtype,
                              s_raw, out, alpha))
    return cases


def self_check(device: str | torch.device = "cuda", kernel: Kernel | None = None, cases: list | None = None,
               use_c: bool = True) -> dict:
    """Prove a kernel writes, byte for byte, what the CPU kernel writes (the C kernel where it is built and
    use_c, i.e. Settings.kernel is not "torch"; else the torch ops on the CPU) for the cases of check_cases():
    a few thousand elements per dtype.

    kernel: the kernel under test (anything with Kernel.extrapolate_raw), by default Kernel(device) with its
    torch ops (on a CPU too, where it is then checked against the C kernel). Its inputs and outputs are in
    page-locked memory where it runs on a GPU, as a worker's are. Raises KernelCheckFailed at the first
    case that differs (bytes or the count of non-finite values); other errors (a CUDA error) propagate.
    cases: a subset of check_cases() (tests). Returns what was checked:
    {"elements", "cases", "seconds", "reference"}."""
    t0 = time.perf_counter()
    kernel = kernel if kernel is not None else Kernel(device, use_c=False)
    pin = torch.device(kernel.device).type == "cuda"
    use_c = use_c and ckernel.available()
    ref_kernel = None if use_c else Kernel("cpu", use_c=False)
    elements = 0
    cases = check_cases() if cases is None else cases
    for name, a_dt, a_raw, s_dt, s_raw, out_dt, alpha in cases:
        n = a_raw.size // itemsize(a_dt)
        assert s_raw.size == n * itemsize(s_dt)
        want = np.zeros(n * itemsize(out_dt), dtype=np.uint8)
        if use_c:
            want_bad = ckernel.extrapolate(a_raw, a_dt, s_raw, s_dt, want, out_dt, alpha)
            want_in = ckernel.count_nonfinite(a_raw, a_dt) + ckernel.count_nonfinite(s_raw, s_dt)
        else:
            want_bad, want_in = ref_kernel.extrapolate_raw(a_raw, a_dt, s_raw, s_dt, [want], out_dt, [alpha])
        bufs = []
        for src in (a_raw, s_raw, want):
            buf = aligned_empty(src.size, pin)
            buf[:] = 0 if src is want else src
            bufs.append(buf)
        a_buf, s_buf, got = bufs
        got[:] = 0xA5  # every byte must be written
        got_bad, got_in = kernel.extrapolate_raw(a_buf, a_dt, s_buf, s_dt, [got], out_dt, [alpha])
        size = itemsize(out_dt)
        if not np.array_equal(got, want):
            ut = _FMT[out_dt][2]
            diff = np.flatnonzero(got.view(ut) != want.view(ut))
            i = int(diff[0])
            raise KernelCheckFailed(name, a_dt, s_dt, out_dt, alpha, i,
                                    a_raw[i * itemsize(a_dt): (i + 1) * itemsize(a_dt)].tobytes(),
                                    s_raw[i * itemsize(s_dt): (i + 1) * itemsize(s_dt)].tobytes(),
                                    got[i * size: (i + 1) * size].tobytes(), want[i * size: (i + 1) * size].tobytes(),
                                    int(diff.size), n)
        if (got_bad, got_in) != (want_bad, want_in):
            raise KernelCheckFailed(name, a_dt, s_dt, out_dt, alpha, -1, b"", b"", b"", b"", 0, n,
                                    detail=f"same bytes, but it counts {got_bad} non-finite outputs and {got_in} "
                                           f"non-finite inputs where the CPU kernel counts {want_bad} and {want_in}")
        elements += n
    return {"elements": elements, "cases": len(cases), "seconds": round(time.perf_counter() - t0, 4),
            "reference": "C kernel" if use_c else "torch ops on the CPU"}
