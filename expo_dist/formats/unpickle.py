"""A restricted unpickler for torch.save state dicts: it knows only the handful of globals a state dict uses and
builds *descriptions* of tensors (storage key, dtype, offset, shape, stride) instead of tensors. Every other global is
refused, so nothing in the file ever runs. Nothing here imports torch.

One file cannot change how another is read: every unpickle gets its own fresh storage-type, dtype, tensor-class and
rebuild objects (nothing module-level reaches the pickle stack), BUILD (the opcode that sets attributes) is allowed
only on the state dict's own OrderedDict and its state is dropped, and every tensor description and storage record
is checked again after the pickle has run.
"""

from __future__ import annotations

import collections
import io
import pickle
from dataclasses import dataclass

from ..errors import ExpoError
from .dtypes import STORAGE_NAMES, TORCH_NAMES, itemsize, known
from .jsonsafe import one_line, shown
from .safetensors import MAX_INT, bad_name, valid_dims


class Refused(Exception):
    """The pickle asked for something a plain state dict never needs."""


# ---- what the pickle can name: fresh objects for every file ----------------------------------------------------


class _Named:
    """A whitelisted global as the pickle sees it. Immutable from the pickle: no BUILD, no pickling."""

    __slots__ = ("name",)

    def __setstate__(self, state):
        raise Refused(f"BUILD on {self.name}")

    def __reduce__(self):
        raise Refused(f"pickling {self.name}")


class _StorageType(_Named):
    __slots__ = ("dtype",)

    def __init__(self, dtype: str | None, name: str):
        self.dtype, self.name = dtype, name  # dtype None: UntypedStorage (numel counts bytes)


class _DType(_Named):
    __slots__ = ("dtype",)

    def __init__(self, dtype: str, name: str):
        self.dtype, self.name = dtype, name


class _TensorClass(_Named):
    """torch.Tensor / torch.nn.Parameter as the new_type of _rebuild_from_type_v2."""

    __slots__ = ()

    def __init__(self, name: str):
        self.name = name


class _Call(_Named):
    """One of torch's rebuild functions, as this file's unpickle knows it."""

    __slots__ = ("fn",)

    def __init__(self, name: str, fn):
        self.name, self.fn = name, fn

    def __call__(self, *args):
        return self.fn(*args)


@dataclass(frozen=True)
class Storage:
    key: str
    dtype: str | None  # None: untyped (bytes)
    numel: int  # elements of dtype (bytes when untyped)
    location: str

    @property
    def nbytes(self) -> int:
        return self.numel * (itemsize(self.dtype) if self.dtype else 1)

    def __setstate__(self, state):
        raise Refused("BUILD on a storage")


@dataclass(frozen=True)
class TensorDesc:
    storage: Storage
    offset: int  # in elements of dtype
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    dtype: str

    def __setstate__(self, state):
        raise Refused("BUILD on a tensor")


# ---- torch's rebuild functions, as descriptions -----------------------------------------------------------------


def _ints(x, what: str, signed: bool = False) -> tuple[int, ...]:
    if not isinstance(x, tuple) or not all(type(v) is int and (signed or v >= 0) and -MAX_INT <= v < MAX_INT
                                           for v in x):
        raise Refused(f"{what} is not a tuple of int64s")
    return x


def _tensor(storage, storage_offset, size, stride, dtype: str) -> TensorDesc:
    if type(storage) is not Storage:
        raise Refused("tensor storage is not a storage reference")
    if type(storage_offset) is not int or not 0 <= storage_offset < MAX_INT:
        raise Refused("tensor storage offset is not a non-negative int64")
    size, stride = _ints(size, "tensor size"), _ints(stride, "tensor stride", signed=True)
    if len(size) != len(stride):
        raise Refused("tensor size/stride mismatch")
    return TensorDesc(storage, storage_offset, size, stride, dtype)


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None,
                       metadata=None):
    if type(storage) is not Storage or storage.dtype is None:
        raise Refused("_rebuild_tensor_v2 without a typed storage")
    return _tensor(storage, storage_offset, size, stride, storage.dtype)


