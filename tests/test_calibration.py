"""Calibration and decision metrics against direct computations.

References: scikit-learn's precision_recall_curve for F1-max; a direct count over every
candidate threshold for the FPR rule (no quantile function); confusion / IoU / Dice
counted with Python sets; the logistic in float64 with math.exp.
"""
import json
import math
import os

import numpy as np
import pytest
from sklearn.metrics import precision_recall_curve

from vtadl_jax import calibration
from vtadl_jax.data.errors import InvalidImageError, MissingDataError
from vtadl_jax.data.image_files import find_image_files
from vtadl_jax.metrics.decisions import confusion, mask_overlap


def _sklearn_f1_threshold(scores, labels):
    precision, recall, thresholds = precision_recall_curve(labels, scores)
    p, r = precision[:-1], recall[:-1]
    f1 = np.where(p + r > 0, 2 * p * r / np.maximum(p + r, 1e-300), 0.0)
    best = f1.max()
    # The lowest threshold among those with the best F1 (our tie rule).
    return float(np.min(thresholds[np.isclose(f1, best, rtol=0, atol=1e-12)])), best


def _direct_fpr_threshold(scores, fpr):
    """Smallest t with count(s >= t) <= floor(fpr * n), found by trying every candidate:
    each distinct score and the next float above each (in the scores' dtype)."""
    values = np.asarray(scores).ravel()
    s = [float(v) for v in values]
    allowed = math.floor(fpr * len(s))
    up = np.array(np.inf, dtype=values.dtype)
    candidates = sorted(set(s) | {float(np.nextafter(v, up)) for v in values})
    for t in candidates:
        if sum(v >= t for v in s) <= allowed:
            return t
    raise AssertionError("unreachable: above the maximum nothing is counted")


@pytest.mark.parametrize("seed", range(4))
def test_f1_max_thresholds_match_sklearn(seed):
    rng = np.random.default_rng(seed)
    labels = rng.random(60) < 0.4
    scores = rng.normal(size=60) + 1.5 * labels
    scores[:10] = np.round(scores[:10], 1)  # some ties
    masks = rng.random((6, 8, 8)) < 0.2
    maps = (rng.normal(size=(6, 8, 8)) + 2.0 * masks).astype(np.float32)
    t = calibration.from_labelled(scores, labels, maps, masks)
    want, _ = _sklearn_f1_threshold(scores, labels)
    assert t.image_threshold == pytest.approx(want, rel=1e-12)
    want_pixel, _ = _sklearn_f1_threshold(maps.ravel(), masks.ravel())
    assert t.pixel_threshold == pytest.approx(want_pixel, rel=1e-6)
    assert t.mode == "f1_max_test"
    assert t.image_scale == pytest.approx(np.std(scores[~labels]), rel=1e-12)
    assert t.pixel_scale == pytest.approx(np.std(maps[~masks].astype(np.float64)), rel=1e-6)


@pytest.mark.parametrize("n,fpr", [(10, 0.01), (10, 0.1), (10, 0.25), (40, 0.05),
                                   (41, 0.05), (200, 0.013), (7, 0.999)])
def test_fpr_threshold_matches_direct_count(n, fpr):
    rng = np.random.default_rng(n)
    scores = rng.normal(size=n)
    scores[: n // 3] = np.round(scores[: n // 3], 1)  # ties
    t = calibration.fpr_threshold(scores, fpr)
    assert t == _direct_fpr_threshold(scores, fpr)
    false_positives = int(np.sum(scores >= t))
    assert false_positives <= math.floor(fpr * n)
    # No lower threshold keeps the rate: the float just below t lets one more through.
    assert int(np.sum(scores >= np.nextafter(t, -np.inf))) > math.floor(fpr * n)
    # float32 values: the same rule, compared in float32 as NumPy does with a Python float.
    s32 = scores.astype(np.float32)
    t32 = calibration.fpr_threshold(s32, fpr)
    assert t32 == _direct_fpr_threshold(s32, fpr)
    assert int(np.sum(s32 >= t32)) <= math.floor(fpr * n)


def test_fpr_threshold_float32_maps_and_all_ties():
    maps = np.full((3, 4, 4), 2.5, np.float32)
    maps[0, 0, 0] = 7.0
    t = calibration.fpr_threshold(maps, 0.5)  # 48 pixels, 24 allowed
    assert t == _direct_fpr_threshold(maps, 0.5)
    assert np.sum(maps >= t) == 1  # float32 values compare exactly with the threshold


@pytest.mark.parametrize("fpr", [0.0, 1.0, -0.1, 1.5, float("nan")])
def test_fpr_outside_open_interval_is_an_error(fpr):
    with pytest.raises(ValueError, match="--fpr"):
        calibration.fpr_threshold([1.0, 2.0], fpr)


def test_no_normal_values_is_an_error_equal_values_give_no_scale():
    with pytest.raises(ValueError, match="at least one normal image"):
        calibration.from_normal(np.zeros(0), None, 0.1)
    equal = calibration.from_normal(np.ones(3), None, 0.1)  # no spread: no normalisation
    assert equal.image_scale is None and equal.image_threshold == np.nextafter(1.0, 2.0)
    with pytest.raises(ValueError, match="both normal and anomalous"):
        calibration.from_labelled([1.0, 2.0], [0, 0])


def test_normalise_is_a_logistic_with_threshold_at_half():
    values = np.array([-1e6, -3.0, 0.0, 1.0, 2.0, 5.0, 1e6])
    got = calibration.normalise(values, 2.0, 1.5)
    want = [1 / (1 + math.exp(min(700.0, -(v - 2.0) / 1.5))) for v in values]
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-300)
    assert got[4] == 0.5 and np.all(np.diff(got) >= 0)


