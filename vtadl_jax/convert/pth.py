"""Read and write PyTorch ``.pth`` checkpoints with only the standard library and NumPy.

Two on-disk formats exist (both produced by ``torch.save``):

* zip (torch >= 1.6): ``<archive>/data.pkl`` (a pickle whose tensors point, through
  persistent ids ``('storage', StorageType, key, location, numel)``, at raw storages
  ``<archive>/data/<key>``), ``<archive>/byteorder`` ("little"/"big"), ``<archive>/version``.
* legacy (older torch): five pickles back to back -- magic number, protocol version (1001),
  system info, the object, the list of storage keys -- then, for each key in that order, an
  int64 element count followed by the raw storage bytes.

The pickle is read by a *restricted* unpickler: only the handful of globals a state dict
needs (tensor/parameter rebuild functions, storage types, ``collections.OrderedDict``,
``torch.device`` and a few inert containers) are resolved, to NumPy-side stand-ins; any
other global (``os.system``, ``builtins.eval``, ...) is refused with :class:`UnsafePickleError`.
torch is never imported. bfloat16 storages are widened exactly to float32.
"""
from __future__ import annotations

import argparse
import collections
import io
import pickle
import struct
import zipfile
from pathlib import Path
from typing import Any, Mapping

import numpy as np


__all__ = ["PthFormatError", "UnsafePickleError", "read_pth", "load_pth",
           "extract_state_dict", "save_pth", "STATE_DICT_KEYS"]

STATE_DICT_KEYS = ("state_dict", "model", "model_state_dict", "net")
LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
# torch storage type -> NumPy element type (bfloat16 is read as raw bits, then widened)
STORAGE_DTYPES = {
    "DoubleStorage": "f8", "FloatStorage": "f4", "HalfStorage": "f2", "BFloat16Storage": "u2",
    "LongStorage": "i8", "IntStorage": "i4", "ShortStorage": "i2", "CharStorage": "i1",
    "ByteStorage": "u1", "BoolStorage": "?", "ComplexFloatStorage": "c8",
    "ComplexDoubleStorage": "c16",
}


class PthFormatError(ValueError):
    """The file is not a readable PyTorch checkpoint (the message names the file)."""


class UnsafePickleError(PthFormatError):
    """The checkpoint's pickle references a global outside the allow-list."""


class _Storage:
    """A typed storage; ``data`` (1-D, ``numel`` elements) is filled once its bytes are read."""
    def __init__(self, key: str, name: str, numel: int):
        self.key, self.name, self.numel = key, name, int(numel)
        self.data: np.ndarray | None = None
        self.base: tuple["_Storage", int] | None = None  # legacy storage views


class _PendingTensor:
    """A tensor whose storage bytes may not have been read yet (legacy format)."""
    def __init__(self, storage: _Storage, offset: int, size: tuple, stride: tuple):
        self.storage, self.offset, self.size, self.stride = storage, offset, size, stride


class _StorageType:
    def __init__(self, name: str):
        self.name = name


def _rebuild_tensor(storage, offset, size, stride, *unused) -> _PendingTensor:
    return _PendingTensor(storage, int(offset), tuple(size), tuple(stride))


_TYPE_SENTINEL = object()
_ALLOWED: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): lambda data, *unused: data,
    ("torch._utils", "_rebuild_parameter_with_state"): lambda data, *unused: data,
    ("torch._tensor", "_rebuild_from_type_v2"): lambda func, new_type, args, state: func(*args),
    ("torch", "Tensor"): _TYPE_SENTINEL,
    ("torch.nn.parameter", "Parameter"): _TYPE_SENTINEL,
    ("torch", "device"): lambda kind, index=None: kind if index is None else f"{kind}:{index}",
    ("argparse", "Namespace"): argparse.Namespace,
    ("numpy", "dtype"): np.dtype,
    ("numpy", "ndarray"): np.ndarray,
}
for _mod in ("numpy.core.multiarray", "numpy._core.multiarray"):
    _ALLOWED[(_mod, "scalar")] = np._core.multiarray.scalar
    _ALLOWED[(_mod, "_reconstruct")] = np._core.multiarray._reconstruct
