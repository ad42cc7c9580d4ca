"""The exact kernel: float64 arithmetic rounded ONCE to bf16 / f16 / f32.

The reference here is independent of the code under test: an exact rational rounding (fractions.Fraction)
that picks the nearest representable value of the target format by comparing the two neighbouring candidates,
ties to even, IEEE overflow to inf, gradual underflow. For float16 numpy's float64 -> float16 cast (which rounds
once, correctly) is a second reference; for float32 numpy's float64 -> float32 cast is the reference.
"""

from __future__ import annotations

import functools
import math
import random
from fractions import Fraction

import numpy as np
import pytest
import torch

from expo_dist.runtime.kernel import Kernel, round_f64_to

# precision p (significand bits incl. the implicit one), emin, emax
FORMATS = {torch.bfloat16: (8, -126, 127), torch.float16: (11, -14, 15), torch.float32: (24, -126, 127)}
BITS_VIEW = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}
HALF = Fraction(1, 2)


def ref_round(x: float, dtype: torch.dtype) -> float:
    """x (a Python float = IEEE double) rounded once to dtype, by exact rational arithmetic."""
    p, emin, emax = FORMATS[dtype]
    if math.isnan(x) or math.isinf(x):
        return x
    neg = math.copysign(1.0, x) < 0
    q = abs(Fraction(x))
    if q == 0:
        return -0.0 if neg else 0.0
    e = q.numerator.bit_length() - q.denominator.bit_length()
    if Fraction(2) ** e > q:
        e -= 1
    assert Fraction(2) ** e <= q < Fraction(2) ** (e + 1)
    e = max(e, emin)  # below the normal range the spacing stays that of the lowest binade: subnormals
    ulp = Fraction(2) ** (e - p + 1)
    m = q / ulp
    lo = m.numerator // m.denominator  # candidates lo*ulp <= q < (lo+1)*ulp
    below, above = q - lo * ulp, (lo + 1) * ulp - q
    if above < below or (above == below and lo % 2 == 1):
        n = lo + 1
    else:
        n = lo
    v = n * ulp
    max_finite = (2 - Fraction(2) ** (1 - p)) * Fraction(2) ** emax
    r = math.inf if v > max_finite else float(v)  # float(v) is exact: v has at most p significant bits
    return -r if neg else r


def ref_tensor(xs, dtype) -> torch.Tensor:
    return torch.tensor([ref_round(float(x), dtype) for x in xs], dtype=torch.float64)


def assert_same(got: torch.Tensor, want64: torch.Tensor, what=""):
    """Bit-level equality of values given as float64 (NaN == NaN, -0 != +0)."""
    g = got.to(torch.float64)  # widening is exact
    assert g.shape == want64.shape
    nan_g, nan_w = torch.isnan(g), torch.isnan(want64)
    bad = (nan_g != nan_w) | (~nan_w & ((g != want64) | (torch.signbit(g) != torch.signbit(want64))))
    if bad.any():
        idx = torch.nonzero(bad).flatten()[:10].tolist()
        raise AssertionError(f"{what}: {int(bad.sum())} of {g.numel()} wrong, e.g. "
                             + ", ".join(f"[{i}] got {g[i].item()!r} want {want64[i].item()!r}" for i in idx))


def from_bits(bits: list[int], dtype) -> torch.Tensor:
    """float64 values of the given bit patterns of dtype (widening is exact)."""
    return torch.tensor(bits, dtype=torch.int64).to(BITS_VIEW[dtype]).view(dtype).to(torch.float64)


def representable(dtype, rng, n, subnormal=False) -> list[int]:
    """Random finite bit patterns of dtype (both signs); with subnormal=True only subnormals."""
    p, _, _ = FORMATS[dtype]
    width = 16 if dtype != torch.float32 else 32
    mant_bits = p - 1
    exp_all = (1 << (width - 1 - mant_bits)) - 1
    out = []
    while len(out) < n:
        sign = rng.randrange(2) << (width - 1)
        exp = 0 if subnormal else rng.randrange(exp_all)  # exp_all would be inf/nan
        mant = rng.randrange(1, 1 << mant_bits) if subnormal else rng.randrange(1 << mant_bits)
        b = sign | (exp << mant_bits) | mant
        out.append(b - (1 << width) if b >= 1 << (width - 1) else b)  # signed, for the int view
    return out


def next_up_mag(bits: list[int], dtype) -> list[int]:
    """The neighbour of larger magnitude (sign-magnitude: pattern + 1), for finite non-max patterns."""
    return [b + 1 for b in bits]


