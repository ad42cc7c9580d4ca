"""Exact ExPO arithmetic: out = round(a + alpha * (a - s)), computed in float64 and rounded once.

torch's float64 -> bfloat16/float16 conversion goes through float32 and so rounds twice. We round once:
float64 -> float32 with round-to-odd (exact when the float32 result is exact, otherwise the odd neighbour
toward the true value), then float32 -> bf16/f16 with round-to-nearest-even. Round-to-odd onto a format
with at least two more significand bits than the target makes the second rounding equal a single one.
The same torch ops run on CPU and CUDA (plain separate ops, no fused multiply-add), so both give the same bytes.
selfcheck.self_check() proves that on the device at hand: every GPU worker runs it when it starts (worker.py)
and compares a few thousand crafted elements per dtype, byte for byte, with the CPU kernel.
"""

from __future__ import annotations

import torch

from ..formats.dtypes import from_name, itemsize, torch_dtype
from . import ckernel

TILE = 1 << 18  # elements per tile: the float64 work set stays in cache

_ckernel = ckernel._ckernel  # the extension module itself (None where it was not built)


def c_kernel_available() -> bool:
    return ckernel.available()


def _raw(t: torch.Tensor) -> memoryview:
    return memoryview(t.view(torch.uint8).numpy())


class Kernel:
    """Preallocated tiles on one device; extrapolate() works through any length tile by tile."""

    def __init__(self, device: str | torch.device = "cpu", tile: int | None = None, use_c: bool = True):
        self.device = torch.device(device)
        self.use_c = use_c  # False: the torch ops on the CPU too, even where the C kernel is built
        # CPU: tiles that stay in cache. GPU: large tiles, few kernel launches.
        self.tile = tile or (TILE if self.device.type == "cpu" else 1 << 24)
        tile, dev = self.tile, self.device
        self.x = torch.empty(tile, dtype=torch.float64, device=dev)
        self.y = torch.empty(tile, dtype=torch.float64, device=dev)
        self.f32 = torch.empty(tile, dtype=torch.float32, device=dev)
        self.i32 = torch.empty(tile, dtype=torch.int32, device=dev)
        self.m1 = torch.empty(tile, dtype=torch.bool, device=dev)
        self.m2 = torch.empty(tile, dtype=torch.bool, device=dev)

    def extrapolate(self, a: torch.Tensor, s: torch.Tensor, alpha: float, out: torch.Tensor) -> int:
        """out[:] = round_once(a + alpha * (a - s)); a, s, out 1-D on this device, any float dtypes.

        NaN results are written as the canonical quiet NaN of out's dtype. Returns how many outputs are
        not finite."""
        if self.device.type == "cpu" and self.use_c and c_kernel_available():
            return ckernel.extrapolate(_raw(a), from_name(str(a.dtype)), _raw(s), from_name(str(s.dtype)), _raw(out),
                                       from_name(str(out.dtype)), alpha)
        n = out.numel()
        for lo in range(0, n, self.tile):
            hi = min(n, lo + self.tile)
            k = hi - lo
            x, y = self.x[:k], self.y[:k]
            x.copy_(a[lo:hi])
            y.copy_(s[lo:hi])
            torch.sub(x, y, out=y)  # a - s
            y.mul_(alpha)  # alpha * (a - s)
            y.add_(x)  # a + alpha * (a - s)   (x + y == y + x exactly)
            self.round_into(y, out[lo:hi], scratch=x)
        bad = ~torch.isfinite(out)
        nonfinite = int(bad.sum())
        if nonfinite:  # one canonical NaN, whatever sign or payload the arithmetic produced
            out.masked_fill_(torch.isnan(out), float("nan"))
        return nonfinite

    def extrapolate_raw(self, a_raw, a_dtype: str, s_raw, s_dtype: str, outs_raw: list, out_dtype: str,
                        alphas: list[float]) -> tuple[int, int]:
        """outs_raw[k] = round_once(a + alphas[k] * (a - s)) on raw bytes in host memory (numpy uint8 arrays;
        page-locked ones make the copies to and from a GPU asynchronous), dtypes by safetensors name. What a
        worker without the C kernel runs (a GPU worker always). Returns (non-finite outputs, non-finite inputs)."""
        dev = self.device
        a = torch.from_numpy(a_raw).to(dev, non_blocking=True).view(torch_dtype(a_dtype))
        s = torch.from_numpy(s_raw).to(dev, non_blocking=True).view(torch_dtype(s_dtype))
        nonfinite_out = 0
        for alpha, out_raw in zip(alphas, outs_raw):
            host = torch.from_numpy(out_raw)
            if dev.type == "cpu":
                nonfinite_out += self.extrapolate(a, s, alpha, host.view(torch_dtype(out_dtype)))
            else:
                out = torch.empty(len(out_raw) // itemsize(out_dtype), dtype=torch_dtype(out_dtype), device=dev)
                nonfinite_out += self.extrapolate(a, s, alpha, out)
                host.copy_(out.view(torch.uint8))
        return nonfinite_out, self.count_nonfinite(a) + self.count_nonfinite(s)

    def count_nonfinite(self, t: torch.Tensor) -> int:
        if t.device.type == "cpu" and self.use_c and c_kernel_available():
            return ckernel.count_nonfinite(_raw(t), from_name(str(t.dtype)))
        return int((~torch.isfinite(t)).sum())

    def round_into(self, r: torch.Tensor, out: torch.Tensor, scratch: torch.Tensor) -> None:
        """out = r (float64) rounded once to out.dtype. Destroys scratch (same size as r, float64)."""
        if out.dtype == torch.float64:
            out.copy_(r)
            return
        if out.dtype == torch.float32:
            out.copy_(r)
            return
        k = r.numel()
        f, bits, m1, m2 = self.f32[:k], self.i32[:k], self.m1[:k], self.m2[:k]
        f.copy_(r)  # nearest-even float32
        scratch.copy_(f)
        # inexact and even -> move to the odd neighbour on the side of the true value
        torch.ne(scratch, r, out=m1)
        fb = f.view(torch.int32)
        torch.bitwise_and(fb, 1, out=bits)
        torch.logical_and(m1, bits == 0, out=m1)
        torch.logical_and(m1, r == r, out=m1)  # leave NaN alone
        if self.device.type != "cpu" or bool(m1.any()):  # no host sync per tile on a GPU
            # magnitude grows (+1 on the bit pattern) when |float32| < |r|
            torch.lt(scratch.abs_(), r.abs(), out=m2)
            bits.copy_(m2)
            bits.mul_(2).sub_(1).mul_(m1)
            fb.add_(bits)
        out.copy_(f)  # nearest-even to bf16 / f16


def round_f64_to(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Round a float64 tensor once to dtype (reference helper for tests and verify)."""
    x = x.reshape(-1).to(torch.float64)
    out = torch.empty(x.numel(), dtype=dtype, device=x.device)
    k = Kernel(x.device, tile=max(1, min(TILE, x.numel())))
    for lo in range(0, x.numel(), k.tile):
        hi = min(x.numel(), lo + k.tile)
        k.round_into(x[lo:hi].clone(), out[lo:hi], scratch=k.x[: hi - lo])
    return out
