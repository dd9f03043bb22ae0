"""The full one-class MNIST TFDS build for one digit (16131 examples, ~10 s)."""
from __future__ import annotations

import sys
import time

import numpy as np
import pytest
import tensorflow_datasets as tfds

from vtadl_jax.data import MnistOneClass

tfds.disable_progress_bar()


@pytest.mark.slow
def test_full_build_digit_5(tmp_path) -> None:
    start = time.perf_counter()
    builder = MnistOneClass(config="5", data_dir=tmp_path)
    builder.download_and_prepare()
    elapsed = time.perf_counter() - start
    train, test = builder.as_data_source("train"), builder.as_data_source("test")
    assert len(train) == 5421 and len(test) == 10000
    assert builder.info.splits["test"].num_examples == 10000
    normal = sum(1 for i in range(0, 10000, 50) if test[i]["label"] == 0)
    assert 0 < normal < 200
    assert test[8]["defect"] == b"good"  # test image 8 is a 5
    assert np.asarray(train[0]["image"]).shape == (28, 28, 1)
    assert "tensorflow" not in sys.modules
    print(f"MnistOneClass('5') full build: {elapsed:.1f} s")


@pytest.mark.slow
def test_make_source_full_digit_through_tfds(tmp_path) -> None:
    """Regression: the pipeline must name the registered config (TFDS refuses a re-created
    config with a registered name), so a full digit builds through make_source."""
    from vtadl_jax.data import make_source

    train = make_source("mnist_one_class/5", "train", data_dir=tmp_path, preset="mnist")
    test = make_source("mnist_one_class/5", "test", data_dir=tmp_path, preset="mnist")
    assert len(train) == 5421 and len(test) == 10000
    assert train[0]["image"].shape == (28, 28, 1)
