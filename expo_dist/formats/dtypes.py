"""The dtype table: every safetensors dtype and what each part of expo_dist calls it (no torch import needed).

One row per dtype, in safetensors' own order (its Dtype enum, descending: item sizes never grow along it, so
a file written in this order keeps every tensor aligned). The other names are derived from the rows: torch's
dtype attribute, numpy's type for the same bytes, the typed-storage class torch pickled in older .bin files.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DType:
    name: str  # safetensors
    itemsize: int
    floating: bool
    torch: str  # the attribute of the torch module
    numpy: str | None  # numpy's type for the same (little-endian) bytes; None where numpy has none
    storage: str | None  # torch's typed-storage class in pickles (torch < 2.0 state dicts); None: never pickled so
    mantissa: int | None = None  # fraction bits of a float format


TABLE = (
    DType("U64", 8, False, "uint64", "<u8", None),
    DType("I64", 8, False, "int64", "<i8", "LongStorage"),
    DType("F64", 8, True, "float64", "<f8", "DoubleStorage", 52),
    DType("F32", 4, True, "float32", "<f4", "FloatStorage", 23),
    DType("U32", 4, False, "uint32", "<u4", None),
    DType("I32", 4, False, "int32", "<i4", "IntStorage"),
    DType("BF16", 2, True, "bfloat16", None, "BFloat16Storage", 7),
    DType("F16", 2, True, "float16", "<f2", "HalfStorage", 10),
    DType("U16", 2, False, "uint16", "<u2", None),
    DType("I16", 2, False, "int16", "<i2", "ShortStorage"),
    DType("F8_E4M3", 1, True, "float8_e4m3fn", None, None, 3),
    DType("F8_E5M2", 1, True, "float8_e5m2", None, None, 2),
    DType("I8", 1, False, "int8", "i1", "CharStorage"),
    DType("U8", 1, False, "uint8", "u1", "ByteStorage"),
    DType("BOOL", 1, False, "bool", "u1", "BoolStorage"),
)
DTYPES: dict[str, DType] = {d.name: d for d in TABLE}
ST_ORDER = tuple(d.name for d in TABLE)

# Floating dtypes the exact kernel can read and write. FP8 tensors are copied, never extrapolated. The order is
# the C kernel's dtype codes (runtime/_ckernel.c: F64 = 0, F32 = 1, F16 = 2, BF16 = 3).
KERNEL_FLOATS = ("F64", "F32", "F16", "BF16")

# torch's names: its dtype attributes, and the aliases a pickle may name them by
TORCH_NAMES: dict[str, str] = {d.torch: d.name for d in TABLE} | {
    "double": "F64", "float": "F32", "half": "F16", "long": "I64", "int": "I32", "short": "I16"}
STORAGE_NAMES: dict[str, str] = {d.storage: d.name for d in TABLE if d.storage}
NUMPY_NAMES: dict[str, str] = {d.name: d.numpy for d in TABLE if d.numpy}


def known(dtype: object) -> bool:
    """A safetensors dtype name expo_dist handles (anything else, a list or a number included: no)."""
    return isinstance(dtype, str) and dtype in DTYPES


def itemsize(dtype: str) -> int:
    return DTYPES[dtype].itemsize


def is_float(dtype: str) -> bool:
    return DTYPES[dtype].floating


def extrapolatable(dtype: str) -> bool:
    return dtype in KERNEL_FLOATS


def torch_dtype(dtype: str):
    """torch's dtype for a safetensors name (KeyError where this torch has none, e.g. U16 before torch 2.3)."""
    import torch

    found = getattr(torch, DTYPES[dtype].torch, None)
    if found is None:
        raise KeyError(dtype)
    return found


# what config.json's torch_dtype and people call the kernel's floats
_FROM_CONFIG = {DTYPES[n].torch: n for n in KERNEL_FLOATS} | {"half": "F16", "float": "F32"}


def from_name(name: str) -> str:
    """'bfloat16' / 'bf16' / 'BF16' / 'torch.bfloat16' -> 'BF16'."""
    key = name.lower().removeprefix("torch.")
    if key in _FROM_CONFIG:
        return _FROM_CONFIG[key]
    if key.upper() in KERNEL_FLOATS:
        return key.upper()
    raise ValueError(f"unknown dtype {name!r}; use one of bfloat16, float16, float32, float64")
