/* Exact ExPO kernel for CPUs: out[i] = round_once(a + alpha * (a - s)), in double, rounded once.
 *
 * Double -> bf16/f16 rounds to odd in float first (exact whenever the float is exact, otherwise the odd
 * neighbour toward the true value), then to nearest-even: with >= 2 extra bits in the intermediate this
 * equals one correct rounding. Built with -ffp-contract=off: a fused multiply-add would change results.
 * NaN outputs are canonical positive quiet NaNs (bf16 0x7FC0, f16 0x7E00, f32 0x7FC00000, f64 0x7FF8...)
 * so that every device writes the same bytes. Returns the number of non-finite outputs.
 */
#define PY_SSIZE_T_CLEAN
#define _GNU_SOURCE
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

enum { F64 = 0, F32 = 1, F16 = 2, BF16 = 3 };

static inline float f32_of_bits(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }
static inline uint32_t bits_of_f32(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }

static inline double ld_bf16(uint16_t h) { return (double)f32_of_bits((uint32_t)h << 16); }

static inline double ld_f16(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, e = (h >> 10) & 0x1f, m = h & 0x3ff;
    if (e == 0) {
        double v = (double)m * 0x1p-24;
        return sign ? -v : v;
    }
    if (e == 31) return (double)f32_of_bits(sign | 0x7f800000u | (m << 13));
    return (double)f32_of_bits(sign | ((e + 112) << 23) | (m << 13));
}

/* float bits, rounded to odd from r (r not NaN) */
static inline uint32_t odd_f32(double r) {
    float f = (float)r;
    uint32_t u = bits_of_f32(f);
    double b = (double)f;
    uint32_t adjust = (uint32_t)(b != r) & (~u & 1u); /* inexact and even: branch-free */
    uint32_t step = 2u * (uint32_t)(fabs(b) < fabs(r)) - 1u; /* +1 away from zero, -1 toward */
    return u + adjust * step;
}