def test_from_user_keeps_missing_values_and_scales():
    prev = calibration.Thresholds("normal_fpr", 1.0, 2.0, 0.5, 0.7)
    t = calibration.from_user(3.0, None, previous=prev)
    assert (t.mode, t.image_threshold, t.pixel_threshold) == ("user", 3.0, 2.0)
    assert (t.image_scale, t.pixel_scale) == (0.5, 0.7)
    assert calibration.from_user(None, 4.0).image_threshold is None
    with pytest.raises(ValueError, match="--image-threshold"):
        calibration.from_user(None, None)
    with pytest.raises(ValueError, match="--pixel-threshold"):
        calibration.from_user(1.0, float("inf"))


def test_save_load_round_trip_and_missing_and_corrupt(tmp_path):
    assert calibration.load(str(tmp_path)) is None  # a model saved before thresholds
    t = calibration.from_normal(np.arange(10.0), np.arange(40.0).reshape(1, 5, 8), 0.1,
                                source=["normals/"])
    calibration.save(str(tmp_path), t)
    back = calibration.load(str(tmp_path))
    for field in ("mode", "image_threshold", "pixel_threshold", "image_scale", "pixel_scale"):
        assert getattr(back, field) == getattr(t, field)
    assert back.details["fpr"] == 0.1 and back.details["num_images"] == 10
    with open(tmp_path / "thresholds.json") as f:
        assert json.load(f)["normalisation"] == calibration.NORMALISATION
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".")]
    (tmp_path / "thresholds.json").write_text("{not json")
    with pytest.raises(ValueError, match="thresholds.json"):
        calibration.load(str(tmp_path))
    calibration.discard(str(tmp_path))
    assert calibration.load(str(tmp_path)) is None


def test_confusion_and_overlap_by_direct_counting():
    rng = np.random.default_rng(3)
    scores, labels = rng.normal(size=50), rng.random(50) < 0.5
    got = confusion(scores, labels, 0.1)
    pred = {i for i in range(50) if scores[i] >= 0.1}
    pos = {i for i in range(50) if labels[i]}
    tp, fp = len(pred & pos), len(pred - pos)
    fn, tn = len(pos - pred), 50 - len(pred | pos)
    assert (got["tp"], got["fp"], got["fn"], got["tn"]) == (tp, fp, fn, tn)
    assert got["precision"] == pytest.approx(tp / (tp + fp))
    assert got["recall"] == pytest.approx(tp / (tp + fn))
    assert got["fpr"] == pytest.approx(fp / (fp + tn))
    assert got["f1"] == pytest.approx(2 * tp / (2 * tp + fp + fn))
    assert math.isnan(confusion(scores, labels, 1e9)["precision"])  # nothing predicted

    masks = rng.random((4, 6, 6)) < 0.3
    masks[3] = False
    maps = rng.random((4, 6, 6))
    o = mask_overlap(maps, masks, 0.6)
    p = {tuple(i) for i in np.argwhere(maps >= 0.6)}
    g = {tuple(i) for i in np.argwhere(masks)}
    assert o["iou"] == pytest.approx(len(p & g) / len(p | g))
    assert o["dice"] == pytest.approx(2 * len(p & g) / (len(p) + len(g)))
    per_image = [len({q for q in p & g if q[0] == k}) / len({q for q in p | g if q[0] == k})
                 for k in range(3)]
    assert o["iou_mean_anomalous"] == pytest.approx(np.mean(per_image))
    assert o["fpr"] == pytest.approx(len(p - g) / (maps.size - len(g)))


def test_find_image_files(tmp_path):
    (tmp_path / "d" / "sub").mkdir(parents=True)
    for name in ("d/b.png", "d/a.JPG", "d/sub/c.bmp", "d/notes.txt", "x.png"):
        (tmp_path / name).write_bytes(b"")
    got = find_image_files([str(tmp_path / "d"), str(tmp_path / "x.png"),
                            str(tmp_path / "d" / "b.png")])
    assert got == [str(tmp_path / p) for p in ("d/a.JPG", "d/b.png", "d/sub/c.bmp", "x.png")]
    assert find_image_files([str(tmp_path / "**" / "*.png")]) == [
        str(tmp_path / "d" / "b.png"), str(tmp_path / "x.png")]
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_bytes(b"")
    with pytest.raises(MissingDataError, match="holds no image file"):
        find_image_files([str(tmp_path / "empty")])
    with pytest.raises(MissingDataError, match="matches no image file"):
        find_image_files([str(tmp_path / "*.tif")])
    with pytest.raises(MissingDataError, match="does not exist"):
        find_image_files([str(tmp_path / "nope.png")])
    with pytest.raises(InvalidImageError, match="notes.txt is not an image file"):
        find_image_files([str(tmp_path / "d" / "notes.txt")])


def test_bottle_runner_halves_are_stratified_and_disjoint():
    import sys

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from experiments.calibrate_bottle import halves

    defects = np.array(["good"] * 5 + ["crack"] * 4 + ["hole"] * 1)
    filenames = np.array([f"{i:03d}.png" for i in (4, 0, 3, 1, 2, 1, 0, 3, 2, 0)])
    half = halves(defects, filenames)
    for defect, n in (("good", 5), ("crack", 4), ("hole", 1)):
        in_b = half[defects == defect].sum()
        assert in_b == n // 2  # alternate by sorted name: A gets the extra one
    by_name = {(d, f): h for d, f, h in zip(defects, filenames, half)}
    assert by_name[("good", "000.png")] == 0 and by_name[("good", "001.png")] == 1
