"""TFDS builders built from small generated trees and read back without TensorFlow."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from vtadl_jax.data import (Btad, Folder, InvalidMaskError, MissingDataError, MnistOneClass,
                            MvtecAd, folder_config, load_arrays, make_source, mnist_config)
from vtadl_jax.data.synthetic import make_synthetic_mvtec
from vtadl_jax.data.synthetic_btad import make_synthetic_btad

tfds.disable_progress_bar()
FEATURES = {"image", "mask", "label", "defect", "filename"}


def _no_tensorflow() -> None:
    assert importlib.util.find_spec("tensorflow") is None
    assert "tensorflow" not in sys.modules


@pytest.fixture(scope="module")
def mvtec(tmp_path_factory) -> Path:
    return make_synthetic_mvtec(tmp_path_factory.mktemp("mvtec"), categories=("carpet", "bottle"),
                                num_train=4, num_test_good=2, num_test_defect=2,
                                image_size=48)


def _read_all(builder, split):
    ds = builder.as_data_source(split)
    return [ds[i] for i in range(len(ds))]


@pytest.mark.parametrize("category", ["carpet", "bottle"])
def test_mvtec_builder(mvtec: Path, tmp_path: Path, category: str) -> None:
    builder = MvtecAd(config=category, data_dir=tmp_path)
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=str(mvtec)))
    assert builder.info.file_format.value == "array_record"
    train, test = _read_all(builder, "train"), _read_all(builder, "test")
    assert len(train) == 4 and len(test) == 2 + 3 * 2
    for ex in train + test:
        assert set(ex) == FEATURES
        assert ex["image"].shape == (48, 48, 3) and ex["image"].dtype == np.uint8
        assert ex["mask"].shape == (48, 48, 1) and set(np.unique(ex["mask"])) <= {0, 255}
    names = [ex["filename"].decode() for ex in test]
    assert names == sorted(names)  # stored in sorted order
    for ex in test:
        name = ex["filename"].decode()
        src = np.asarray(Image.open(mvtec / category / name).convert("RGB"))
        np.testing.assert_array_equal(ex["image"], src)  # lossless
        defect = ex["defect"].decode()
        assert name.split("/")[1] == defect and ex["label"] == int(defect != "good")
        if defect == "good":
            assert not ex["mask"].any()
        else:
            gt = np.asarray(Image.open(mvtec / category / "ground_truth" / defect /
                                       f"{Path(name).stem}_mask.png"))
            np.testing.assert_array_equal(ex["mask"][..., 0], gt)
    _no_tensorflow()


def test_mvtec_builder_all_configs_and_instructions() -> None:
    assert len(MvtecAd.BUILDER_CONFIGS) == 15
    assert "manual_dir" in MvtecAd.MANUAL_DOWNLOAD_INSTRUCTIONS
    assert [c.name for c in Btad.BUILDER_CONFIGS] == ["01", "02", "03"]
    assert [c.name for c in MnistOneClass.BUILDER_CONFIGS] == [str(d) for d in range(10)]


def test_mvtec_builder_missing_manual_dir(tmp_path: Path) -> None:
    builder = MvtecAd(config="bottle", data_dir=tmp_path / "data")
    missing = tmp_path / "nowhere"
    with pytest.raises(MissingDataError, match=str(missing)):
        builder.download_and_prepare(
            download_config=tfds.download.DownloadConfig(manual_dir=str(missing)))


def test_btad_builder_mixed_extensions(tmp_path: Path) -> None:
    make_synthetic_btad(tmp_path / "BTech_Dataset_transformed", num_train=3,
                        num_test_good=2, num_test_defect=3, image_size=40)
    for product, width in (("01", 40), ("02", 40), ("03", 30)):
        builder = Btad(config=product, data_dir=tmp_path / "data")
        # The parent of BTech_Dataset_transformed/ is accepted as the manual dir.
        builder.download_and_prepare(
            download_config=tfds.download.DownloadConfig(manual_dir=str(tmp_path)))
        test = _read_all(builder, "test")
        assert len(_read_all(builder, "train")) == 3 and len(test) == 5
        assert [ex["defect"].decode() for ex in test] == ["ko"] * 3 + ["ok"] * 2
        for ex in test:
            assert ex["image"].shape == (40, width, 3)
            assert ex["mask"].any() == bool(ex["label"])
        ext = ".bmp" if product in ("01", "03") else ".png"
        assert test[0]["filename"].decode() == f"test/ko/0002{ext}"
    _no_tensorflow()


def test_btad_grey_mask_needs_threshold(tmp_path: Path) -> None:
    root = make_synthetic_btad(tmp_path / "btad", products=("02",), num_train=2,
                               num_test_good=1, num_test_defect=1, image_size=32)
    mask_path = root / "02" / "ground_truth" / "ko" / "0001.png"
    mask = np.asarray(Image.open(mask_path)).copy()
    mask[mask == 255] = 200  # e.g. a mask saved with another white level
    mask[0, 0] = 30
    Image.fromarray(mask).save(mask_path)
    cfg = tfds.download.DownloadConfig(manual_dir=str(root))
    with pytest.raises(InvalidMaskError, match=str(mask_path)):
        Btad(config="02", data_dir=tmp_path / "d1").download_and_prepare(download_config=cfg)
    builder = Btad(config="02", data_dir=tmp_path / "d2", binarize_threshold=127)
    builder.download_and_prepare(download_config=cfg)
    ex = builder.as_data_source("test")[0]
    np.testing.assert_array_equal(ex["mask"][..., 0], np.where(mask > 127, 255, 0))


def test_folder_builder_and_backends_agree(mvtec: Path, tmp_path: Path) -> None:
    config = folder_config(mvtec / "carpet")
    builder = Folder(config=config, data_dir=tmp_path)
    builder.download_and_prepare()
    assert len(_read_all(builder, "test")) == 8
    for split in ("train", "test"):
        via_tfds = load_arrays(make_source("folder", split, root=mvtec / "carpet",
                                           data_dir=tmp_path, preset="vtadl_mvtec", size=32))
        direct = load_arrays(make_source("folder", split, root=mvtec / "carpet",
                                         backend="direct", preset="vtadl_mvtec", size=32))
        assert set(via_tfds) == FEATURES
        for key in FEATURES:
            np.testing.assert_array_equal(via_tfds[key], direct[key])
        assert via_tfds["image"].shape[1:] == (32, 32, 3)
    _no_tensorflow()


def test_folder_config_changes_with_content(mvtec: Path, tmp_path: Path) -> None:
    root = make_synthetic_mvtec(tmp_path / "f", categories=("object",), num_train=2,
                                num_test_good=1, num_test_defect=1, image_size=32)
    before = folder_config(root / "object").name
    (root / "object" / "train" / "good" / "001.png").unlink()
    assert folder_config(root / "object").name != before


def test_mvtec_source_through_tfds(mvtec: Path, tmp_path: Path) -> None:
    src = make_source("mvtec_ad/bottle", "test", root=mvtec, data_dir=tmp_path,
                      preset="vtadl_mvtec", size=32)
    ex = src[len(src) - 1]
    assert ex["image"].dtype == np.float32 and ex["image"].shape == (32, 32, 3)
    assert -1.0 <= ex["image"].min() and ex["image"].max() <= 1.0
    assert ex["mask"].dtype == np.uint8 and set(np.unique(ex["mask"])) <= {0, 1}
    assert ex["label"].dtype == np.int32
    # Built once: a second source reads the cache without needing the manual dir.
    again = make_source("mvtec_ad/bottle", "train", data_dir=tmp_path)
    assert len(again) == 4


def test_mnist_one_class_builder_subset(tmp_path: Path) -> None:
    builder = MnistOneClass(config=mnist_config(7, max_examples=200), data_dir=tmp_path)
    builder.download_and_prepare()
    train, test = _read_all(builder, "train"), _read_all(builder, "test")
    assert len(train) == 200 and len(test) == 200
    assert all(ex["label"] == 0 and ex["defect"] == b"good" for ex in train)
    assert test[0]["filename"] == b"t10k/00000" and test[0]["label"] == 0  # first test digit is 7
    assert test[1]["defect"] == b"digit_2" and test[1]["label"] == 1
    assert test[0]["image"].shape == (28, 28, 1) and not test[0]["mask"].any()
    direct = make_source("mnist_one_class/7", "test", backend="direct", max_examples=200)
    for i in (0, 1, 199):
        np.testing.assert_array_equal(test[i]["image"][..., 0], direct.raw(i)["image"][..., 0])
        assert test[i]["label"] == direct.raw(i)["label"]
    _no_tensorflow()
