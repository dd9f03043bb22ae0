"""Random-access sources: raw examples from TFDS, from files, or from arrays.

A :class:`Source` combines a raw reader (returning uint8 images) with a
:class:`~vtadl_jax.data.preprocess.Preprocessing`. ``source[i]`` returns

    {"image": float32 (H, W, C), "mask": uint8 (H, W) in {0, 1},
     "label": int32 (0 normal, 1 anomalous), "defect": str, "filename": str}
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np

from vtadl_jax.data.image_files import load_image, load_mask
from vtadl_jax.data.layouts import Record
from vtadl_jax.data.preprocess import Preprocessing

__all__ = ["RawReader", "TfdsReader", "RecordReader", "ArrayReader", "Source"]


class RawReader(Protocol):
    """Random access to raw examples: image uint8 (H, W, C), mask uint8 (H, W) {0, 1}."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> dict[str, Any]: ...


def _text(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


class TfdsReader:
    """Reads a TFDS data source (``builder.as_data_source(split)``) built by our builders."""

    def __init__(self, data_source: Any) -> None:
        self._ds = data_source

    def __len__(self) -> int:
        return len(self._ds)

    def __getitem__(self, index: int) -> dict[str, Any]:
        ex = self._ds[index]
        return {"image": np.asarray(ex["image"], np.uint8),
                "mask": (np.asarray(ex["mask"])[..., 0] > 0).astype(np.uint8),
                "label": int(ex["label"]), "defect": _text(ex["defect"]),
                "filename": _text(ex["filename"])}


class RecordReader:
    """Reads image files listed by a layout scan (the direct, TFDS-free path)."""

    def __init__(self, records: Sequence[Record], *, binarize_threshold: int | None = None
                 ) -> None:
        self._records = list(records)
        self._threshold = binarize_threshold

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, index: int) -> dict[str, Any]:
        rec = self._records[index]
        image = load_image(rec.image, channels=3)
        if rec.mask is None:
            mask = np.zeros(image.shape[:2], np.uint8)
        else:
            mask = load_mask(rec.mask, expected_size=image.shape[:2],
                             binarize_threshold=self._threshold)
        return {"image": image, "mask": mask, "label": rec.label, "defect": rec.defect,
                "filename": rec.filename}


class ArrayReader:
    """In-memory grey images (N, H, W) with labels, defects and names (e.g. MNIST)."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, defects: Sequence[str],
                 filenames: Sequence[str]) -> None:
        if not len(images) == len(labels) == len(defects) == len(filenames):
            raise ValueError("images, labels, defects and filenames differ in length")
        self._images, self._labels = images, np.asarray(labels, np.int32)
        self._defects, self._filenames = list(defects), list(filenames)

    def __len__(self) -> int:
        return len(self._images)

    def __getitem__(self, index: int) -> dict[str, Any]:
        image = np.asarray(self._images[index], np.uint8)
        image = image[..., None] if image.ndim == 2 else image
        return {"image": image, "mask": np.zeros(image.shape[:2], np.uint8),
                "label": int(self._labels[index]), "defect": self._defects[index],
                "filename": self._filenames[index]}


class Source:
    """A preprocessed, random-access dataset split.

    Attributes:
      name: dataset name, e.g. "mvtec_ad/bottle".
      split: "train" or "test".
      preprocessing: the :class:`Preprocessing` applied by ``__getitem__``.
      backend: "tfds" or "direct".
    """

    def __init__(self, reader: RawReader, preprocessing: Preprocessing, *, name: str,
                 split: str, backend: str) -> None:
        self._reader = reader
        self.preprocessing = preprocessing
        self.name, self.split, self.backend = name, split, backend

    def __len__(self) -> int:
        return len(self._reader)

    def _check(self, index: int) -> int:
        n = len(self)
        i = int(index)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"index {index} out of range for {self.name}/{self.split} "
                             f"with {n} examples")
        return i

    def raw(self, index: int) -> dict[str, Any]:
        """The stored example (uint8 image, {0, 1} mask) without preprocessing."""
        return self._reader[self._check(index)]

    def __getitem__(self, index: int) -> dict[str, Any]:
        ex = self.raw(index)
        image, mask = self.preprocessing(ex["image"], ex["mask"])
        return {"image": image, "mask": mask, "label": np.int32(ex["label"]),
                "defect": ex["defect"], "filename": ex["filename"]}

    def __repr__(self) -> str:
        return (f"Source({self.name!r}, {self.split!r}, n={len(self)}, "
                f"backend={self.backend!r}, preprocessing={self.preprocessing})")