def midpoints(dtype, rng, n, subnormal=False) -> torch.Tensor:
    bits = representable(dtype, rng, n, subnormal)
    lo, hi = from_bits(bits, dtype), from_bits(next_up_mag(bits, dtype), dtype)
    ok = torch.isfinite(hi)
    mid = (lo[ok] + hi[ok]) / 2  # exact in float64: both have <= 24 significant bits
    return mid


def perturbed(mid: torch.Tensor) -> torch.Tensor:
    """Midpoints moved by tiny relative amounts both ways (all exact in float64)."""
    outs = []
    for k in (26, 30, 40, 52):
        outs += [mid * (1 + 2.0 ** -k), mid * (1 - 2.0 ** -k)]
    outs.append(torch.nextafter(mid, torch.full_like(mid, math.inf)))
    outs.append(torch.nextafter(mid, torch.full_like(mid, -math.inf)))
    return torch.cat(outs)


def specials(dtype) -> torch.Tensor:
    p, emin, emax = FORMATS[dtype]
    max_f = (2 - 2.0 ** (1 - p)) * 2.0 ** emax
    half_ulp_max = 2.0 ** (emax - p)
    min_sub = 2.0 ** (emin - p + 1)
    min_norm = 2.0 ** emin
    vals = [0.0, -0.0, math.nan, -math.nan, math.inf, -math.inf, 1.0, -1.0,
            max_f, -max_f, max_f + half_ulp_max, -(max_f + half_ulp_max),  # ties at the top overflow
            max_f + half_ulp_max * (1 - 2.0 ** -30), max_f + half_ulp_max * (1 + 2.0 ** -30),
            max_f + half_ulp_max / 2, 1e300, -1e300, 1.7976931348623157e308, -1.7976931348623157e308,
            min_sub, -min_sub, min_sub / 2, -min_sub / 2,  # half the smallest subnormal: tie to +-0
            min_sub / 2 * (1 + 2.0 ** -40), -min_sub / 2 * (1 + 2.0 ** -40),  # just above: the subnormal
            min_sub / 2 * (1 - 2.0 ** -40), min_sub * 1.5, min_sub * 2.5, min_sub * 2.5 * (1 + 2.0 ** -45),
            min_sub / 4, 1e-300, -1e-300, 5e-324, -5e-324,
            min_norm, min_norm - min_sub / 2, min_norm - min_sub / 2 * (1 + 2.0 ** -40),
            min_norm - min_sub / 2 * (1 - 2.0 ** -40), -min_norm, 2.0 ** emax, 2.0 ** (emax + 1)]
    return torch.tensor(vals, dtype=torch.float64)


def random_wide(rng, n, lo_exp, hi_exp) -> torch.Tensor:
    vals = []
    for _ in range(n):
        m = rng.random() + 0.5
        vals.append((-1) ** rng.randrange(2) * math.ldexp(m, rng.randrange(lo_exp, hi_exp)))
    return torch.tensor(vals, dtype=torch.float64)


@functools.cache
def value_set(dtype, seed=0) -> torch.Tensor:
    rng = random.Random(seed)
    p, emin, emax = FORMATS[dtype]
    mids = torch.cat([midpoints(dtype, rng, 1500), midpoints(dtype, rng, 500, subnormal=True)])
    exact = from_bits(representable(dtype, rng, 500), dtype)
    return torch.cat([
        random_wide(rng, 4000, emin - p - 4, emax + 3),  # all binades, subnormal range, beyond max
        mids, perturbed(mids), exact, specials(dtype),
    ])


@functools.cache
def expected(dtype, seed, ref_dtype=None) -> torch.Tensor:
    """Fraction-reference rounding of value_set(dtype, seed) to ref_dtype (default dtype); cached."""
    return ref_tensor(value_set(dtype, seed), ref_dtype or dtype)


# ---- the reference itself (so that a mistake in it cannot hide a mistake in the code) ----

def test_reference_agrees_with_numpy_float16_and_float32():
    for dtype, npdt in ((torch.float16, np.float16), (torch.float32, np.float32)):
        x = value_set(dtype, 0)
        with np.errstate(over="ignore"):
            want = torch.from_numpy(x.numpy().astype(npdt).astype(np.float64))
        assert_same(expected(dtype, 0), want, f"reference vs numpy {npdt.__name__}")


