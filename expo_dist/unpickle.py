"""A restricted unpickler for torch.save state dicts: it knows only the handful of globals a state dict uses and
builds *descriptions* of tensors (storage key, dtype, offset, shape, stride) instead of tensors. Every other global is
refused, so nothing in the file ever runs. Nothing here imports torch."""

from __future__ import annotations

import collections
import io
import pickle
from dataclasses import dataclass

from .dtypes import itemsize
from .errors import ExpoError

# storage classes torch pickles by name (typed storages) -> safetensors dtype
STORAGE_DTYPES = {
    "DoubleStorage": "F64", "FloatStorage": "F32", "HalfStorage": "F16", "BFloat16Storage": "BF16",
    "LongStorage": "I64", "IntStorage": "I32", "ShortStorage": "I16", "CharStorage": "I8",
    "ByteStorage": "U8", "BoolStorage": "BOOL",
}
# torch dtype globals (the dtype argument of _rebuild_tensor_v3) -> safetensors dtype
TORCH_DTYPES = {
    "float64": "F64", "double": "F64", "float32": "F32", "float": "F32", "float16": "F16", "half": "F16",
    "bfloat16": "BF16", "float8_e4m3fn": "F8_E4M3", "float8_e5m2": "F8_E5M2",
    "int64": "I64", "long": "I64", "int32": "I32", "int": "I32", "int16": "I16", "short": "I16", "int8": "I8",
    "uint64": "U64", "uint32": "U32", "uint16": "U16", "uint8": "U8", "bool": "BOOL",
}


# ---- the restricted unpickler ---------------------------------------------------------------------------------


class Refused(Exception):
    """The pickle asked for something a plain state dict never needs."""


class _StorageType:
    __slots__ = ("dtype", "name")

    def __init__(self, dtype: str | None, name: str):
        self.dtype, self.name = dtype, name  # dtype None: UntypedStorage (numel counts bytes)

    def __reduce__(self):
        raise Refused("storage types are not picklable")


class _DType:
    __slots__ = ("dtype", "name")

    def __init__(self, dtype: str, name: str):
        self.dtype, self.name = dtype, name


class _TensorClass:
    """torch.Tensor / torch.nn.Parameter as the new_type of _rebuild_from_type_v2."""

    __slots__ = ("name",)

    def __init__(self, name: str):
        self.name = name


@dataclass(frozen=True)
class Storage:
    key: str
    dtype: str | None  # None: untyped (bytes)
    numel: int  # elements of dtype (bytes when untyped)
    location: str

    @property
    def nbytes(self) -> int:
        return self.numel * (itemsize(self.dtype) if self.dtype else 1)


@dataclass(frozen=True)
class TensorDesc:
    storage: Storage
    offset: int  # in elements of dtype
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    dtype: str

    def __setstate__(self, state):  # BUILD on a description: never
        raise Refused("BUILD on a tensor")


def _ints(x, what: str) -> tuple[int, ...]:
    if not isinstance(x, tuple) or not all(type(v) is int for v in x):
        raise Refused(f"{what} is not a tuple of ints")
    return x


def _tensor(storage, storage_offset, size, stride, dtype: str) -> TensorDesc:
    if not isinstance(storage, Storage):
        raise Refused("tensor storage is not a storage reference")
    if type(storage_offset) is not int or storage_offset < 0:
        raise Refused("tensor storage offset is not a non-negative int")
    size, stride = _ints(size, "tensor size"), _ints(stride, "tensor stride")
    if len(size) != len(stride) or any(v < 0 for v in size):
        raise Refused("tensor size/stride mismatch")
    return TensorDesc(storage, storage_offset, size, stride, dtype)


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None,
                       metadata=None):
    if not isinstance(storage, Storage) or storage.dtype is None:
        raise Refused("_rebuild_tensor_v2 without a typed storage")
    return _tensor(storage, storage_offset, size, stride, storage.dtype)


