"""Synthetic MVTec-layout generator: layout, determinism, visible but subtle defects."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vtadl_jax.data import scan_folder, scan_mvtec, verify_records
from vtadl_jax.data.synthetic import KIND_DEFECTS, make_synthetic_mvtec, render_example


def _tree_bytes(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_layout_and_counts(tmp_path: Path) -> None:
    root = make_synthetic_mvtec(tmp_path, categories=("texture", "object", "carpet"),
                                num_train=3, num_test_good=2, num_test_defect=2, image_size=48)
    for category, kind in (("texture", "texture"), ("object", "object"), ("carpet", "texture")):
        base = root / category
        splits = scan_mvtec(root, category) if category == "carpet" else scan_folder(base)
        assert len(list((base / "train" / "good").glob("*.png"))) == 3
        assert sorted(d.name for d in (base / "test").iterdir()) == \
            sorted(("good",) + KIND_DEFECTS[kind])
        for defect in KIND_DEFECTS[kind]:
            for i in range(2):
                mask = np.asarray(Image.open(base / "ground_truth" / defect / f"{i:03d}_mask.png"))
                assert mask.shape == (48, 48) and set(np.unique(mask)) == {0, 255}
        assert len(splits["test"]) == 2 + 2 * 3
        verify_records(splits["train"] + splits["test"])


def test_byte_identical_rerun_and_seed_dependence(tmp_path: Path) -> None:
    kwargs = dict(num_train=2, num_test_good=1, num_test_defect=1, image_size=40)
    a = _tree_bytes(make_synthetic_mvtec(tmp_path / "a", seed=3, **kwargs))
    b = _tree_bytes(make_synthetic_mvtec(tmp_path / "b", seed=3, **kwargs))
    c = _tree_bytes(make_synthetic_mvtec(tmp_path / "c", seed=4, **kwargs))
    assert a == b and len(a) == 2 * (2 + 1 + 3 + 3)
    assert a.keys() == c.keys() and a != c


def test_refuses_to_overwrite(tmp_path: Path) -> None:
    make_synthetic_mvtec(tmp_path, categories=("object",), num_train=1, num_test_good=0,
                         num_test_defect=0, image_size=32)
    with pytest.raises(FileExistsError, match=str(tmp_path / "object")):
        make_synthetic_mvtec(tmp_path, categories=("object",), image_size=32)


@pytest.mark.parametrize("category", ["texture", "object"])
def test_defects_visible_local_and_not_a_brightness_shift(category: str) -> None:
    size, n = 64, 12
    good_means, bad_means = [], []
    for i in range(n):
        good_means.append(render_example(0, category, "test", i, image_size=size)[1].mean())
    for defect in KIND_DEFECTS[category]:
        for i in range(n):
            clean, image, mask = render_example(0, category, "test", i, image_size=size,
                                                defect=defect)
            assert mask.sum() >= 12
            # outside the mask the image is untouched; inside it clearly changes
            np.testing.assert_array_equal(image[~mask], clean[~mask])
            diff = np.abs(image.astype(int) - clean.astype(int)).max(axis=-1)[mask]
            assert diff.mean() > 12, (defect, i, diff.mean())
            bad_means.append(image.mean())
    good, bad = np.array(good_means), np.array(bad_means)
    # AUROC of "mean brightness" as an anomaly score (either sign) stays near chance.
    auroc = (bad[:, None] > good[None, :]).mean() + 0.5 * (bad[:, None] == good[None, :]).mean()
    assert 0.2 < auroc < 0.8, auroc
