"""Write ``{name: array}`` as a PyTorch zip checkpoint (``torch.load`` reads it) without torch.

The pickle is laid out exactly as ``torch.save`` lays out an ``OrderedDict`` of tensors
(protocol 2, one storage per tensor, persistent ids ``('storage', torch.<Type>Storage,
key, 'cpu', numel)``); the records are stored uncompressed and 64-byte aligned.
"""
from __future__ import annotations

import struct
import zipfile
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from vtadl_jax.convert.pth_storage import STORAGE_DTYPES

__all__ = ["save_pth"]


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
