"""Read PyTorch ``.pth`` checkpoints with only the standard library and NumPy.

Two on-disk formats exist (both produced by ``torch.save``):

* zip (torch >= 1.6): ``<archive>/data.pkl`` (a pickle whose tensors point, through
  persistent ids ``('storage', StorageType, key, location, numel)``, at raw storages
  ``<archive>/data/<key>``), ``<archive>/byteorder`` ("little"/"big"), ``<archive>/version``.
* legacy (older torch): five pickles back to back -- magic number, protocol version (1001),
  system info, the object, the list of storage keys -- then, for each key in that order, an
  int64 element count followed by the raw storage bytes.

The pickle is read by a restricted, bounded unpickler (:mod:`vtadl_jax.convert.pth_unpickle`;
storages, views and limits: :mod:`vtadl_jax.convert.pth_storage`;
allow-listed globals only, tensors materialised as the pickle builds them, flat dict keys).
Every failure -- a missing file, a directory, a truncated or corrupt archive, a disallowed
global, a zip bomb, an impossible tensor view -- raises :class:`PthFormatError` (a
ValueError; FileNotFoundError for a missing file) whose message starts with the path.
Memory is bounded: a read allocates at most ``max_bytes`` (default: 64 MiB + 4 x the file's
size, or $VTADL_MAX_CHECKPOINT_BYTES), charged before each allocation, and a zip record is
read only when its declared size is exactly what the pickle says its storage holds.
torch is never imported. bfloat16 storages are widened exactly to float32. Writing:
:func:`vtadl_jax.convert.pth_write.save_pth` (re-exported here).
"""
from __future__ import annotations

import io
import os
import struct
import zipfile
import zlib
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from vtadl_jax.convert.pth_storage import (STORAGE_DTYPES, Limits, PthFormatError, Storage,
                                           UnsafePickleError, short_repr)
from vtadl_jax.convert.pth_unpickle import CheckpointUnpickler
from vtadl_jax.convert.pth_write import save_pth

__all__ = ["PthFormatError", "UnsafePickleError", "read_pth", "load_pth",
           "extract_state_dict", "save_pth", "STATE_DICT_KEYS", "MAX_BYTES_ENV",
           "default_max_bytes"]

STATE_DICT_KEYS = ("state_dict", "model", "model_state_dict", "net")
LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
MAX_BYTES_ENV = "VTADL_MAX_CHECKPOINT_BYTES"
_SMALL_RECORD = 64  # byteorder, version
# what a corrupt file can make zipfile / pickle / NumPy raise (turned into PthFormatError)
_CORRUPT = (zipfile.BadZipFile, zipfile.LargeZipFile, zlib.error, EOFError, ArithmeticError,
            AttributeError, ImportError, LookupError, MemoryError, OSError, RuntimeError,
            TypeError, ValueError, struct.error)


def default_max_bytes(path: str | Path) -> int:
    """The reading limit of a file: $VTADL_MAX_CHECKPOINT_BYTES, else 64 MiB + 4 x its size."""
    env = os.environ.get(MAX_BYTES_ENV, "").strip()
    if env:
        try:
            value = int(env)
        except ValueError:
            value = 0
        if value <= 0:
            raise ValueError(f"{MAX_BYTES_ENV} must be a positive number of bytes, got {env!r}"
                             f" (reading {path})")
        return value
    return 64 * 2 ** 20 + 4 * os.path.getsize(path)


def _dtype(name: str, big_endian: bool) -> np.dtype:
    return np.dtype(STORAGE_DTYPES[name]).newbyteorder(">" if big_endian else "<")


def _read_record(zf: zipfile.ZipFile, name: str, size: int, path: str) -> bytes:
    """The record's bytes, which must be exactly ``size``; never inflates more."""
    try:
        info = zf.getinfo(name)
    except KeyError:
        raise PthFormatError(f"{path}: missing record '{name}' in the zip archive") from None
    if info.file_size != size:
        raise PthFormatError(f"{path}: record '{name}' declares {info.file_size} bytes, "
                             f"expected {size}")
    with zf.open(info) as f:
        data = f.read(size + 1)
    if len(data) != size:
        raise PthFormatError(f"{path}: record '{name}' holds {len(data)} bytes, "
                             f"expected {size}")
    return data