def _rebuild_tensor_v3(storage, storage_offset, size, stride, requires_grad, backward_hooks, dtype, metadata=None):
    if type(dtype) is not _DType:
        raise Refused("_rebuild_tensor_v3 without a dtype")
    if type(storage) is Storage and storage.dtype is not None and storage.dtype != dtype.dtype:
        raise Refused("_rebuild_tensor_v3 dtype differs from its storage's")
    return _tensor(storage, storage_offset, size, stride, dtype.dtype)


def _rebuild_parameter(data, requires_grad, backward_hooks, state=None):
    if type(data) is not TensorDesc:
        raise Refused("parameter without a tensor")
    return data


def _rebuild_from_type_v2(func, new_type, args, state):
    if type(func) is not _Call or func.fn not in (_rebuild_tensor_v2, _rebuild_tensor_v3) \
            or type(new_type) is not _TensorClass or not isinstance(args, tuple):
        raise Refused("_rebuild_from_type_v2 of something other than a plain tensor")
    return func(*args)


def fresh_globals() -> dict:
    """The whitelist, as new objects: one file's unpickle can never reach another's."""
    tensor, param = _TensorClass("torch.Tensor"), _TensorClass("torch.nn.Parameter")
    untyped = _StorageType(None, "UntypedStorage")
    rebuild_param = _Call("_rebuild_parameter", _rebuild_parameter)
    return {
        ("collections", "OrderedDict"): collections.OrderedDict,  # a built-in type: immutable
        ("torch._utils", "_rebuild_tensor_v2"): _Call("_rebuild_tensor_v2", _rebuild_tensor_v2),
        ("torch._utils", "_rebuild_tensor_v3"): _Call("_rebuild_tensor_v3", _rebuild_tensor_v3),
        ("torch._utils", "_rebuild_parameter"): rebuild_param,
        ("torch._utils", "_rebuild_parameter_with_state"): rebuild_param,
        ("torch._tensor", "_rebuild_from_type_v2"): _Call("_rebuild_from_type_v2", _rebuild_from_type_v2),
        ("torch", "Tensor"): tensor, ("torch._tensor", "Tensor"): tensor, ("torch.nn.parameter", "Parameter"): param,
        ("torch", "UntypedStorage"): untyped, ("torch.storage", "UntypedStorage"): untyped,
        # typed storages torch pickles by class name, and torch dtype globals (_rebuild_tensor_v3's dtype)
        **{("torch", k): _StorageType(v, k) for k, v in STORAGE_NAMES.items()},
        **{("torch", k): _DType(v, k) for k, v in TORCH_NAMES.items()},
    }


# ---- the unpickler ----------------------------------------------------------------------------------------------


class SafeUnpickler(pickle._Unpickler):
    """Unpickles a torch state dict into TensorDesc objects. Any other global is refused before it is imported.

    Python's own unpickler, the pure Python one (the C one cannot intercept BUILD; this costs about 30 us per
    tensor), with three changes: find_class (GLOBAL, STACK_GLOBAL, INST, OBJ) looks only in this file's fresh
    whitelist, the EXT opcodes (which go through a process-wide cache) are refused, and BUILD is allowed only on an
    OrderedDict, whose state (torch's `_metadata`) is dropped. With that, REDUCE / NEWOBJ can reach nothing but the
    description builders above and OrderedDict, and nothing can change an object once it is built.
    """

    def __init__(self, file):
        super().__init__(file)
        self.allowed = fresh_globals()

    def find_class(self, module, name):
        try:
            return self.allowed[(module, name)]
        except (KeyError, TypeError):
            raise Refused(f"{one_line(str(module), 60)}.{one_line(str(name), 60)}") from None

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise Refused(f"persistent id {type(pid).__name__}")
        _, stype, key, location, numel = pid
        if type(stype) is not _StorageType or type(key) is not str or type(location) is not str \
                or type(numel) is not int or not 0 <= numel < MAX_INT:
            raise Refused("malformed storage reference")
        return Storage(key, stype.dtype, numel, location)

    def load_build(self):
        state = self.stack.pop()
        inst = self.stack[-1]
        if type(inst) is not collections.OrderedDict:
            raise Refused(f"BUILD on {getattr(inst, 'name', None) or type(inst).__name__} (a state dict sets "
                          "attributes only on its own OrderedDict)")
        if isinstance(state, tuple) and len(state) == 2 and state[1] is None:
            state = state[0]
        if not isinstance(state, dict) or not all(type(k) is str for k in state):
            raise Refused("BUILD with a state other than attribute names -> values")
        # dropped: torch's `_metadata` (module versions) says nothing about where tensors are

    def load_ext(self):
        raise Refused("a pickle extension code")

    dispatch = dict(pickle._Unpickler.dispatch)
    dispatch[pickle.BUILD[0]] = load_build
    for _op in (pickle.EXT1, pickle.EXT2, pickle.EXT4):
        dispatch[_op[0]] = load_ext
    del _op


