"""The restricted, bounded unpickler behind :func:`vtadl_jax.convert.pth.read_pth`.

Safety rules (a checkpoint is untrusted input):

* only the globals a checkpoint needs are resolved (tensor/parameter rebuild functions,
  storage types, ``collections.OrderedDict``, ``torch.device``, ``argparse.Namespace`` and
  NumPy arrays/scalars/dtypes), each to a checking stand-in; anything else (``os.system``,
  ``builtins.eval``, ...) is refused with :class:`UnsafePickleError`. torch is never imported.
* tensors are materialised when the pickle builds them (``_rebuild_tensor_v2``), so the
  result is never walked afterwards: shared references ("billion laughs") and deep nesting
  cost nothing beyond the pickle's own length.
* time and memory are bounded by a :class:`Limits` object: every byte the reader
  allocates (pickle, storages, materialised tensors, NumPy arrays) is charged against
  ``max_bytes`` before it is allocated, and every operation whose cost is not O(1) per
  pickle byte (dict keys hashed, BUILD states copied, containers passed to constructors)
  is charged against a work allowance proportional to the pickle's length.
* dict and set keys must be flat (str, bytes, numbers, None, or tuples of these):
  hashing a deeply nested or shared key tuple is exponential and uninterruptible.

The pure-Python ``pickle._Unpickler`` is subclassed so that these opcodes can be checked.
"""
from __future__ import annotations

import argparse
import collections
import pickle
import struct
from typing import Any, Callable

import numpy as np

from vtadl_jax.convert.pth_storage import (ATOMS, STORAGE_DTYPES, Limits, PthFormatError,
                                           Storage, UnsafePickleError, materialise, short_repr)

__all__ = ["CheckpointUnpickler"]

MAX_DIMS = 64


class _StorageType:
    def __init__(self, name: str):
        self.name = name


class _Marker:
    """Stand-in for a class the pickle may name but never call (torch.Tensor, ndarray)."""

    def __init__(self, name: str):
        self.name = name

    def __call__(self, *args: Any, **kwargs: Any):
        raise TypeError(f"the pickle calls {self.name}, which a checkpoint never does")


_NDARRAY = _Marker("numpy.ndarray")
_ALLOWED: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): "_ordered_dict",
    ("torch._utils", "_rebuild_tensor_v2"): "_rebuild_tensor",
    ("torch._utils", "_rebuild_tensor"): "_rebuild_tensor",
    ("torch._utils", "_rebuild_parameter"): "_rebuild_parameter",
    ("torch._utils", "_rebuild_parameter_with_state"): "_rebuild_parameter",
    ("torch._tensor", "_rebuild_from_type_v2"): "_rebuild_from_type",
    ("torch", "device"): "_device",
    ("torch", "Tensor"): _Marker("torch.Tensor"),
    ("torch.nn.parameter", "Parameter"): _Marker("torch.nn.Parameter"),
    ("argparse", "Namespace"): argparse.Namespace,
    ("numpy", "dtype"): "_np_dtype",
    ("_codecs", "encode"): "_latin1_bytes",  # how protocol 2 pickles bytes
    ("numpy", "ndarray"): _NDARRAY,
}
for _mod in ("numpy.core.multiarray", "numpy._core.multiarray"):
    _ALLOWED[(_mod, "scalar")] = "_np_scalar"
    _ALLOWED[(_mod, "_reconstruct")] = "_np_reconstruct"
for _name in STORAGE_DTYPES:
    _ALLOWED[("torch", _name)] = _StorageType(_name)


def _is_int(x: Any) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