def test_reference_hand_cases():
    bf, h = torch.bfloat16, torch.float16
    assert ref_round(1 + 2 ** -8, bf) == 1.0  # tie -> even (1.0)
    assert ref_round(1 + 3 * 2 ** -8, bf) == 1 + 2 ** -6  # tie -> even (1 + 2*2^-7)
    assert ref_round(1 + 2 ** -8 + 2 ** -40, bf) == 1 + 2 ** -7
    assert ref_round(65520.0, h) == math.inf and ref_round(65519.0, h) == 65504.0
    assert ref_round(2.0 ** -25, h) == 0.0 and ref_round(2.0 ** -25 * (1 + 2 ** -30), h) == 2.0 ** -24
    assert math.copysign(1, ref_round(-(2.0 ** -140), bf)) == -1 and ref_round(-(2.0 ** -140), bf) == 0
    assert ref_round(2.0 ** -133, bf) == 2.0 ** -133  # smallest bf16 subnormal


# ---- round_f64_to ----

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "f16"])
def test_round_once_matches_exact_reference(dtype):
    x = value_set(dtype, 0)
    want = expected(dtype, 0)
    got = round_f64_to(x, dtype)
    assert got.dtype == dtype
    assert_same(got, want, "round_f64_to vs Fraction reference")

    # The set must contain values where rounding through float32 first (what a plain .to() does) is wrong;
    # otherwise this test could not tell a naive implementation from a correct one.
    naive = x.to(torch.float32).to(dtype).to(torch.float64)
    wrong = ~(torch.isnan(naive) & torch.isnan(want)) & (naive != want)
    assert int(wrong.sum()) > 100


def test_round_once_float16_matches_numpy():
    x = value_set(torch.float16, 0)
    with np.errstate(over="ignore"):
        want = torch.from_numpy(x.numpy().astype(np.float16).astype(np.float64))
    assert_same(round_f64_to(x, torch.float16), want, "round_f64_to vs numpy float16")


def test_round_once_subnormals_and_edges():
    for dtype in (torch.bfloat16, torch.float16):
        rng = random.Random(5)
        subs = from_bits(representable(dtype, rng, 300, subnormal=True), dtype)
        mids = midpoints(dtype, rng, 300, subnormal=True)
        x = torch.cat([subs, mids, perturbed(mids), specials(dtype)])
        want = ref_tensor(x, dtype)
        assert_same(round_f64_to(x, dtype), want, f"subnormals {dtype}")
        # the subnormal set really is subnormal and non-zero where it should be
        p, emin, _ = FORMATS[dtype]
        assert (subs.abs() < 2.0 ** emin).all() and (subs != 0).all()


def test_round_once_overflow_zero_nan_inf():
    for dtype in (torch.bfloat16, torch.float16):
        p, _, emax = FORMATS[dtype]
        max_f = (2 - 2.0 ** (1 - p)) * 2.0 ** emax
        half = 2.0 ** (emax - p)
        x = torch.tensor([max_f + half, -(max_f + half), max_f + half * (1 - 2.0 ** -40), 1e300,
                          0.0, -0.0, math.inf, -math.inf, math.nan], dtype=torch.float64)
        got = round_f64_to(x, dtype).to(torch.float64)
        assert got[0] == math.inf and got[1] == -math.inf and got[2] == max_f and got[3] == math.inf
        assert got[4] == 0 and not torch.signbit(got[4]) and got[5] == 0 and torch.signbit(got[5])
        assert got[6] == math.inf and got[7] == -math.inf and torch.isnan(got[8])


def test_round_float32_equals_numpy():
    x = torch.cat([value_set(torch.float32, 0), value_set(torch.bfloat16, 0)])
    with np.errstate(over="ignore"):
        want = torch.from_numpy(x.numpy().astype(np.float32).astype(np.float64))
    got = round_f64_to(x, torch.float32)
    assert got.dtype == torch.float32
    assert_same(got, want, "round_f64_to float32 vs numpy")
    assert_same(got[: value_set(torch.float32, 0).numel()], expected(torch.float32, 0),
                "round_f64_to float32 vs Fraction")


def test_round_float64_is_identity():
    x = value_set(torch.bfloat16, 0)
    assert_same(round_f64_to(x, torch.float64), x, "float64")


def test_round_accepts_2d_input():
    x = value_set(torch.bfloat16, 0)
    want = expected(torch.bfloat16, 0)
    got = round_f64_to(x.reshape(1, -1), torch.bfloat16)
    assert got.shape == (x.numel(),)
    assert_same(got, want, "2-D input")


