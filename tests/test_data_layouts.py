"""Layout readers: correct listings and loud, path-naming errors on bad inputs."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vtadl_jax.data import (DatasetError, InvalidImageError, InvalidMaskError,
                            MissingDataError, load_mask, make_source, scan_btad, scan_folder,
                            scan_mvtec, verify_records)
from vtadl_jax.data.synthetic import make_synthetic_mvtec
from vtadl_jax.data.synthetic_btad import make_synthetic_btad


@pytest.fixture
def mvtec(tmp_path: Path) -> Path:
    return make_synthetic_mvtec(tmp_path / "mvtec", categories=("carpet", "bottle"),
                                num_train=3, num_test_good=2, num_test_defect=2,
                                image_size=32)


def _all(splits):
    return splits["train"] + splits["test"]


def test_mvtec_listing_sorted_and_paired(mvtec: Path) -> None:
    splits = scan_mvtec(mvtec, "bottle")
    assert [r.filename for r in splits["train"]] == [f"train/good/{i:03d}.png" for i in range(3)]
    test = splits["test"]
    assert [r.filename for r in test] == sorted(r.filename for r in test)
    assert {r.defect for r in test} == {"good", "missing", "scratch", "stain"}
    for rec in test:
        if rec.defect == "good":
            assert rec.mask is None and rec.label == 0
        else:
            assert rec.label == 1
            assert rec.mask == mvtec / "bottle" / "ground_truth" / rec.defect / \
                f"{rec.image.stem}_mask.png"
    verify_records(_all(splits))


def test_btad_mixed_extensions_matched_by_stem(tmp_path: Path) -> None:
    root = make_synthetic_btad(tmp_path / "btad", num_train=2, num_test_good=1,
                               num_test_defect=2, image_size=32)
    expected = {"01": (".bmp", ".png"), "02": (".png", ".png"), "03": (".bmp", ".bmp")}
    for product, (img_ext, mask_ext) in expected.items():
        splits = scan_btad(root, product)
        ko = [r for r in splits["test"] if r.label == 1]
        assert len(ko) == 2 and len(splits["train"]) == 2
        for rec in ko:
            assert rec.image.suffix == img_ext and rec.mask.suffix == mask_ext
            assert rec.mask.stem == rec.image.stem
        verify_records(_all(splits))


def test_missing_category_names_path(mvtec: Path) -> None:
    with pytest.raises(MissingDataError, match=str(mvtec / "zipper")):
        scan_mvtec(mvtec, "zipper")


def test_unknown_category(mvtec: Path) -> None:
    with pytest.raises(DatasetError, match="Unknown MVTec AD category"):
        scan_mvtec(mvtec, "toaster")


@pytest.mark.parametrize("split", ["train", "test"])
def test_missing_split_names_path(mvtec: Path, split: str) -> None:
    target = mvtec / "bottle" / split
    target.rename(mvtec / "bottle" / f"{split}_moved")
    with pytest.raises(MissingDataError, match=str(target)):
        scan_mvtec(mvtec, "bottle")


def test_empty_train_good(mvtec: Path) -> None:
    good = mvtec / "bottle" / "train" / "good"
    for f in good.iterdir():
        f.unlink()
    with pytest.raises(MissingDataError, match=f"No training images in {good}"):
        scan_mvtec(mvtec, "bottle")


def test_missing_mask_names_image(mvtec: Path) -> None:
    mask = mvtec / "bottle" / "ground_truth" / "stain" / "001_mask.png"
    mask.unlink()
    with pytest.raises(MissingDataError, match=r"test/stain/001\.png.*001_mask"):
        scan_mvtec(mvtec, "bottle")


def test_missing_ground_truth_folder(mvtec: Path) -> None:
    gt = mvtec / "carpet" / "ground_truth" / "hole"
    for f in gt.iterdir():
        f.unlink()
    gt.rmdir()
    with pytest.raises(MissingDataError, match=str(gt)):
        scan_mvtec(mvtec, "carpet")


def test_orphan_mask_is_an_error(mvtec: Path) -> None:
    gt = mvtec / "bottle" / "ground_truth" / "stain"
    orphan = gt / "999_mask.png"
    orphan.write_bytes((gt / "000_mask.png").read_bytes())
    with pytest.raises(DatasetError, match=f"Masks without a test image.*{orphan}"):
        scan_mvtec(mvtec, "bottle")


def test_mask_of_another_size(mvtec: Path) -> None:
    mask = mvtec / "bottle" / "ground_truth" / "scratch" / "000_mask.png"
    Image.fromarray(np.zeros((16, 32), np.uint8)).save(mask)
    splits = scan_mvtec(mvtec, "bottle")
    with pytest.raises(InvalidMaskError, match=rf"{mask}.*\(16, 32\).*\(32, 32\)"):
        verify_records(splits["test"])


def test_truncated_image(mvtec: Path) -> None:
    path = mvtec / "bottle" / "train" / "good" / "001.png"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    splits = scan_mvtec(mvtec, "bottle")
    with pytest.raises(InvalidImageError, match=str(path)):
        verify_records(splits["train"])


def test_unreadable_image(mvtec: Path) -> None:
    path = mvtec / "bottle" / "test" / "good" / "000.png"
    path.write_bytes(b"not an image at all")
    with pytest.raises(InvalidImageError, match=str(path)):
        verify_records(scan_mvtec(mvtec, "bottle")["test"])


def test_non_binary_mask_error_and_threshold(mvtec: Path) -> None:
    mask_path = mvtec / "bottle" / "ground_truth" / "stain" / "000_mask.png"
    grey = np.zeros((32, 32), np.uint8)
    grey[10:20, 10:20] = 255
    grey[9, 10:20] = 128  # an anti-aliased edge
    Image.fromarray(grey).save(mask_path)
    with pytest.raises(InvalidMaskError, match=rf"{mask_path} is not binary.*128"):
        verify_records(scan_mvtec(mvtec, "bottle")["test"])
    # The error is raised before training also through the pipeline entry point.
    with pytest.raises(InvalidMaskError, match=str(mask_path)):
        make_source("mvtec_ad/bottle", "test", root=mvtec, backend="direct")
    mask = load_mask(mask_path, binarize_threshold=127)
    assert mask.sum() == 110 and mask[9].sum() == 10
    strict = load_mask(mask_path, binarize_threshold=200)
    assert strict.sum() == 100 and strict[9].sum() == 0


def test_mask_conventions_0_1_and_0_255(tmp_path: Path) -> None:
    a = np.zeros((8, 8), np.uint8)
    a[2:4, 2:5] = 1
    Image.fromarray(a).save(tmp_path / "m01.png")
    Image.fromarray(a * 255).save(tmp_path / "m255.bmp")
    for name in ("m01.png", "m255.bmp"):
        np.testing.assert_array_equal(load_mask(tmp_path / name), a)


def test_unexpected_file_in_image_folder(mvtec: Path) -> None:
    stray = mvtec / "bottle" / "test" / "good" / "notes.txt"
    stray.write_text("x")
    with pytest.raises(DatasetError, match=str(stray)):
        scan_mvtec(mvtec, "bottle")


def test_folder_same_stem_masks_and_optional_masks(tmp_path: Path) -> None:
    root = tmp_path / "plain"
    img = np.full((16, 16, 3), 100, np.uint8)
    m = np.zeros((16, 16), np.uint8)
    m[4:8, 4:8] = 255
    for rel in ("train/good/a.png", "test/good/b.png", "test/dent/c.jpg", "test/odd/d.png"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(root / rel)
    (root / "ground_truth" / "dent").mkdir(parents=True)
    Image.fromarray(m).save(root / "ground_truth" / "dent" / "c.png")  # same stem
    with pytest.raises(MissingDataError, match=str(root / "ground_truth" / "odd")):
        scan_folder(root)
    splits = scan_folder(root, require_masks=False)
    by_defect = {r.defect: r for r in splits["test"]}
    assert by_defect["dent"].mask == root / "ground_truth" / "dent" / "c.png"
    assert by_defect["odd"].mask is None and by_defect["odd"].label == 1
    verify_records(splits["test"])


def test_mvtec_categories_present(tmp_path):
    from vtadl_jax.data import DatasetError, MissingDataError, mvtec_categories_present

    (tmp_path / "bottle" / "train" / "good").mkdir(parents=True)
    (tmp_path / "cable" / "test").mkdir(parents=True)  # no train/good: not a category here
    present, missing = mvtec_categories_present(tmp_path)
    assert present == ["bottle"] and "cable" in missing and len(missing) == 14
    assert mvtec_categories_present(tmp_path, ["screw", "bottle"]) == (["bottle"], ["screw"])
    nested = tmp_path / "outer"
    (nested / "mvtec_anomaly_detection" / "screw" / "train" / "good").mkdir(parents=True)
    assert mvtec_categories_present(nested)[0] == ["screw"]
    with pytest.raises(MissingDataError, match="train/good"):
        mvtec_categories_present(tmp_path, ["screw"])
    with pytest.raises(DatasetError, match="Unknown MVTec AD categories"):
        mvtec_categories_present(tmp_path, ["bottel"])
    with pytest.raises(MissingDataError, match="MVTec AD root folder"):
        mvtec_categories_present(tmp_path / "nope")