static inline uint16_t bf16_rne(uint32_t u) {
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

static inline uint16_t f16_rne(uint32_t u) {
    uint32_t sign = (u >> 16) & 0x8000u, a = u & 0x7fffffffu;
    if (a >= 0x477ff000u) return (uint16_t)(sign | 0x7c00u); /* >= 65520: infinity */
    int E = (int)(a >> 23) - 127;
    if (E >= -14) { /* normal half */
        uint32_t m = a & 0x7fffffu, h = ((uint32_t)(E + 15) << 10) | (m >> 13), rem = m & 0x1fffu;
        if (rem > 0x1000u || (rem == 0x1000u && (h & 1u))) h++;
        return (uint16_t)(sign | h);
    }
    if (a < 0x00800000u) return (uint16_t)sign; /* float zero/subnormal: far below half's range */
    int shift = -(E + 1);
    if (shift >= 25) return (uint16_t)sign;
    uint32_t m = (a & 0x7fffffu) | 0x800000u, h = m >> shift, rem = m & ((1u << shift) - 1), half = 1u << (shift - 1);
    if (rem > half || (rem == half && (h & 1u))) h++;
    return (uint16_t)(sign | h);
}

static inline double load(const char *p, int code, Py_ssize_t i) {
    switch (code) {
    case F64: { double v; memcpy(&v, p + 8 * i, 8); return v; }
    case F32: { float v; memcpy(&v, p + 4 * i, 4); return (double)v; }
    case F16: { uint16_t v; memcpy(&v, p + 2 * i, 2); return ld_f16(v); }
    default: { uint16_t v; memcpy(&v, p + 2 * i, 2); return ld_bf16(v); }
    }
}

/* store r rounded once; returns 1 if the stored value is not finite */
static inline int store(char *p, int code, Py_ssize_t i, double r) {
    if (r != r) {
        switch (code) {
        case F64: { uint64_t q = 0x7ff8000000000000ull; memcpy(p + 8 * i, &q, 8); break; }
        case F32: { uint32_t q = 0x7fc00000u; memcpy(p + 4 * i, &q, 4); break; }
        case F16: { uint16_t q = 0x7e00u; memcpy(p + 2 * i, &q, 2); break; }
        default: { uint16_t q = 0x7fc0u; memcpy(p + 2 * i, &q, 2); break; }
        }
        return 1;
    }
    switch (code) {
    case F64: memcpy(p + 8 * i, &r, 8); break;
    case F32: { float f = (float)r; memcpy(p + 4 * i, &f, 4); return isinf(f) ? 1 : 0; }
    case F16: { uint16_t h = f16_rne(odd_f32(r)); memcpy(p + 2 * i, &h, 2); return (h & 0x7c00u) == 0x7c00u; }
    default: { uint16_t h = bf16_rne(odd_f32(r)); memcpy(p + 2 * i, &h, 2); return (h & 0x7f80u) == 0x7f80u; }
    }
    return isinf(r) ? 1 : 0;
}

/* The common case, written so the compiler vectorizes it: no branches. Baseline x86-64 (SSE2) lacks the
 * conversions it needs, so on x86-64 build AVX2/AVX-512 variants too and pick one at load time. */
#if defined(__x86_64__) && defined(__GNUC__) && defined(__linux__)
#define VECTOR_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define VECTOR_CLONES
#endif
VECTOR_CLONES
static Py_ssize_t run_bf16(const uint16_t *restrict a, const uint16_t *restrict s, uint16_t *restrict o,
                           Py_ssize_t n, double alpha) {
    Py_ssize_t bad = 0;
    for (Py_ssize_t lo = 0; lo < n; lo += 4096) {
        int hi = (int)((n - lo) < 4096 ? (n - lo) : 4096);
        const uint16_t *ab = a + lo, *sb = s + lo;
        uint16_t *ob = o + lo;
        int cnt = 0;
        for (int i = 0; i < hi; i++) {
            double av = (double)f32_of_bits((uint32_t)ab[i] << 16), sv = (double)f32_of_bits((uint32_t)sb[i] << 16);
            double r = av + alpha * (av - sv);
            float f = (float)r;
            double b = (double)f;
            uint32_t u = bits_of_f32(f);
            int64_t inexact = b != r, up = fabs(b) < fabs(r); /* 64-bit lanes, like the doubles */
            int64_t adjust = inexact * (int64_t)((~u) & 1u) * (2 * up - 1);
            u += (uint32_t)adjust;
            u += 0x7fffu + ((u >> 16) & 1u);
            uint32_t h = u >> 16;
            int64_t isnan_ = r != r;
            h = h * (uint32_t)(1 - isnan_) + 0x7fc0u * (uint32_t)isnan_;
            ob[i] = (uint16_t)h;
            cnt += (int)((h & 0x7f80u) == 0x7f80u);
        }
        bad += cnt;
    }
    return bad;
}

static Py_ssize_t run_any(const char *a, int ac, const char *s, int sc, char *o, int oc, Py_ssize_t n, double alpha) {
    Py_ssize_t bad = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        double av = load(a, ac, i), sv = load(s, sc, i);
        bad += store(o, oc, i, av + alpha * (av - sv));
    }
    return bad;
}

static const int SIZES[4] = {8, 4, 2, 2};

static PyObject *extrapolate(PyObject *self, PyObject *args) {
    Py_buffer a, s, o;
    int ac, sc, oc;
    double alpha;
    if (!PyArg_ParseTuple(args, "y*iy*iw*id", &a, &ac, &s, &sc, &o, &oc, &alpha)) return NULL;
    PyObject *ret = NULL;
    if (ac < 0 || ac > 3 || sc < 0 || sc > 3 || oc < 0 || oc > 3) {
        PyErr_SetString(PyExc_ValueError, "dtype code must be 0..3");
        goto done;
    }
    Py_ssize_t n = o.len / SIZES[oc];
    if (o.len % SIZES[oc] || a.len != n * SIZES[ac] || s.len != n * SIZES[sc]) {
        PyErr_SetString(PyExc_ValueError, "buffer lengths do not match the element count");
        goto done;
    }
    Py_ssize_t bad;
    Py_BEGIN_ALLOW_THREADS
    if (ac == BF16 && sc == BF16 && oc == BF16)
        bad = run_bf16((const uint16_t *)a.buf, (const uint16_t *)s.buf, (uint16_t *)o.buf, n, alpha);
    else
        bad = run_any((const char *)a.buf, ac, (const char *)s.buf, sc, (char *)o.buf, oc, n, alpha);
    Py_END_ALLOW_THREADS
    ret = PyLong_FromSsize_t(bad);
done:
    PyBuffer_Release(&a);
    PyBuffer_Release(&s);
    PyBuffer_Release(&o);
    return ret;
}