for _name in STORAGE_DTYPES:
    _ALLOWED[("torch", _name)] = _StorageType(_name)


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file, path: str, on_storage):
        super().__init__(file, encoding="utf-8")
        self._path, self._on_storage = path, on_storage

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise UnsafePickleError(
                f"{self._path}: refusing to load global '{module}.{name}' from the pickle "
                "(only tensors, storages and plain containers are allowed)") from None

    def persistent_load(self, pid: Any) -> Any:
        if (not isinstance(pid, tuple) or len(pid) not in (5, 6) or pid[0] != "storage"
                or not isinstance(pid[1], _StorageType)):
            raise PthFormatError(f"{self._path}: unsupported persistent id {pid!r}")
        return self._on_storage(pid[1].name, str(pid[2]), int(pid[4]),
                                pid[5] if len(pid) == 6 else None)


def _materialise(t: _PendingTensor, path: str) -> np.ndarray:
    """Apply offset/shape/strides (in elements) to the storage; bounds-checked, copied."""
    st, offset = t.storage, t.offset
    if st.base is not None:
        st, offset = st.base[0], offset + st.base[1]
    if st.data is None:
        raise PthFormatError(f"{path}: storage '{st.key}' was never read")
    size, stride = t.size, t.stride
    if len(size) != len(stride) or min((*size, *stride, offset, 0)) < 0:
        raise PthFormatError(f"{path}: bad tensor geometry size={size} stride={stride} "
                             f"offset={offset} on storage '{st.key}'")
    if 0 in size:
        out = np.empty(size, st.data.dtype)
    else:
        last = offset + sum((n - 1) * s for n, s in zip(size, stride))
        if last >= st.data.size:
            raise PthFormatError(f"{path}: tensor reads element {last} of storage '{st.key}' "
                                 f"which holds {st.data.size}")
        item = st.data.itemsize
        out = np.lib.stride_tricks.as_strided(
            st.data[offset:], shape=size, strides=tuple(s * item for s in stride),
            writeable=False).copy()
    if st.name == "BFloat16Storage":  # exact widening: bf16 bits are the top half of f32
        out = (out.astype(np.uint32) << 16).view(np.float32)
    return out.astype(out.dtype.newbyteorder("="), copy=False)


def _resolve(obj: Any, path: str) -> Any:
    """Replace every pending tensor inside dicts/lists/tuples/Namespaces by an ndarray."""
    if isinstance(obj, _PendingTensor):
        return _materialise(obj, path)
    if isinstance(obj, dict):
        out = type(obj)() if isinstance(obj, collections.OrderedDict) else {}
        for k, v in obj.items():
            out[k] = _resolve(v, path)
        return out
    if isinstance(obj, (list, tuple)):
        return type(obj)(_resolve(v, path) for v in obj)
    if isinstance(obj, argparse.Namespace):
        return argparse.Namespace(**{k: _resolve(v, path) for k, v in vars(obj).items()})
    return obj


def _storage_dtype(name: str, big_endian: bool) -> np.dtype:
    return np.dtype(STORAGE_DTYPES[name]).newbyteorder(">" if big_endian else "<")


def _read_zip(path: str) -> Any:
    with zipfile.ZipFile(path) as zf:
        names = zf.namelist()
        pkl = [n for n in names if n.endswith("data.pkl") and n.count("/") == 1]
        if len(pkl) != 1:
            raise PthFormatError(f"{path}: zip archive has no '<archive>/data.pkl' record "
                                 f"(found {names[:5]}...)")
        prefix = pkl[0][: -len("data.pkl")]
        order = prefix + "byteorder"
        big = order in names and zf.read(order).strip() == b"big"
        storages: dict[str, _Storage] = {}

        def on_storage(name: str, key: str, numel: int, view) -> _Storage:
            if key not in storages:
                st = _Storage(key, name, numel)
                record = f"{prefix}data/{key}"
                try:
                    raw = zf.read(record)
                except KeyError:
                    raise PthFormatError(f"{path}: missing storage record '{record}'") from None
                dtype = _storage_dtype(name, big)
                if len(raw) < numel * dtype.itemsize:
                    raise PthFormatError(f"{path}: storage '{record}' holds {len(raw)} bytes, "
                                         f"expected {numel * dtype.itemsize}")
                st.data = np.frombuffer(raw, dtype, count=numel)
                storages[key] = st
            return storages[key]

        obj = _RestrictedUnpickler(io.BytesIO(zf.read(pkl[0])), path, on_storage).load()
    return _resolve(obj, path)