def _recheck(out: dict[str, TensorDesc], display: str) -> None:
    """Every description and storage record once more, now that the pickle has run: types, dtypes, and one storage
    key always the same record (torch itself reads a key once, with the first reference's dtype)."""
    records: dict[str, tuple] = {}
    for name, d in out.items():
        s = d.storage
        ok = (type(d) is TensorDesc and type(s) is Storage and type(s.key) is str and type(s.location) is str
              and (s.dtype is None or known(s.dtype)) and type(s.numel) is int and 0 <= s.numel < MAX_INT
              and known(d.dtype) and (s.dtype is None or s.dtype == d.dtype) and type(d.offset) is int
              and 0 <= d.offset < MAX_INT and type(d.shape) is tuple and valid_dims(d.shape)
              and type(d.stride) is tuple and len(d.stride) == len(d.shape)
              and all(type(v) is int and -MAX_INT <= v < MAX_INT for v in d.stride))
        if not ok:
            raise ExpoError(f"{display}: tensor {name!r} has an inconsistent description after unpickling; the file "
                            "is crafted or corrupt (convert a trusted copy to safetensors)")
        rec = (s.dtype, s.nbytes)
        if records.setdefault(s.key, rec) != rec:
            raise ExpoError(f"{display}: storage {shown(s.key, 40)} is described twice with different "
                            f"dtypes or sizes (seen at tensor {name!r}); the file is crafted or corrupt")


def unpickle_state_dict(data: bytes, display: str) -> dict[str, TensorDesc]:
    try:
        obj = SafeUnpickler(io.BytesIO(data)).load()
    except Refused as e:
        raise ExpoError(
            f"{display}: refused: its pickle asks for {one_line(str(e), 160)}, which a plain state dict never needs "
            "(only torch's tensor-rebuild functions are allowed); nothing in it was run. If you trust the file, "
            "convert it to safetensors first") from None
    except RecursionError:
        raise ExpoError(f"{display}: refused: its pickle is nested too deeply for a state dict") from None
    except Exception as e:  # a truncated or malformed pickle, or a whitelisted callable given bad arguments
        raise ExpoError(f"{display}: cannot read the pickled state dict ({e.__class__.__name__}: "
                        f"{one_line(str(e), 160)}); the file is corrupt or not a torch.save state dict") from None
    if not isinstance(obj, dict):
        raise ExpoError(f"{display}: holds a pickled {type(obj).__name__}, not a state dict (name -> tensor)")
    out = {}
    for k, v in obj.items():
        if not isinstance(k, str) or bad_name(k):
            raise ExpoError(f"{display}: state dict key {shown(k, 80)} is not a plain string")
        if type(v) is not TensorDesc:
            raise ExpoError(f"{display}: {k!r} is a {type(v).__name__}, not a tensor; expected a flat state dict "
                            "of tensors (as transformers saves pytorch_model.bin)")
        out[k] = v
    _recheck(out, display)
    return out
