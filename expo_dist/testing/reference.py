"""Independent float64 reference for merge tests: no code from expo_dist.kernel.

bf16: round-to-nearest-even done on the float64 bit pattern (normal range; other values fall back to
exact rational arithmetic). f16: numpy's float64 -> float16 conversion, a single correct rounding.
"""

from __future__ import annotations

import json
import os
from fractions import Fraction

import numpy as np
import torch
from safetensors import safe_open


def _bf16_exact_slow(v: float) -> int:
    """Exact RNE of one double to bf16 bits via rationals (subnormals, overflow)."""
    if v != v:
        return 0x7FC0
    sign = 0x8000 if (v < 0 or (v == 0 and np.signbit(v))) else 0
    a = Fraction(abs(v))
    if a == 0:
        return sign
    best = 0
    # candidates: all finite bf16 magnitudes near a; search by binary exponent
    lo = 0
    hi = 0x7F80  # inf
    while hi - lo > 1:  # largest bits with value <= a
        mid = (lo + hi) // 2
        if Fraction(_bits_to_float(mid)) <= a:
            lo = mid
        else:
            hi = mid
    below = lo
    above = lo + 1
    vb = Fraction(_bits_to_float(below))
    if above == 0x7F80:  # overflow threshold: max + half ulp
        half = (Fraction(_bits_to_float(0x7F7F)) - Fraction(_bits_to_float(0x7F7E))) / 2
        return sign | (0x7F80 if a >= Fraction(_bits_to_float(0x7F7F)) + half else below)
    va = Fraction(_bits_to_float(above))
    if a - vb < va - a:
        best = below
    elif a - vb > va - a:
        best = above
    else:
        best = below if below % 2 == 0 else above
    return sign | best


def _bits_to_float(bits: int) -> float:
    return float(np.array([bits << 16], dtype=np.uint32).view(np.float32)[0])


def round_bf16_bits(x: np.ndarray) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float64)
    b = x.view(np.uint64)
    r = (b + np.uint64((1 << 44) - 1) + ((b >> np.uint64(45)) & np.uint64(1))) >> np.uint64(45)
    sign = (r >> np.uint64(18)) & np.uint64(1)
    exp = ((r >> np.uint64(7)) & np.uint64(0x7FF)).astype(np.int64) - 1023 + 127
    mant = r & np.uint64(0x7F)
    out = ((sign << np.uint64(15)) | (np.clip(exp, 0, 255).astype(np.uint64) << np.uint64(7)) | mant).astype(np.uint16)
    orig_exp = ((b >> np.uint64(52)) & np.uint64(0x7FF)).astype(np.int64) - 1023 + 127
    slow = (orig_exp < 1) | (exp > 254) | (orig_exp > 254) | np.isnan(x)
    slow &= x != 0
    zero = x == 0
    out[zero] = np.where(np.signbit(x[zero]), 0x8000, 0).astype(np.uint16)
    for i in np.flatnonzero(slow):
        out[i] = _bf16_exact_slow(float(x[i]))
    return out


def round_once_bytes(x64: np.ndarray, dtype: str) -> bytes:
    if dtype == "BF16":
        return round_bf16_bits(x64).tobytes()
    if dtype == "F16":
        return x64.astype(np.float16).tobytes()
    if dtype == "F32":
        return x64.astype(np.float32).tobytes()
    if dtype == "F64":
        return x64.tobytes()
    raise ValueError(dtype)


def load_model(folder: str) -> dict[str, torch.Tensor]:
    index = os.path.join(folder, "model.safetensors.index.json")
    files = (sorted(set(json.load(open(index))["weight_map"].values())) if os.path.exists(index)
             else ["model.safetensors"])
    out = {}
    for f in files:
        with safe_open(os.path.join(folder, f), framework="pt") as h:
            for k in h.keys():
                out[k] = h.get_tensor(k)
    return out


def load_dtypes(folder: str) -> dict[str, str]:
    index = os.path.join(folder, "model.safetensors.index.json")
    files = (sorted(set(json.load(open(index))["weight_map"].values())) if os.path.exists(index)
             else ["model.safetensors"])
    out = {}
    for f in files:
        with open(os.path.join(folder, f), "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            head = json.loads(fh.read(n))
        out.update({k: v["dtype"] for k, v in head.items() if k != "__metadata__"})
    return out


def expected_bytes(sft: dict, aligned: dict, dtypes: dict[str, str], alpha: float, tie: bool) -> dict[str, bytes]:
    """name -> exact expected bytes of every output tensor."""
    exp = {}
    for name, a in aligned.items():
        if tie and name == "lm_head.weight":
            continue
        s = sft[name]
        if not a.is_floating_point():
            exp[name] = a.contiguous().view(-1).view(torch.uint8).numpy().tobytes()
            continue
        a64 = a.to(torch.float64).numpy()
        s64 = s.to(torch.float64).numpy()
        r = a64.copy()
        rows = s64.shape[0]
        shared = a64[:rows]
        r[:rows] = shared + alpha * (shared - s64)  # float64, same op order as the paper's formula
        if a64.shape[0] > rows:  # vocab extension: extra rows copied
            r[rows:] = a64[rows:]
        exp[name] = round_once_bytes(r.reshape(-1), dtypes[name])
    return exp


def tensor_bytes(t: torch.Tensor) -> bytes:
    return t.contiguous().view(-1).view(torch.uint8).numpy().tobytes()


def assert_exact(out_dir: str, sft_dir: str, aligned_dir: str, alpha: float, tie: bool) -> int:
    """Assert every output element equals the float64 reference rounded once; return elements checked."""
    got = load_model(out_dir)
    exp = expected_bytes(load_model(sft_dir), load_model(aligned_dir), load_dtypes(aligned_dir), alpha, tie)
    assert sorted(got) == sorted(exp), (set(got) ^ set(exp))
    n = 0
    for name, want in exp.items():
        have = tensor_bytes(got[name])
        if have != want:
            g = np.frombuffer(have, np.uint8)
            w = np.frombuffer(want, np.uint8)
            bad = int((g != w).sum())
            raise AssertionError(f"{name}: {bad} of {len(w)} bytes differ from the float64 reference")
        n += got[name].numel()
    return n


def weights(folder) -> list[str]:
    """The weight files and index of a model folder."""
    return sorted(f for f in os.listdir(folder) if f.endswith((".safetensors", ".index.json")))


def assert_same(out, baseline) -> None:
    """Two model folders hold byte-identical weight files and index."""
    assert weights(out) == weights(baseline)
    for f in weights(baseline):
        assert (out / f).read_bytes() == (baseline / f).read_bytes(), f