def _rebuild_tensor_v3(storage, storage_offset, size, stride, requires_grad, backward_hooks, dtype, metadata=None):
    if not isinstance(dtype, _DType):
        raise Refused("_rebuild_tensor_v3 without a dtype")
    if isinstance(storage, Storage) and storage.dtype is not None and storage.dtype != dtype.dtype:
        raise Refused("_rebuild_tensor_v3 dtype differs from its storage's")
    return _tensor(storage, storage_offset, size, stride, dtype.dtype)


def _rebuild_parameter(data, requires_grad, backward_hooks, state=None):
    if not isinstance(data, TensorDesc):
        raise Refused("parameter without a tensor")
    return data


_REBUILDERS = (_rebuild_tensor_v2, _rebuild_tensor_v3)


def _rebuild_from_type_v2(func, new_type, args, state):
    if func not in _REBUILDERS or not isinstance(new_type, _TensorClass) or not isinstance(args, tuple):
        raise Refused("_rebuild_from_type_v2 of something other than a plain tensor")
    return func(*args)


_GLOBALS = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_tensor_v3"): _rebuild_tensor_v3,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type_v2,
    ("torch", "Tensor"): _TensorClass("torch.Tensor"),
    ("torch._tensor", "Tensor"): _TensorClass("torch.Tensor"),
    ("torch.nn.parameter", "Parameter"): _TensorClass("torch.nn.Parameter"),
    ("torch", "UntypedStorage"): _StorageType(None, "UntypedStorage"),
    ("torch.storage", "UntypedStorage"): _StorageType(None, "UntypedStorage"),
    **{("torch", k): _StorageType(v, k) for k, v in STORAGE_DTYPES.items()},
    **{("torch", k): _DType(v, k) for k, v in TORCH_DTYPES.items()},
}


class SafeUnpickler(pickle.Unpickler):
    """Unpickles a torch state dict into TensorDesc objects. Any other global is refused before it is imported.

    Only find_class can bring a callable onto the pickle stack (GLOBAL, STACK_GLOBAL, INST, OBJ and the EXT
    opcodes all go through it), so with this whitelist REDUCE / NEWOBJ / BUILD can reach nothing but the
    description builders above and OrderedDict.
    """

    def find_class(self, module, name):
        try:
            return _GLOBALS[(module, name)]
        except (KeyError, TypeError):
            raise Refused(f"{module}.{name}") from None

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise Refused(f"persistent id {type(pid).__name__}")
        _, stype, key, location, numel = pid
        if not isinstance(stype, _StorageType) or not isinstance(key, str) or not isinstance(location, str) \
                or type(numel) is not int or numel < 0:
            raise Refused("malformed storage reference")
        return Storage(key, stype.dtype, numel, location)


def unpickle_state_dict(data: bytes, display: str) -> dict[str, TensorDesc]:
    try:
        obj = SafeUnpickler(io.BytesIO(data)).load()
    except Refused as e:
        raise ExpoError(
            f"{display}: refused: its pickle asks for {e}, which a plain state dict never needs "
            "(only torch's tensor-rebuild functions are allowed); nothing in it was run. If you trust the file, "
            "convert it to safetensors first") from None
    except RecursionError:
        raise ExpoError(f"{display}: refused: its pickle is nested too deeply for a state dict") from None
    except Exception as e:  # a truncated or malformed pickle, or a whitelisted callable given bad arguments
        raise ExpoError(f"{display}: cannot read the pickled state dict ({e.__class__.__name__}: {e}); "
                        "the file is corrupt or not a torch.save state dict") from None
    if not isinstance(obj, dict):
        raise ExpoError(f"{display}: holds a pickled {type(obj).__name__}, not a state dict (name -> tensor)")
    out = {}
    for k, v in obj.items():
        if not isinstance(k, str):
            raise ExpoError(f"{display}: state dict key {k!r} is not a string")
        if not isinstance(v, TensorDesc):
            raise ExpoError(f"{display}: {k!r} is a {type(v).__name__}, not a tensor; expected a flat state dict "
                            "of tensors (as transformers saves pytorch_model.bin)")
        out[k] = v
    return out