def test_round_longer_than_one_tile_float16_matches_numpy():
    from expo_dist.runtime.kernel import TILE

    base = value_set(torch.float16, 0)
    reps = (TILE + 12345) // base.numel() + 1
    x = base.repeat(reps)[: TILE + 12345]
    x = x * torch.pow(2.0, torch.randint(-2, 3, (x.numel(),), generator=torch.Generator().manual_seed(0)))
    with np.errstate(over="ignore"):
        want = torch.from_numpy(x.numpy().astype(np.float16).astype(np.float64))
    assert_same(round_f64_to(x, torch.float16), want, "past one tile")


# ---- extrapolate ----

def crafted_pairs():
    """(a in bf16, s in float32) whose float64 result a + 0.5 (a - s) lies a quarter float32 ulp off a bf16
    midpoint, so that rounding via float32 lands exactly on the midpoint and then may tie the wrong way."""
    a_vals, s_vals = [], []
    for j in range(-30, 30):
        for m in (0, 1):
            for eps_sign in (1, -1):
                for sign in (1, -1):
                    a = 2.0 ** j * (1 + m * 2.0 ** -7)  # bf16-representable
                    eps = eps_sign * 2.0 ** (j - 25)
                    # r = 1.5a - 0.5s = a + 2^(j-8) + eps  <=>  s = a - 2^(j-7) - 2 eps  (just below 2^j)
                    s = a - 2.0 ** (j - 7) - 2 * eps
                    if float(np.float32(s)) != s:  # s above 2^j: too coarse for the quarter ulp
                        continue
                    a_vals.append(sign * a)
                    s_vals.append(sign * s)
    return (torch.tensor(a_vals, dtype=torch.float64).to(torch.bfloat16),
            torch.tensor(s_vals, dtype=torch.float32))


def make_inputs(n, a_dtype, s_dtype, seed):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, generator=g, dtype=torch.float64) * 0.02
    # a spread of magnitudes, some far from 0.02
    scale = torch.pow(2.0, torch.randint(-30, 10, (n,), generator=g).to(torch.float64))
    scale[: n // 2] = 1.0
    a = (base * scale).to(a_dtype)
    s = (a.to(torch.float64) + torch.randn(n, generator=g, dtype=torch.float64) * 0.001 * scale).to(s_dtype)
    return a, s


def python_reference(a: torch.Tensor, s: torch.Tensor, alpha: float, dtype, idx) -> torch.Tensor:
    """Per element, in plain Python floats (IEEE double, no fused ops), rounded once by Fraction."""
    out = []
    for i in idx:
        av, sv = float(a[i]), float(s[i])
        out.append(ref_round(av + alpha * (av - sv), dtype))
    return torch.tensor(out, dtype=torch.float64)


@pytest.fixture(params=["c", "torch"])
def impl(request, monkeypatch):
    """Run each extrapolate() test on both implementations: the C extension and the torch ops."""
    from expo_dist.runtime import kernel

    if request.param == "c":
        if kernel._ckernel is None:
            pytest.skip("C kernel not built in this install")
        assert kernel.c_kernel_available()
    else:
        monkeypatch.setattr(kernel, "c_kernel_available", lambda: False)  # as Settings.kernel "torch" makes it
        assert not kernel.c_kernel_available()
    return request.param


def n_nonfinite(want64: torch.Tensor) -> int:
    return int((~torch.isfinite(want64)).sum())


CANONICAL_NAN = {torch.bfloat16: 0x7FC0, torch.float16: 0x7E00, torch.float32: 0x7FC00000}


def assert_canonical_nans(out: torch.Tensor):
    if out.dtype not in CANONICAL_NAN:
        return
    bits = out.view(BITS_VIEW[out.dtype]).to(torch.int64) & ((1 << (8 * out.element_size())) - 1)
    nan = torch.isnan(out.to(torch.float64))
    assert (bits[nan] == CANONICAL_NAN[out.dtype]).all(), [hex(b) for b in bits[nan].unique().tolist()]


CASES = [
    # a dtype, s dtype, n, tile, alpha
    (torch.bfloat16, torch.bfloat16, 2503, 1000, 0.3),
    (torch.bfloat16, torch.bfloat16, 3001, None, 0.1),
    (torch.float16, torch.float16, 2503, 1000, 0.5),
    (torch.float16, torch.float16, 1777, None, 0.3),
    (torch.float32, torch.float32, 2503, 1000, 0.3),
    (torch.float32, torch.float32, 1001, None, 0.1),
    (torch.bfloat16, torch.float32, 2999, 1000, 0.3),  # mixed: SFT in float32, aligned in bf16
    (torch.float16, torch.float32, 1999, 1000, 0.1),
    (torch.float32, torch.bfloat16, 1500, 1000, 0.5),
    (torch.bfloat16, torch.float64, 1200, 1000, 0.3),
]


@pytest.mark.parametrize("a_dtype,s_dtype,n,tile,alpha", CASES,
                         ids=[f"{str(c[0])[6:]}-{str(c[1])[6:]}-n{c[2]}-tile{c[3]}" for c in CASES])
def test_extrapolate_exact(impl, a_dtype, s_dtype, n, tile, alpha):
    a, s = make_inputs(n, a_dtype, s_dtype, seed=n)
    out_dtype = a_dtype
    out = torch.full((n,), math.nan, dtype=out_dtype)  # every element must be written
    k = Kernel("cpu", tile=tile) if tile else Kernel("cpu")
    bad = k.extrapolate(a, s, alpha, out)

    a64, s64 = a.to(torch.float64), s.to(torch.float64)
    r64 = a64 + (a64 - s64) * alpha
    # all elements: the once-rounded float64 result
    all_want = round_f64_to(r64, out_dtype).to(torch.float64)
    assert_same(out, all_want, "extrapolate vs round_f64_to")
    assert bad == n_nonfinite(all_want)
    # a sample (incl. both ends and the tile boundaries) against the independent reference
    rng = random.Random(n)
    idx = sorted(set(rng.sample(range(n), min(n, 600)) + [0, n - 1] +
                     [i for t in (tile or n,) for j in range(t, n, t) for i in (j - 1, j)]))
    want = python_reference(a, s, alpha, out_dtype, idx)
    assert_same(out[idx], want, "extrapolate vs Fraction reference")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=["bf16", "f16", "f32"])