def _read_zip(path: str, limits: Limits) -> Any:
    with zipfile.ZipFile(path) as zf:
        names = zf.namelist()
        pkl = [n for n in names if n.endswith("data.pkl") and n.count("/") == 1]
        if len(pkl) != 1:
            raise PthFormatError(f"{path}: zip archive has no '<archive>/data.pkl' record "
                                 f"(found {', '.join(short_repr(n) for n in names[:5])}...)")
        prefix = pkl[0][: -len("data.pkl")]
        order = prefix + "byteorder"
        big = False
        if order in names:
            size = zf.getinfo(order).file_size
            if size > _SMALL_RECORD:
                raise PthFormatError(f"{path}: record '{order}' declares {size} bytes")
            big = _read_record(zf, order, size, path).strip() == b"big"
        storages: dict[str, Storage] = {}

        def on_storage(name: str, key: str, numel: int, view) -> Storage:
            if key not in storages:
                record, dtype = f"{prefix}data/{key}", _dtype(name, big)
                limits.take_bytes(numel * dtype.itemsize, f"storage '{record}'")
                st = Storage(key, name, numel)
                st.data = np.frombuffer(_read_record(zf, record, numel * dtype.itemsize, path),
                                        dtype)
                storages[key] = st
            elif storages[key].name != name or storages[key].numel != numel:
                raise PthFormatError(f"{path}: storage '{key}' is used with two types/sizes")
            return storages[key]

        info = zf.getinfo(pkl[0])
        limits.take_bytes(info.file_size, f"pickle record '{pkl[0]}'")
        limits.allow_work_for(info.file_size)
        data = _read_record(zf, pkl[0], info.file_size, path)
        return CheckpointUnpickler(io.BytesIO(data), limits, on_storage).load()


class _BoundedFile:
    """A binary file whose reads never ask for more than what remains (no huge buffers)."""

    def __init__(self, f, size: int):
        self._f, self._size = f, size

    def read(self, n: int = -1) -> bytes:
        left = self._size - self._f.tell()
        return self._f.read(left if n is None or n < 0 else min(n, left))

    def readinto(self, buf) -> int:
        return self._f.readinto(buf)

    def readline(self) -> bytes:
        return self._f.readline(4096)

    def tell(self) -> int:
        return self._f.tell()

    def seek(self, pos: int) -> None:
        self._f.seek(pos)


def _read_legacy(path: str, limits: Limits) -> Any:
    storages: dict[str, Storage] = {}

    def on_storage(name: str, key: str, numel: int, view) -> Storage:
        if key not in storages:
            storages[key] = Storage(key, name, numel)
        root = storages[key]
        if root.name != name or root.numel != numel:
            raise PthFormatError(f"{path}: storage '{key}' is used with two types/sizes")
        if view is None:
            return root
        view_key, offset, view_numel = str(view[0]), int(view[1]), int(view[2])
        if not (0 <= offset and 0 <= view_numel and offset + view_numel <= root.numel):
            raise PthFormatError(f"{path}: storage view '{view_key}' ({offset}+{view_numel}) "
                                 f"lies outside storage '{key}' of {root.numel} elements")
        if view_key not in storages:
            storages[view_key] = Storage(view_key, name, view_numel)
            storages[view_key].base = (root, offset)
        return storages[view_key]

    with open(path, "rb") as raw:
        size = os.fstat(raw.fileno()).st_size
        f = _BoundedFile(raw, size)
        limits.allow_work_for(size)

        def load(defer: bool = True):
            return CheckpointUnpickler(f, limits, on_storage, defer_tensors=defer).load()
        if load() != LEGACY_MAGIC or load() != 1001:
            raise PthFormatError(f"{path}: legacy pickle without the PyTorch magic number")
        info = load()
        little = not isinstance(info, dict) or info.get("little_endian", True) is not False
        start = f.tell()
        load()  # the object, tensors deferred: their storages come after the key list
        keys = load()
        if not isinstance(keys, list):
            raise PthFormatError(f"{path}: legacy storage key list is a {type(keys).__name__}")
        for key in keys:
            st = storages.get(str(key)) if isinstance(key, (str, int)) else None
            if st is None or st.base is not None or st.data is not None:
                raise PthFormatError(f"{path}: storage key {short_repr(key)} listed but never "
                                     "used, or listed twice")
            dtype = _dtype(st.name, not little)
            head = f.read(8)
            count = struct.unpack("<q" if little else ">q", head)[0] if len(head) == 8 else -1
            nbytes = st.numel * dtype.itemsize
            if count != st.numel or size - f.tell() < nbytes:
                raise PthFormatError(f"{path}: storage '{key}' is truncated or inconsistent "
                                     f"(expected {st.numel} elements)")
            limits.take_bytes(nbytes, f"storage '{key}'")
            st.data = np.frombuffer(f.read(nbytes), dtype)
        if any(st.data is None for st in storages.values() if st.base is None):
            raise PthFormatError(f"{path}: a storage the pickle uses is not in the key list")
        f.seek(start)
        return load(defer=False)