/* count_nonfinite(buf, code): how many elements are NaN or +-Inf */
static PyObject *count_nonfinite(PyObject *self, PyObject *args) {
    Py_buffer b;
    int code;
    if (!PyArg_ParseTuple(args, "y*i", &b, &code)) return NULL;
    if (code < 0 || code > 3 || b.len % SIZES[code]) {
        PyBuffer_Release(&b);
        PyErr_SetString(PyExc_ValueError, "bad dtype code or buffer length");
        return NULL;
    }
    Py_ssize_t n = b.len / SIZES[code], bad = 0;
    Py_BEGIN_ALLOW_THREADS
    if (code == BF16 || code == F16) {
        const uint16_t *p = (const uint16_t *)b.buf;
        uint16_t m = code == BF16 ? 0x7f80u : 0x7c00u;
        for (Py_ssize_t i = 0; i < n; i++) bad += (p[i] & m) == m;
    } else if (code == F32) {
        const uint32_t *p = (const uint32_t *)b.buf;
        for (Py_ssize_t i = 0; i < n; i++) bad += (p[i] & 0x7f800000u) == 0x7f800000u;
    } else {
        const uint64_t *p = (const uint64_t *)b.buf;
        for (Py_ssize_t i = 0; i < n; i++) bad += (p[i] & 0x7ff0000000000000ull) == 0x7ff0000000000000ull;
    }
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&b);
    return PyLong_FromSsize_t(bad);
}

/* start_writeback(fd, offset, nbytes, wait): ask Linux to start writing a range back to disk now
 * (sync_file_range), so a long streaming write keeps the disk busy from the start instead of piling up
 * dirty pages for the final fsync; with wait, first wait for that range's earlier writeback. No-op elsewhere. */
#ifdef __linux__
#include <fcntl.h>
#endif
static PyObject *start_writeback(PyObject *self, PyObject *args) {
    int fd, wait;
    long long off, n;
    if (!PyArg_ParseTuple(args, "iLLp", &fd, &off, &n, &wait)) return NULL;
#if defined(__linux__) && defined(SYNC_FILE_RANGE_WRITE)
    unsigned int flags = SYNC_FILE_RANGE_WRITE;
    if (wait) flags |= SYNC_FILE_RANGE_WAIT_BEFORE | SYNC_FILE_RANGE_WAIT_AFTER;
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = sync_file_range(fd, (off_t)off, (off_t)n, flags);
    Py_END_ALLOW_THREADS
    if (rc != 0) return PyErr_SetFromErrno(PyExc_OSError);
    Py_RETURN_TRUE;
#else
    Py_RETURN_FALSE;
#endif
}

static PyMethodDef METHODS[] = {
    {"count_nonfinite", count_nonfinite, METH_VARARGS, "count_nonfinite(buf, code) -> NaN/Inf count"},
    {"start_writeback", start_writeback, METH_VARARGS, "start_writeback(fd, offset, nbytes, wait) -> bool"},
    {"extrapolate", extrapolate, METH_VARARGS,
     "extrapolate(a, a_code, s, s_code, out, out_code, alpha) -> non-finite count; codes F64=0 F32=1 F16=2 BF16=3"},
    {NULL, NULL, 0, NULL}};

static struct PyModuleDef MODULE = {PyModuleDef_HEAD_INIT, "_ckernel", NULL, -1, METHODS};

PyMODINIT_FUNC PyInit__ckernel(void) { return PyModule_Create(&MODULE); }
