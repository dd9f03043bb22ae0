"""Storages, tensor views and the reading limits of the .pth reader (no torch needed).

A checkpoint's tensors are views (offset, shape, strides in elements) into typed
storages; :func:`materialise` copies one out after checking that every element it reaches
lies inside its storage and charging its bytes to the read's :class:`Limits`.
"""
from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["PthFormatError", "UnsafePickleError", "STORAGE_DTYPES", "ATOMS", "Limits",
           "Storage", "materialise", "short_repr"]

# torch storage type -> NumPy element type (bfloat16 is read as raw bits, then widened)
STORAGE_DTYPES = {
    "DoubleStorage": "f8", "FloatStorage": "f4", "HalfStorage": "f2", "BFloat16Storage": "u2",
    "LongStorage": "i8", "IntStorage": "i4", "ShortStorage": "i2", "CharStorage": "i1",
    "ByteStorage": "u1", "BoolStorage": "?", "ComplexFloatStorage": "c8",
    "ComplexDoubleStorage": "c16",
}
ATOMS = (str, bytes, int, float, bool, type(None))  # hashed and printed in O(len)


class PthFormatError(ValueError):
    """The file is not a readable PyTorch checkpoint (the message names the file)."""


class UnsafePickleError(PthFormatError):
    """The checkpoint's pickle references a global outside the allow-list."""


def short_repr(obj: Any, limit: int = 80) -> str:
    """A repr that is cheap and short whatever ``obj`` is (no deep or shared recursion)."""
    if isinstance(obj, ATOMS):
        text = repr(obj)
    elif isinstance(obj, tuple) and all(isinstance(x, ATOMS) for x in obj[:8]):
        text = "(" + ", ".join(short_repr(x, limit) for x in obj[:8]) + \
            (", ...)" if len(obj) > 8 else ")")
    else:
        text = f"<{type(obj).__name__}>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


class Limits:
    """What one read may allocate (bytes) and compute (work units); raises when exceeded."""

    def __init__(self, path: str, max_bytes: int, hint: str):
        self.path, self.max_bytes, self.hint = path, int(max_bytes), hint
        self.bytes_left = self.max_bytes
        self.work_left = 0

    def allow_work_for(self, pickle_bytes: int) -> None:
        self.work_left += 100_000 + 2 * pickle_bytes

    def take_bytes(self, nbytes: int, what: str) -> None:
        if nbytes > self.bytes_left:
            raise PthFormatError(
                f"{self.path}: {what} needs {nbytes} bytes, more than the "
                f"{self.bytes_left} left of this file's reading limit ({self.max_bytes} "
                f"bytes; a zip/decompression bomb or an oversized view?). {self.hint}")
        self.bytes_left -= nbytes

    def take_work(self, units: int) -> None:
        self.work_left -= units
        if self.work_left < 0:
            raise PthFormatError(f"{self.path}: the pickle does more work than its length "
                                 "allows (shared references amplified by copies or key "
                                 "hashing); not a checkpoint torch.save writes")


class Storage:
    """A typed storage of ``numel`` elements; ``data`` (1-D) is filled once its bytes are read.

    ``base`` = (root storage, element offset) for the views of the legacy format.
    """

    def __init__(self, key: str, name: str, numel: int):
        self.key, self.name, self.numel = key, name, numel
        self.data: np.ndarray | None = None
        self.base: tuple["Storage", int] | None = None


def materialise(st: Storage, offset: int, size: tuple, stride: tuple, limits: Limits
            ) -> np.ndarray:
    """Copy the view (offset/shape/strides in elements) out of its storage, checked."""
    if st.base is not None:
        st, offset = st.base[0], offset + st.base[1]
    if st.data is None:
        raise PthFormatError(f"{limits.path}: storage '{st.key}' was never read")
    numel = 1
    for n in size:
        numel *= n
    widen = 2 if st.name == "BFloat16Storage" else 1
    limits.take_bytes(numel * st.data.itemsize * widen,
                      f"tensor of shape {size} on storage '{st.key}'")
    if numel == 0:
        out = np.empty(size, st.data.dtype)
    else:
        last = offset + sum((n - 1) * s for n, s in zip(size, stride))
        if last >= st.data.size:
            raise PthFormatError(f"{limits.path}: tensor of shape {size}, stride {stride}, "
                                 f"offset {offset} reads element {last} of storage "
                                 f"'{st.key}' which holds {st.data.size}")
        item = st.data.itemsize
        out = np.lib.stride_tricks.as_strided(
            st.data[offset:], shape=size, strides=tuple(s * item for s in stride),
            writeable=False).copy()
    if widen == 2:  # exact widening: bf16 bits are the top half of f32
        out = (out.astype(np.uint32) << 16).view(np.float32)
    return out.astype(out.dtype.newbyteorder("="), copy=False)