def _read_legacy(path: str) -> Any:
    storages: dict[str, _Storage] = {}

    def on_storage(name: str, key: str, numel: int, view) -> _Storage:
        if key not in storages:
            storages[key] = _Storage(key, name, numel)
        if view is None:
            return storages[key]
        view_key, offset, view_numel = view
        if view_key not in storages:
            storages[view_key] = _Storage(view_key, name, view_numel)
            storages[view_key].base = (storages[key], int(offset))
        return storages[view_key]

    with open(path, "rb") as f:
        def load():
            return _RestrictedUnpickler(f, path, on_storage).load()
        if load() != LEGACY_MAGIC or load() != 1001:
            raise PthFormatError(f"{path}: legacy pickle without the PyTorch magic number")
        info = load()
        little = not isinstance(info, dict) or info.get("little_endian", True)
        obj = load()
        for key in load():
            st = storages.get(str(key))
            if st is None:
                raise PthFormatError(f"{path}: storage key {key!r} listed but never used")
            head = f.read(8)
            count = struct.unpack("<q" if little else ">q", head)[0] if len(head) == 8 else -1
            dtype = _storage_dtype(st.name, not little)
            raw = f.read(max(count, 0) * dtype.itemsize)
            if count != st.numel or len(raw) != count * dtype.itemsize:
                raise PthFormatError(f"{path}: storage '{key}' is truncated or inconsistent "
                                     f"(expected {st.numel} elements)")
            st.data = np.frombuffer(raw, dtype)
    return _resolve(obj, path)


def read_pth(path: str | Path) -> Any:
    """Unpickle a ``.pth`` file (zip or legacy format) with every tensor as an np.ndarray.

    Returns whatever object was saved (usually a dict). Raises :class:`PthFormatError`
    naming ``path`` for truncated/unknown files, :class:`UnsafePickleError` for
    disallowed globals, FileNotFoundError if absent.
    """
    path = str(path)
    with open(path, "rb") as f:
        head = f.read(16)
    try:
        if zipfile.is_zipfile(path):
            return _read_zip(path)
        if head.startswith(b"PK\x03\x04"):
            raise zipfile.BadZipFile("zip archive without its central directory")
        if head.startswith(b"\x80\x02\x8a\x0a"):
            return _read_legacy(path)
    except PthFormatError:
        raise
    except (zipfile.BadZipFile, EOFError, pickle.UnpicklingError, struct.error,
            ValueError, TypeError, KeyError, IndexError, AttributeError, OSError) as e:
        raise PthFormatError(f"{path}: corrupt or truncated PyTorch checkpoint "
                             f"({type(e).__name__}: {e})") from e
    raise PthFormatError(f"{path}: not a PyTorch checkpoint: expected a zip archive "
                         "(torch >= 1.6) or the legacy pickle format; tar-format "
                         "checkpoints from torch < 0.4 are not supported")


def extract_state_dict(obj: Any, *, unwrap: str | None = "auto",
                       strip_prefix: str | None = "module.") -> dict[str, np.ndarray]:
    """Turn an unpickled checkpoint into a flat ``{name: ndarray}`` state dict.

    Args:
      obj: what :func:`read_pth` returned.
      unwrap: "auto" -- if ``obj`` is a dict that is not itself a state dict, take the first
        of :data:`STATE_DICT_KEYS` present; a key name -- take ``obj[key]``; None -- no unwrap.
      strip_prefix: removed from every key that starts with it (DataParallel's "module.");
        None keeps keys as they are.
    """
    if not isinstance(obj, Mapping):
        raise PthFormatError(f"expected a dict-like checkpoint, got {type(obj).__name__}")
    if unwrap == "auto":
        if not all(isinstance(v, np.ndarray) for v in obj.values()):
            for key in STATE_DICT_KEYS:
                if isinstance(obj.get(key), Mapping):
                    obj = obj[key]
                    break
    elif unwrap is not None:
        if unwrap not in obj:
            raise PthFormatError(f"checkpoint has no key '{unwrap}'; keys: {sorted(obj)}")
        obj = obj[unwrap]
    bad = sorted(str(k) for k, v in obj.items() if not isinstance(v, np.ndarray))
    if bad:
        raise PthFormatError(f"not a state dict: entries without a tensor: {bad[:20]}; "
                             f"try unwrap= one of {sorted(map(str, obj))[:20]}")
    out: dict[str, np.ndarray] = {}
    for k, v in obj.items():
        name = k[len(strip_prefix):] if strip_prefix and k.startswith(strip_prefix) else k
        if name in out:
            raise PthFormatError(f"stripping '{strip_prefix}' makes key '{name}' ambiguous")
        out[name] = v
    return out