def test_extrapolate_rounding_edge_cases(impl, dtype):
    """alpha = 0 with float64 inputs: out is a rounded once, so the whole value set (midpoints, +- tiny,
    subnormals, overflow, zeros, NaN, inf) goes through the kernel's own rounding."""
    x = value_set(dtype, 0)
    s = torch.zeros_like(x)
    want = expected(dtype, 0).clone()
    want[torch.isinf(x)] = math.nan  # inf + 0 * (inf - 0) = inf + NaN = NaN
    idx = list(range(0, x.numel(), 97)) + torch.nonzero(~torch.isfinite(x)).flatten().tolist()
    assert_same(want[idx], python_reference(x, s, 0.0, dtype, idx), "the shortcut above")
    out = torch.empty(x.numel(), dtype=dtype)
    bad = Kernel("cpu", tile=4096).extrapolate(x, s, 0.0, out)
    assert_same(out, want, f"edge cases {dtype}")
    assert bad == n_nonfinite(want) > 0
    assert_canonical_nans(out)


def test_extrapolate_mixed_crafted_double_rounding_cases(impl):
    a, s = crafted_pairs()
    a2, s2 = make_inputs(1000, torch.bfloat16, torch.float32, seed=11)
    a, s = torch.cat([a2[:400], a, a2[400:]]), torch.cat([s2[:400], s, s2[400:]])
    n = a.numel()
    want = python_reference(a, s, 0.5, torch.bfloat16, range(n))
    for tile in (1000, 7, None):
        out = torch.empty(n, dtype=torch.bfloat16)
        (Kernel("cpu", tile=tile) if tile else Kernel("cpu")).extrapolate(a, s, 0.5, out)
        assert_same(out, want, f"crafted, tile {tile}")
    # the crafted elements really defeat float64 -> float32 -> bf16
    a64, s64 = a.double(), s.double()
    naive = (a64 + 0.5 * (a64 - s64)).to(torch.float32).to(torch.bfloat16).double()
    assert a.numel() - 1000 == 360
    assert int((naive != want).sum()) >= 120  # m = 0, eps > 0: 60 exponents x 2 signs