def read_pth(path: str | Path, *, max_bytes: int | None = None) -> Any:
    """Unpickle a ``.pth`` file (zip or legacy format) with every tensor as an np.ndarray.

    Args:
      path: the checkpoint file.
      max_bytes: the most this read may allocate (pickle, storages, tensors); None:
        :func:`default_max_bytes` (64 MiB + 4 x the file size, or $VTADL_MAX_CHECKPOINT_BYTES).
    Returns whatever object was saved (usually a dict). Raises FileNotFoundError if absent,
    :class:`UnsafePickleError` for disallowed globals and :class:`PthFormatError` for
    anything else (a directory, truncated/unknown/oversized files); messages name ``path``.
    """
    path = str(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such file (expected a PyTorch .pth checkpoint)")
    if not os.path.isfile(path):
        kind = "a directory" if os.path.isdir(path) else "not a regular file"
        raise PthFormatError(f"{path} is {kind}; expected a PyTorch .pth checkpoint file")
    hint = f"To read a genuinely large checkpoint pass max_bytes= or set {MAX_BYTES_ENV}."
    limits = Limits(path, default_max_bytes(path) if max_bytes is None else max_bytes, hint)
    try:
        with open(path, "rb") as f:
            head = f.read(16)
        if zipfile.is_zipfile(path):
            return _read_zip(path, limits)
        if head.startswith(b"PK\x03\x04"):
            raise zipfile.BadZipFile("zip archive without its central directory")
        if head.startswith(b"\x80\x02\x8a\x0a"):
            return _read_legacy(path, limits)
    except PthFormatError:
        raise
    except _CORRUPT as e:
        raise PthFormatError(f"{path}: corrupt or truncated PyTorch checkpoint "
                             f"({type(e).__name__}: {str(e)[:200]})") from None
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
        raise PthFormatError(f"expected a dict-like checkpoint (a state dict), got "
                             f"{type(obj).__name__}")
    if unwrap == "auto":
        if not all(isinstance(v, np.ndarray) for v in obj.values()):
            for key in STATE_DICT_KEYS:
                if isinstance(obj.get(key), Mapping):
                    obj = obj[key]
                    break
    elif unwrap is not None:
        if unwrap not in obj:
            raise PthFormatError(f"checkpoint has no key '{unwrap}'; keys: {_some_keys(obj)}")
        obj = obj[unwrap]
        if not isinstance(obj, Mapping):
            raise PthFormatError(f"checkpoint['{unwrap}'] is a {type(obj).__name__}, "
                                 "expected a state dict")
    bad = [k for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, np.ndarray)]
    if bad:
        raise PthFormatError(f"not a state dict (str key -> tensor): entries {_some_keys(bad)}"
                             f" are not; try unwrap= one of {_some_keys(obj)}")
    out: dict[str, np.ndarray] = {}
    for k, v in obj.items():
        name = k[len(strip_prefix):] if strip_prefix and k.startswith(strip_prefix) else k
        if name in out:
            raise PthFormatError(f"stripping '{strip_prefix}' makes key "
                                 f"{short_repr(name)} ambiguous")
        out[name] = v
    return out


def _some_keys(keys: Any, n: int = 20) -> str:
    shown = [short_repr(k, 60) for _, k in zip(range(n), keys)]
    return "[" + ", ".join(shown) + (", ...]" if len(keys) > n else "]")


def load_pth(path: str | Path, *, unwrap: str | None = "auto",
             strip_prefix: str | None = "module.",
             max_bytes: int | None = None) -> dict[str, np.ndarray]:
    """Read a checkpoint and return its state dict (see :func:`extract_state_dict`).

    ``max_bytes``: as :func:`read_pth`. Every error message starts with ``path``.
    """
    try:
        return extract_state_dict(read_pth(path, max_bytes=max_bytes), unwrap=unwrap,
                                  strip_prefix=strip_prefix)
    except PthFormatError as e:
        if str(e).startswith(str(path)):
            raise
        raise type(e)(f"{path}: {e}") from None