def load_pth(path: str | Path, *, unwrap: str | None = "auto",
             strip_prefix: str | None = "module.") -> dict[str, np.ndarray]:
    """Read a checkpoint and return its state dict (see :func:`extract_state_dict`)."""
    try:
        return extract_state_dict(read_pth(path), unwrap=unwrap, strip_prefix=strip_prefix)
    except PthFormatError as e:
        if str(path) in str(e):
            raise
        raise PthFormatError(f"{path}: {e}") from None


def _storage_name_for(dtype: np.dtype, key: str) -> str:
    if dtype.name == "bfloat16":
        return "BFloat16Storage"
    for name, code in STORAGE_DTYPES.items():
        if name != "BFloat16Storage" and np.dtype(code) == dtype.newbyteorder("="):
            return name
    raise TypeError(f"save_pth: entry '{key}' has dtype {dtype}, which torch cannot store")


def _pickle_int(n: int) -> bytes:
    if -(2 ** 31) <= n < 2 ** 31:
        return b"J" + struct.pack("<i", n)  # BININT
    raw = n.to_bytes((n.bit_length() + 8) // 8, "little", signed=True)
    return b"\x8a" + bytes([len(raw)]) + raw  # LONG1


def _pickle_str(s: str) -> bytes:
    raw = s.encode("utf-8")
    return b"X" + struct.pack("<I", len(raw)) + raw  # BINUNICODE


def _pickle_tuple(items: list[bytes]) -> bytes:
    return b"(" + b"".join(items) + b"t"  # MARK ... TUPLE


def _encode_state_dict(keys: list[str], arrays: list[np.ndarray], names: list[str]) -> bytes:
    """Protocol-2 pickle of an OrderedDict of tensors, exactly as torch.save lays it out."""
    ordered_dict = b"ccollections\nOrderedDict\n)R"  # GLOBAL, EMPTY_TUPLE, REDUCE
    out = [b"\x80\x02", ordered_dict, b"("]
    for i, (key, a, name) in enumerate(zip(keys, arrays, names)):
        strides = [int(np.prod(a.shape[d + 1:], dtype=np.int64)) for d in range(a.ndim)]
        pid = _pickle_tuple([_pickle_str("storage"), f"ctorch\n{name}\n".encode(),
                             _pickle_str(str(i)), _pickle_str("cpu"), _pickle_int(a.size)])
        args = _pickle_tuple([pid + b"Q", _pickle_int(0),  # BINPERSID, storage offset
                              _pickle_tuple([_pickle_int(n) for n in a.shape]),
                              _pickle_tuple([_pickle_int(n) for n in strides]),
                              b"\x89", ordered_dict])  # requires_grad=False, hooks
        out += [_pickle_str(key), b"ctorch._utils\n_rebuild_tensor_v2\n", args, b"R"]
    out += [b"u", b"."]  # SETITEMS, STOP
    return b"".join(out)


def save_pth(state_dict: Mapping[str, Any], path: str | Path) -> None:
    """Write ``{name: array}`` as a torch zip checkpoint that ``torch.load`` reads.

    Arrays are stored C-contiguous, one storage each, little-endian, 64-byte aligned.
    Supported dtypes: float16/32/64, bfloat16 (ml_dtypes), int8/16/32/64, uint8, bool,
    complex64/128. Keys must be str.
    """
    path = Path(path)
    arrays, names = [], []
    for k, v in state_dict.items():
        if not isinstance(k, str):
            raise TypeError(f"save_pth({path}): key {k!r} is not a str")
        a = np.asarray(v)
        names.append(_storage_name_for(a.dtype, k))
        arrays.append(a)
    archive = "archive"
    records = [(f"{archive}/data.pkl", _encode_state_dict(list(state_dict), arrays, names)),
               (f"{archive}/.format_version", b"1"), (f"{archive}/.storage_alignment", b"64"),
               (f"{archive}/byteorder", b"little")]
    for i, a in enumerate(arrays):
        records.append((f"{archive}/data/{i}", np.ascontiguousarray(
            a, a.dtype.newbyteorder("<")).tobytes()))
    records.append((f"{archive}/version", b"3\n"))
    with open(path, "wb") as f, zipfile.ZipFile(f, "w", zipfile.ZIP_STORED) as zf:
        for name, data in records:
            info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
            start = f.tell() + 30 + len(name.encode()) + 4  # local header + our extra header
            info.extra = struct.pack("<HH", 0x4246, -start % 64) + b"Z" * (-start % 64)
            zf.writestr(info, data)