def test_extrapolate_bf16_crafted_double_rounding_cases(impl):
    """All-bf16 inputs (the common case, and the C kernel's vectorized path): with s one bf16 ulp below a
    and alpha = 1/2 + 2^-20, a + alpha (a - s) lies 2^-20 ulp beyond the midpoint above a."""
    rng = random.Random(12)
    bits = [b for b in representable(torch.bfloat16, rng, 3000) if 0 < (b & 0x7F80) < 0x7F00]  # normal, not top
    a = from_bits(bits, torch.bfloat16)
    exp = torch.frexp(a).exponent.to(torch.float64)  # a = m 2^e with 0.5 <= |m| < 1
    ulp = torch.pow(2.0, exp - 8)
    s64 = a - torch.sign(a) * ulp
    a_bf, s_bf = a.to(torch.bfloat16), s64.to(torch.bfloat16)
    assert torch.equal(s_bf.double(), s64)  # exactly representable
    alpha = 0.5 + 2.0 ** -20
    want = python_reference(a_bf, s_bf, alpha, torch.bfloat16, range(a.numel()))
    out = torch.empty(a.numel(), dtype=torch.bfloat16)
    Kernel("cpu", tile=1000).extrapolate(a_bf, s_bf, alpha, out)
    assert_same(out, want, "bf16 crafted")
    naive = (a + alpha * (a - s64)).to(torch.float32).to(torch.bfloat16).double()
    assert int((naive != want).sum()) > a.numel() // 4  # the even-mantissa half of them


def test_extrapolate_alpha_zero_returns_aligned_and_nonfinite_follow_ieee(impl):
    a = torch.tensor([1.5, -2.25, 0.0, -0.0, 7.0], dtype=torch.bfloat16)
    s = torch.tensor([1.0, -2.0, 1.0, 0.0, 3.0], dtype=torch.bfloat16)
    out = torch.empty(5, dtype=torch.bfloat16)
    assert Kernel("cpu", tile=3).extrapolate(a, s, 0.0, out) == 0
    got = out.double()
    assert got[[0, 1, 2, 4]].tolist() == [1.5, -2.25, 0.0, 7.0]
    assert got[3] == 0 and torch.signbit(got[3])  # -0 + 0*(-0 - 0) = -0 + (-0) = -0

    a = torch.tensor([math.inf, math.nan, 3.0, -math.inf, 1.0, 3e38, -math.nan], dtype=torch.float32)
    s = torch.tensor([1.0, 1.0, math.inf, -math.inf, math.nan, -3e38, 0.0], dtype=torch.float32)
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        out = torch.empty(7, dtype=dtype)
        bad = Kernel("cpu", tile=4).extrapolate(a.to(dtype), s, 0.5, out)
        got = out.double()
        # inf + 0.5 inf = inf; NaN stays NaN; 3 + 0.5 (3 - inf) = -inf; -inf + 0.5 (-inf + inf) = NaN;
        # 1 + 0.5 NaN = NaN; 3e38 + 0.5 * 6e38 = 6e38 overflows float32 / bf16 to inf; -NaN -> NaN
        assert got[0] == math.inf and torch.isnan(got[1]) and got[2] == -math.inf
        assert torch.isnan(got[3]) and torch.isnan(got[4]) and got[5] == math.inf and torch.isnan(got[6])
        assert bad == 7
        assert_canonical_nans(out)


def test_extrapolate_writes_only_out_and_leaves_inputs(impl):
    a, s = make_inputs(2100, torch.bfloat16, torch.bfloat16, seed=2)
    a0, s0 = a.clone(), s.clone()
    out = torch.empty(2100, dtype=torch.bfloat16)
    Kernel("cpu", tile=1000).extrapolate(a, s, 0.3, out)
    assert torch.equal(a.view(torch.int16), a0.view(torch.int16))
    assert torch.equal(s.view(torch.int16), s0.view(torch.int16))
    # slices of larger buffers (what a worker passes) work too
    big = torch.zeros(3000, dtype=torch.bfloat16)
    Kernel("cpu", tile=1000).extrapolate(a, s, 0.3, big[500:2600])
    assert torch.equal(big[500:2600].view(torch.int16), out.view(torch.int16))
    assert (big[:500] == 0).all() and (big[2600:] == 0).all()


def test_c_and_torch_kernels_write_identical_bytes(monkeypatch):
    from expo_dist.runtime import kernel

    if kernel._ckernel is None:
        pytest.skip("C kernel not built in this install")
    for a_dt, s_dt in ((torch.bfloat16, torch.bfloat16), (torch.float16, torch.float32),
                       (torch.float32, torch.bfloat16)):
        a, s = make_inputs(50_000, a_dt, s_dt, seed=21)
        outs = []
        for mode in ("", "torch"):
            out = torch.empty(a.numel(), dtype=a_dt)
            Kernel("cpu", tile=4096, use_c=mode != "torch").extrapolate(a, s, 0.3, out)
            outs.append(out.view(BITS_VIEW[a_dt]).clone())
        assert torch.equal(outs[0], outs[1])
