"""safetensors dtype names and their properties (no torch import needed for planning)."""

from __future__ import annotations

# name -> (itemsize in bytes, is floating point)
DTYPES: dict[str, tuple[int, bool]] = {
    "F64": (8, True),
    "F32": (4, True),
    "F16": (2, True),
    "BF16": (2, True),
    "F8_E4M3": (1, True),
    "F8_E5M2": (1, True),
    "I64": (8, False),
    "I32": (4, False),
    "I16": (2, False),
    "I8": (1, False),
    "U64": (8, False),
    "U32": (4, False),
    "U16": (2, False),
    "U8": (1, False),
    "BOOL": (1, False),
}

# Floating dtypes the exact kernel can read and write. FP8 tensors are copied, never extrapolated.
KERNEL_FLOATS = ("F64", "F32", "F16", "BF16")


def known(dtype: object) -> bool:
    """A safetensors dtype name expo_dist handles (anything else, a list or a number included: no)."""
    return isinstance(dtype, str) and dtype in DTYPES


def itemsize(dtype: str) -> int:
    return DTYPES[dtype][0]


def is_float(dtype: str) -> bool:
    return DTYPES[dtype][1]


def extrapolatable(dtype: str) -> bool:
    return dtype in KERNEL_FLOATS


def torch_dtype(dtype: str):
    import torch

    return {
        "F64": torch.float64,
        "F32": torch.float32,
        "F16": torch.float16,
        "BF16": torch.bfloat16,
        "I64": torch.int64,
        "I32": torch.int32,
        "I16": torch.int16,
        "I8": torch.int8,
        "U8": torch.uint8,
        "BOOL": torch.bool,
    }[dtype]


_FROM_CONFIG = {
    "bfloat16": "BF16",
    "float16": "F16",
    "half": "F16",
    "float32": "F32",
    "float": "F32",
    "float64": "F64",
}


def from_name(name: str) -> str:
    """'bfloat16' / 'bf16' / 'BF16' / 'torch.bfloat16' -> 'BF16'."""
    key = name.lower().removeprefix("torch.")
    if key in _FROM_CONFIG:
        return _FROM_CONFIG[key]
    if key.upper() in KERNEL_FLOATS:
        return key.upper()
    raise ValueError(f"unknown dtype {name!r}; use one of bfloat16, float16, float32, float64")


def config_name(dtype: str) -> str:
    return {"BF16": "bfloat16", "F16": "float16", "F32": "float32", "F64": "float64"}[dtype]