class CheckpointUnpickler(pickle._Unpickler):
    """Restricted unpickler; ``on_storage(type_name, key, numel, view)`` returns a Storage.

    With ``defer_tensors`` (first pass over a legacy file, whose storage bytes follow the
    pickle) tensors are geometry-checked later and None stands in for them.
    """

    dispatch = dict(pickle._Unpickler.dispatch)

    def __init__(self, file, limits: Limits, on_storage: Callable[..., Storage], *,
                 defer_tensors: bool = False):
        super().__init__(file, encoding="utf-8")
        self._limits, self._path = limits, limits.path
        self._on_storage, self._defer = on_storage, defer_tensors

    def _error(self, message: str) -> PthFormatError:
        return PthFormatError(f"{self._path}: {message}")

    # -- globals and persistent ids ------------------------------------------------------
    def find_class(self, module: str, name: str) -> Any:
        found = _ALLOWED.get((module, name))
        if found is None:
            raise UnsafePickleError(
                f"{self._path}: refusing to load global '{short_repr(module)[1:-1]}."
                f"{short_repr(name)[1:-1]}' from the pickle (only tensors, storages and "
                "plain containers are allowed)")
        return getattr(self, found) if isinstance(found, str) else found

    def persistent_load(self, pid: Any) -> Storage:
        if (not isinstance(pid, tuple) or len(pid) not in (5, 6) or pid[0] != "storage"
                or not isinstance(pid[1], _StorageType) or not isinstance(pid[2], (str, int))
                or not _is_int(pid[4]) or pid[4] < 0):
            raise self._error(f"unsupported persistent id {short_repr(pid)} (expected "
                              "('storage', <torch storage type>, key, location, numel))")
        view = pid[5] if len(pid) == 6 else None
        if view is not None and not (isinstance(view, tuple) and len(view) == 3
                                     and isinstance(view[0], (str, int))
                                     and _is_int(view[1]) and _is_int(view[2])):
            raise self._error(f"bad storage view {short_repr(view)}")
        return self._on_storage(pid[1].name, str(pid[2]), int(pid[4]), view)

    # -- the allowed callables -----------------------------------------------------------
    def _ordered_dict(self, *args: Any) -> collections.OrderedDict:
        out: collections.OrderedDict = collections.OrderedDict()
        if args:
            if len(args) != 1 or not isinstance(args[0], (list, tuple)):
                raise self._error("OrderedDict(...) with unexpected arguments")
            self._limits.take_work(len(args[0]))
            for pair in args[0]:
                if not isinstance(pair, (list, tuple)) or len(pair) != 2:
                    raise self._error("OrderedDict(...) with an item that is not a pair")
                self._check_key(pair[0])
                out[pair[0]] = pair[1]
        return out

    def _device(self, kind: Any, index: Any = None) -> str:
        if not isinstance(kind, str) or not (index is None or _is_int(index)):
            raise self._error(f"bad torch.device({short_repr(kind)}, {short_repr(index)})")
        return kind[:64] if index is None else f"{kind[:64]}:{int(index)}"

    def _rebuild_parameter(self, data: Any, *unused: Any) -> Any:
        return data

    def _rebuild_from_type(self, func: Any, new_type: Any, args: Any, state: Any) -> Any:
        if func != self._rebuild_tensor or not isinstance(args, tuple):
            raise self._error("_rebuild_from_type_v2 of something other than a tensor")
        return func(*args)

    def _rebuild_tensor(self, storage: Any, offset: Any, size: Any, stride: Any,
                        *unused: Any) -> np.ndarray | None:
        if not isinstance(storage, Storage):
            raise self._error(f"tensor rebuilt from {short_repr(storage)}, not a storage")
        size, stride = self._geometry(size, "size"), self._geometry(stride, "stride")
        if not _is_int(offset) or offset < 0 or len(size) != len(stride):
            raise self._error(f"bad tensor geometry size={short_repr(size)} stride="
                              f"{short_repr(stride)} offset={short_repr(offset)} on storage "
                              f"'{storage.key}'")
        return None if self._defer else materialise(storage, int(offset), size, stride,
                                                     self._limits)

    def _geometry(self, value: Any, what: str) -> tuple[int, ...]:
        if (not isinstance(value, (tuple, list)) or len(value) > MAX_DIMS
                or not all(_is_int(n) and n >= 0 for n in value)):
            raise self._error(f"bad tensor {what} {short_repr(value)} (expected at most "
                              f"{MAX_DIMS} non-negative integers)")
        return tuple(int(n) for n in value)

    def _latin1_bytes(self, text: Any, encoding: Any = None) -> bytes:
        if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
            raise self._error("_codecs.encode other than protocol 2's latin1 bytes")
        self._limits.take_bytes(len(text), "pickled bytes")
        return text.encode("latin1")

    def _np_dtype(self, *args: Any) -> np.dtype:
        if not args or not isinstance(args[0], str) or len(args[0]) > 16:
            raise self._error(f"numpy.dtype({short_repr(args)}) is not a plain dtype")
        return np.dtype(*args[:1])

    def _np_scalar(self, dtype: Any, *args: Any) -> Any:
        if not isinstance(dtype, np.dtype) or dtype.hasobject or len(args) != 1 \
                or not isinstance(args[0], bytes):
            raise self._error("numpy scalar without a plain dtype and its bytes")
        self._limits.take_bytes(len(args[0]), "a numpy scalar")
        return np._core.multiarray.scalar(dtype, args[0])

    def _np_reconstruct(self, subtype: Any, shape: Any, typecode: Any) -> np.ndarray:
        if subtype is not _NDARRAY or tuple(self._geometry(shape, "shape")) != (0,) \
                or typecode not in (b"b", "b"):
            raise self._error("numpy array reconstruction other than numpy's own pickling")
        return np.empty(0, np.int8)

    # -- opcodes with a cost that is not O(1) per pickle byte ----------------------------
    def _check_key(self, key: Any) -> None:
        if isinstance(key, ATOMS):
            cost = 1 + (key.bit_length() >> 6 if isinstance(key, int) else 0)
        elif isinstance(key, tuple) and len(key) <= 64 and all(isinstance(x, ATOMS)
                                                                for x in key):
            cost = 1 + sum(x.bit_length() >> 6 if isinstance(x, int) else 1 for x in key)
        else:
            raise self._error(f"dict or set key {short_repr(key)} is not a flat value (a "
                              "str, number, bytes, None or a short tuple of these)")
        self._limits.take_work(cost)

    def _load_setitem(self) -> None:
        self._check_key(self.stack[-2])
        pickle._Unpickler.load_setitem(self)

    def _load_setitems(self) -> None:  # after MARK, self.stack holds key, value, ...
        for key in self.stack[0::2]:
            self._check_key(key)
        pickle._Unpickler.load_setitems(self)

    def _load_dict(self) -> None:
        for key in self.stack[0::2]:
            self._check_key(key)
        pickle._Unpickler.load_dict(self)

    def _load_additems(self) -> None:  # set elements are hashed like keys
        for item in self.stack:
            self._check_key(item)
        pickle._Unpickler.load_additems(self)

    def _load_frozenset(self) -> None:
        for item in self.stack:
            self._check_key(item)
        pickle._Unpickler.load_frozenset(self)

    def _load_bytearray8(self) -> None:  # allocates its declared length before reading
        (n,) = struct.unpack("<Q", self.read(8))
        self._limits.take_bytes(n, "a pickled bytearray")
        data = self.read(n)
        if len(data) != n:
            raise self._error("pickle truncated inside a bytearray")
        self.append(bytearray(data))

    def _load_build(self) -> None:
        state, inst = self.stack[-1], self.stack[-2]
        if isinstance(inst, np.ndarray):
            self._check_array_state(state)
            return pickle._Unpickler.load_build(self)
        if isinstance(inst, np.dtype):  # numpy's (3, '<', None, ...) of a plain dtype
            if not (isinstance(state, tuple) and len(state) <= 9
                    and all(isinstance(x, ATOMS) for x in state)):
                raise self._error("numpy dtype state of a structured or object dtype")
            return pickle._Unpickler.load_build(self)
        if not isinstance(inst, (collections.OrderedDict, argparse.Namespace)):
            raise self._error(f"BUILD (object state) on a {type(inst).__name__}")
        parts = state if isinstance(state, tuple) and len(state) == 2 else (state, None)
        for part in parts:
            if part is None:
                continue
            if not isinstance(part, dict):
                raise self._error("object state that is not a dict")
            self._limits.take_work(len(part))
            for key in part:
                if not isinstance(key, str) or key.startswith("__"):
                    raise self._error(f"object attribute {short_repr(key)} is not allowed")
        pickle._Unpickler.load_build(self)

    def _check_array_state(self, state: Any) -> None:
        """numpy's own (version, shape, dtype, fortran, bytes) for a plain-dtype array."""
        if not (isinstance(state, tuple) and len(state) == 5 and isinstance(state[2], np.dtype)
                and not state[2].hasobject and isinstance(state[4], bytes)):
            raise self._error("numpy array state other than (version, shape, dtype, "
                              "fortran, bytes) of a plain dtype")
        shape = self._geometry(state[1], "numpy array shape")
        numel = 1
        for n in shape:
            numel *= n
        self._limits.take_bytes(numel * state[2].itemsize, f"numpy array of shape {shape}")


for _code, _method in ((pickle.SETITEM, CheckpointUnpickler._load_setitem),
                       (pickle.SETITEMS, CheckpointUnpickler._load_setitems),
                       (pickle.DICT, CheckpointUnpickler._load_dict),
                       (pickle.ADDITEMS, CheckpointUnpickler._load_additems),
                       (pickle.FROZENSET, CheckpointUnpickler._load_frozenset),
                       (pickle.BUILD, CheckpointUnpickler._load_build),
                       (pickle.BYTEARRAY8, CheckpointUnpickler._load_bytearray8)):
    CheckpointUnpickler.dispatch[_code[0]] = _method
