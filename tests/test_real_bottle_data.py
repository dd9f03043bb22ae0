"""The data layer on the real MVTec AD bottle category (skipped when it is absent; see
tests/real_bottle.py for where it is looked for).

Checked against an independent listing (os) and decoding (PIL): the published counts
(209 train, 83 test, 63 masks, per-defect counts), every label, defect name, file name
and mask of the direct backend; a TFDS build of a small fixed subset (the whole
category takes minutes to build on a 2-core CPU) equal to the files; a root holding
only bottle: the other categories are reported missing, clearly.
"""
import os
import sys

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from real_bottle import (DEFECT_COUNTS, NUM_MASKS, NUM_TEST, NUM_TRAIN,  # noqa: E402
                         copy_subset, list_files, require_bottle)
from vtadl_jax.data import (MVTEC_CATEGORIES, MissingDataError, make_source,  # noqa: E402
                            mvtec_categories_present)


def _pil_mask(path) -> np.ndarray:
    return (np.asarray(Image.open(path).convert("L")) > 0).astype(np.uint8)


def test_listing_has_the_published_counts():
    files = list_files(require_bottle())
    assert len(files["train"]) == NUM_TRAIN
    assert sum(len(v) for v in files["test"].values()) == NUM_TEST
    assert {k: len(v) for k, v in files["test"].items()} == DEFECT_COUNTS
    assert sum(len(v) for v in files["masks"].values()) == NUM_MASKS
    assert set(files["masks"]) == set(DEFECT_COUNTS) - {"good"}


def test_direct_backend_matches_the_files():
    root = require_bottle()
    files = list_files(root)
    train = make_source("mvtec_ad/bottle", "train", root=root, backend="direct", verify=False)
    assert len(train) == NUM_TRAIN
    assert [train.raw(i)["filename"] for i in (0, NUM_TRAIN - 1)] == [
        f"train/good/{files['train'][0]}", f"train/good/{files['train'][-1]}"]
    test = make_source("mvtec_ad/bottle", "test", root=root, backend="direct", verify=False)
    assert len(test) == NUM_TEST
    expected = sorted((f"test/{k}/{n}", k) for k, names in files["test"].items() for n in names)
    seen, per_kind, with_mask = [], {}, 0
    base = root / "bottle"
    for i in range(len(test)):
        ex = test.raw(i)
        seen.append((ex["filename"], ex["defect"]))
        per_kind[ex["defect"]] = per_kind.get(ex["defect"], 0) + 1
        assert ex["label"] == int(ex["defect"] != "good"), ex["filename"]
        if ex["defect"] == "good":
            assert not ex["mask"].any(), ex["filename"]
            continue
        stem = os.path.splitext(os.path.basename(ex["filename"]))[0]
        ref = _pil_mask(base / "ground_truth" / ex["defect"] / f"{stem}_mask.png")
        np.testing.assert_array_equal(ex["mask"], ref, err_msg=ex["filename"])
        assert ref.any(), ex["filename"]  # every bottle defect mask marks some pixels
        with_mask += 1
    assert seen == expected
    assert per_kind == DEFECT_COUNTS
    assert with_mask == NUM_MASKS
    # Images: one of each kind, pixel for pixel against PIL.
    for kind in DEFECT_COUNTS:
        i = next(j for j, (_, k) in enumerate(seen) if k == kind)
        ref = np.asarray(Image.open(base / seen[i][0]).convert("RGB"))
        np.testing.assert_array_equal(test.raw(i)["image"], ref)


def test_tfds_build_of_a_subset_equals_the_files(tmp_path):
    root = copy_subset(require_bottle(), tmp_path / "mvtec", num_train=2,
                       per_kind={k: 1 for k in DEFECT_COUNTS})
    files = list_files(root)
    for split, count in (("train", 2), ("test", len(DEFECT_COUNTS))):
        src = make_source("mvtec_ad/bottle", split, root=root, data_dir=tmp_path / "tfds")
        assert len(src) == count
        for i in range(count):
            ex = src.raw(i)
            path = root / "bottle" / ex["filename"]
            kind = ex["filename"].split("/")[1]
            assert ex["defect"] == kind and ex["label"] == int(kind != "good")
            np.testing.assert_array_equal(
                ex["image"], np.asarray(Image.open(path).convert("RGB")), err_msg=str(path))
            if kind == "good":
                assert not ex["mask"].any()
            else:
                mask = root / "bottle" / "ground_truth" / kind / f"{path.stem}_mask.png"
                np.testing.assert_array_equal(ex["mask"], _pil_mask(mask))
    assert sorted(f"{k}/{n}" for k, v in files["test"].items() for n in v) == sorted(
        src.raw(i)["filename"].removeprefix("test/") for i in range(len(src)))


def test_root_with_only_bottle_reports_the_missing_categories(tmp_path):
    root = require_bottle()
    present, missing = mvtec_categories_present(root)
    assert "bottle" in present
    assert sorted(present + missing) == sorted(MVTEC_CATEGORIES)
    absent = next((c for c in missing), None)
    if absent is None:
        pytest.skip(f"{root} holds every category")
    for backend in ("direct", "tfds"):
        with pytest.raises(MissingDataError, match=f"{absent}.*found: .*bottle"):
            make_source(f"mvtec_ad/{absent}", "test", root=root, backend=backend,
                        data_dir=tmp_path / "tfds")
