"""Tests of vtadl_jax.metrics against independent references.

References: scikit-learn (AUROC, AP, ROC/PR curves), brute-force loops over thresholds
(F1-max), and a direct threshold-by-threshold AUPRO written here from the MVTec AD
definition (Bergmann et al. 2019/2021; METHODS.md part C), float64 throughout.
"""
from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage
from sklearn import metrics as skm

from vtadl_jax import metrics
from vtadl_jax.metrics._sorting import sort_with_payload


# ----------------------------------------------------------------------------- data

def _scores(rng, shape, kind):
    if kind == "continuous64":  # float64 not representable in float32: argsort path
        return rng.normal(size=shape) + 1e-13 * rng.random(shape)
    if kind == "ties32":  # few distinct float32 values, negatives and zeros included
        return np.round(rng.normal(size=shape), 1).astype(np.float32)
    if kind == "int":
        return rng.integers(-3, 4, size=shape)
    raise AssertionError(kind)


def _random_masks(rng, n, h, w, good=2):
    """Masks with several regions per image (rectangles and single diagonal pixels);
    the first ``good`` images are anomaly-free."""
    masks = np.zeros((n, h, w), dtype=bool)
    for i in range(good, n):
        for _ in range(rng.integers(1, 4)):
            y, x = rng.integers(0, h - 1), rng.integers(0, w - 1)
            masks[i, y:y + rng.integers(1, 4), x:x + rng.integers(1, 4)] = True
        y, x = rng.integers(0, h - 1), rng.integers(0, w - 1)
        masks[i, y, x] = masks[i, y + 1, x + 1] = True  # diagonal pair: one region
    return masks


# ------------------------------------------------------- direct AUPRO (the definition)

def direct_pro_points(maps, masks):
    """(fpr, pro) at threshold +inf and at every distinct score, by brute force."""
    maps = np.asarray(maps, dtype=np.float64)
    masks = np.asarray(masks).astype(bool)
    regions = []
    for i in range(masks.shape[0]):
        lab, num = ndimage.label(masks[i], structure=np.ones((3, 3)))
        regions += [(i, lab == r) for r in range(1, num + 1)]
    normal = ~masks
    points = [(0.0, 0.0)]
    for t in np.unique(maps)[::-1]:
        pred = maps >= t
        fpr = np.sum(pred & normal) / np.sum(normal)
        pro = np.mean([np.mean(pred[i][reg]) for i, reg in regions])
        points.append((float(fpr), float(pro)))
    return np.array(points)


def direct_aupro(maps, masks, fpr_limit):
    """Segment-by-segment trapezoid up to fpr_limit, cut segment interpolated."""
    points = direct_pro_points(maps, masks)
    area = 0.0
    for (x0, y0), (x1, y1) in zip(points[:-1], points[1:]):
        if x1 <= fpr_limit:
            area += (x1 - x0) * (y0 + y1) / 2
        elif x0 < fpr_limit:
            y_cut = y0 + (y1 - y0) * (fpr_limit - x0) / (x1 - x0)
            area += (fpr_limit - x0) * (y0 + y_cut) / 2
            break
        else:
            break
    return area / fpr_limit


# ------------------------------------------------------------------- ranking metrics

@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("kind", ["continuous64", "ties32", "int"])
def test_auroc_and_ap_match_sklearn(seed, kind):
    rng = np.random.default_rng(seed)
    shape = (7, 9, 11)
    scores = _scores(rng, shape, kind)
    labels = rng.random(shape) < 0.2 + 0.1 * seed
    scores = scores + labels * 0.5 * (kind != "int")  # informative, not perfect
    ref_auc = skm.roc_auc_score(labels.ravel(), scores.ravel())
    ref_ap = skm.average_precision_score(labels.ravel(), scores.ravel())
    assert metrics.auroc(scores, labels) == pytest.approx(ref_auc, abs=1e-12)
    assert metrics.average_precision(scores, labels.astype(np.int32)) == pytest.approx(
        ref_ap, abs=1e-12)


def test_auroc_hand_cases():
    assert metrics.auroc([1.0, 1.0], [0, 1]) == 0.5  # a tie counts 1/2
    assert metrics.auroc([0.1, 0.2, 0.3, 0.4], [0, 0, 1, 1]) == 1.0
    assert metrics.auroc([0.1, 0.2, 0.3, 0.4], [1, 1, 0, 0]) == 0.0
    # P(pos > neg) + P(tie)/2 with pos {2, 3}, neg {1, 2}: (1/2 + 1 + 1 + 1) / 4
    assert metrics.auroc([1, 2, 2, 3], [0, 0, 1, 1]) == pytest.approx(0.875)
    assert metrics.average_precision([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == pytest.approx(
        (0.5 * 1.0 + 0.5 * 2 / 3))


def test_curves_match_sklearn():
    rng = np.random.default_rng(5)
    scores = np.round(rng.random(300), 2)
    labels = rng.random(300) < 0.4
    fpr, tpr, thr = metrics.roc_curve(scores, labels)
    r_fpr, r_tpr, r_thr = skm.roc_curve(labels, scores, drop_intermediate=False)
    np.testing.assert_allclose(fpr, r_fpr, atol=1e-15)
    np.testing.assert_allclose(tpr, r_tpr, atol=1e-15)
    np.testing.assert_array_equal(thr[1:], r_thr[1:])
    assert thr[0] == np.inf
    prec, rec, pthr = metrics.pr_curve(scores, labels)
    r_prec, r_rec, r_pthr = skm.precision_recall_curve(labels, scores,
                                                       drop_intermediate=False)
    # sklearn: increasing thresholds and a final (precision 1, recall 0) point
    np.testing.assert_allclose(prec, r_prec[:-1][::-1], atol=1e-15)
    np.testing.assert_allclose(rec, r_rec[:-1][::-1], atol=1e-15)
    np.testing.assert_array_equal(pthr, r_pthr[::-1])


def _brute_f1_max(scores, labels):
    scores, labels = np.ravel(scores), np.ravel(labels).astype(bool)
    best, best_t = -1.0, None
    for t in np.unique(scores):  # increasing: ">=" keeps the highest threshold
        pred = scores >= t
        tp = np.sum(pred & labels)
        fp = np.sum(pred & ~labels)
        fn = np.sum(~pred & labels)
        f1 = 2 * tp / (2 * tp + fp + fn)
        if f1 >= best - 1e-12:
            best, best_t = max(f1, best), t
    return best, best_t


@pytest.mark.parametrize("seed", range(6))
def test_f1_max_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    scores = np.round(rng.random((10, 12)), 1 + seed % 2)
    labels = rng.random((10, 12)) < np.clip(scores - 0.2 + 0.3 * rng.random((10, 12)), 0, 1)
    f1, t = metrics.f1_max(scores, labels)
    ref_f1, ref_t = _brute_f1_max(scores, labels)
    assert f1 == pytest.approx(ref_f1, abs=1e-12)
    assert t == ref_t


def test_f1_max_hand_case():
    # threshold 0.8 -> P = 1, R = 1/2, F1 = 2/3; 0.35 -> P = 2/3, R = 1, F1 = 0.8
    f1, t = metrics.f1_max([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1])
    assert (f1, t) == (pytest.approx(0.8), 0.35)
    # F1 = 2/3 at thresholds 4 and 1 (0.5 and 0.4 between): the highest one is returned
    f1, t = metrics.f1_max([4, 3, 2, 1], [1, 0, 0, 1])
    assert (f1, t) == (pytest.approx(2 / 3), 4.0)


def test_sort_with_payload_both_paths():
    rng = np.random.default_rng(0)
    special = np.array([-0.0, 0.0, np.inf, -np.inf, 1e-45, -1e-45, 3.0e38])
    for scores in (np.concatenate([rng.normal(size=500), special]).astype(np.float32),
                   np.concatenate([rng.normal(size=500), special]),  # argsort path
                   np.round(rng.normal(size=500), 1)):  # float64 exact in float32
        payload = rng.integers(0, 2**31, size=scores.size).astype(np.int64)
        s, p = sort_with_payload(scores, payload)
        assert s.dtype == scores.dtype
        np.testing.assert_array_equal(s, np.sort(scores))
        for v in np.unique(scores):  # the same multiset of payloads at every score
            np.testing.assert_array_equal(np.sort(p[s == v]), np.sort(payload[scores == v]))


@pytest.mark.parametrize("fn", [metrics.auroc, metrics.average_precision, metrics.f1_max,
                                metrics.roc_curve, metrics.pr_curve])
def test_ranking_bad_inputs(fn):
    with pytest.raises(ValueError, match="scores and labels"):
        fn([0.1, 0.2, 0.3], [0, 1])
    with pytest.raises(ValueError, match="labels.*binary"):
        fn([0.1, 0.2, 0.3], [0, 1, 2])
    with pytest.raises(ValueError, match="labels.*bool"):
        fn([0.1, 0.2], ["a", "b"])
    with pytest.raises(ValueError, match="scores.*NaN"):
        fn([0.1, np.nan, 0.3], [0, 1, 1])
    with pytest.raises(ValueError, match="scores.*real"):
        fn([1j, 2j], [0, 1])
    with pytest.raises(ValueError, match="scores.*empty"):
        fn([], [])
    with pytest.raises(ValueError, match="labels: only the negative class"):
        fn([0.1, 0.2], [0, 0])


@pytest.mark.parametrize("fn", [metrics.auroc, metrics.roc_curve])
def test_auroc_needs_both_classes(fn):
    with pytest.raises(ValueError, match="labels: only the positive class"):
        fn([0.1, 0.2], [1, 1])


def test_ap_and_f1_with_positives_only():
    assert metrics.average_precision([0.1, 0.2], [True, True]) == 1.0
    assert metrics.f1_max([0.1, 0.2], [1, 1]) == (1.0, 0.1)


# --------------------------------------------------------------------------- AUPRO

@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("kind", ["continuous64", "ties32", "int"])
def test_aupro_matches_direct_definition(seed, kind):
    rng = np.random.default_rng(100 + seed)
    masks = _random_masks(rng, 5, 9, 10, good=1 + seed % 2)
    maps = _scores(rng, masks.shape, kind)
    maps = maps + masks * (1 + seed % 3) * (kind != "int")
    points = direct_pro_points(maps, masks)
    for limit in (0.3, 0.05, 0.5, 1.0, float(points[len(points) // 3, 0])):
        if limit <= 0:
            continue
        ours = metrics.aupro(maps, masks.astype(np.uint8), fpr_limit=limit)
        assert ours == pytest.approx(direct_aupro(maps, masks, limit), abs=1e-9)
        # the full-curve path gives the same number as the truncated one
        assert metrics.aupro(maps, masks, fpr_limit=limit, return_curve=True)[0] == \
            pytest.approx(ours, abs=1e-12)
        assert 0.0 <= ours <= 1.0
    fpr, pro, thr = metrics.pro_curve(maps, masks)
    np.testing.assert_allclose(np.stack([fpr, pro], 1), points, atol=1e-12)
    np.testing.assert_array_equal(thr[1:], np.unique(maps)[::-1])


def test_aupro_perfect_and_inverted_maps():
    rng = np.random.default_rng(3)
    masks = _random_masks(rng, 4, 12, 12)
    noise = rng.random(masks.shape)
    assert metrics.aupro(masks + 0.5 * noise, masks) == pytest.approx(1.0, abs=1e-12)
    assert metrics.aupro(masks * 1.0, masks) == pytest.approx(1.0, abs=1e-12)  # class ties
    assert metrics.aupro(-(masks + 0.5 * noise), masks) == 0.0
    assert metrics.aupro(-(masks + 0.5 * noise), masks, fpr_limit=1.0) == 0.0


def test_aupro_hand_cases():
    one_row = lambda v: np.asarray(v, dtype=np.float64).reshape(1, 1, -1)  # noqa: E731
    # scores 4 3 2 1, two 1-pixel regions (3 and 1), normals 4 and 2:
    # curve (0,0) (.5,0) (.5,.5) (1,.5) (1,1)
    maps, masks = one_row([4, 3, 2, 1]), one_row([0, 1, 0, 1])
    assert metrics.aupro(maps, masks, fpr_limit=1.0) == pytest.approx(0.25)
    assert metrics.aupro(maps, masks, fpr_limit=0.75) == pytest.approx(0.125 / 0.75)
    assert metrics.aupro(maps, masks, fpr_limit=0.5) == 0.0
    assert metrics.aupro(maps, masks) == 0.0
    # tie of an anomalous and a normal pixel: curve (0,0) (1/3,1) (1,1); at 0.3 PRO=0.9
    maps, masks = one_row([2, 2, 1, 1]), one_row([1, 0, 0, 0])
    assert metrics.aupro(maps, masks) == pytest.approx(0.5 * 0.3 * 0.9 / 0.3)
    assert metrics.aupro(maps, masks, fpr_limit=1 / 3) == pytest.approx(0.5)
    assert metrics.aupro(maps, masks, fpr_limit=1.0) == pytest.approx((1 / 6 + 2 / 3))


def test_aupro_uses_8_connectivity():
    # (0,0) touches (1,1) at a corner: one region of 3 pixels with 8-connectivity
    # (PRO = 1/3 once (0,0) is found), two regions {(0,0)}, {(1,1),(1,2)} with 4 (PRO 1/2).
    masks = np.zeros((1, 3, 3), dtype=bool)
    masks[0, 0, 0] = masks[0, 1, 1] = masks[0, 1, 2] = True
    maps = np.full((1, 3, 3), -1.0)
    maps[0, 0, 0] = 10.0
    maps[0][~masks[0]] = np.arange(1, 7)
    assert metrics.aupro(maps, masks) == pytest.approx(1 / 3)
    assert metrics.label_regions(masks)[1] == 1


def test_aupro_regions_do_not_span_images():
    # image 0: region of 1 pixel found first; image 1: region of 2 pixels at the same
    # place, found last. Separate regions: PRO = 1/2; merged across images it would be 1/3.
    masks = np.zeros((2, 3, 3), dtype=bool)
    masks[0, 0, 0] = masks[1, 0, 0] = masks[1, 0, 1] = True
    maps = np.where(masks, -1.0, np.arange(18.0).reshape(2, 3, 3))
    maps[0, 0, 0] = 100.0
    assert metrics.aupro(maps, masks) == pytest.approx(0.5)
    regions, num = metrics.label_regions(masks)
    assert num == 2 and regions[0, 0, 0] != regions[1, 0, 0]


def test_aupro_monotone_invariance_and_curve():
    rng = np.random.default_rng(11)
    masks = _random_masks(rng, 6, 16, 16)
    maps = rng.random(masks.shape).astype(np.float32) + 0.3 * masks
    value, (fpr, pro, thr) = metrics.aupro(maps, masks, return_curve=True)
    assert value == pytest.approx(metrics.aupro(np.exp(3.0 * maps.astype(np.float64)) - 7,
                                                masks), abs=1e-12)
    assert (fpr[0], pro[0], thr[0]) == (0.0, 0.0, np.inf)
    assert fpr[-1] == 1.0 and pro[-1] == pytest.approx(1.0, abs=1e-12)
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(pro) >= -1e-15)
    assert np.all(np.diff(thr) < 0)


def test_aupro_never_exceeds_one():
    rng = np.random.default_rng(2)
    for _ in range(20):
        masks = _random_masks(rng, 3, 8, 8, good=0)
        maps = masks + rng.random(masks.shape) * rng.choice([0.0, 1e-3, 0.5])
        for limit in (1e-4, 0.3, 1.0):
            assert metrics.aupro(maps, masks, fpr_limit=limit) <= 1.0


def test_aupro_bad_inputs():
    maps = np.zeros((2, 4, 4))
    masks = np.zeros((2, 4, 4), dtype=bool)
    masks[1, 1, 1] = True
    with pytest.raises(ValueError, match="maps: expected rank 3"):
        metrics.aupro(maps[0], masks[0])
    with pytest.raises(ValueError, match="masks: expected rank 3"):
        metrics.aupro(maps, masks[0])
    with pytest.raises(ValueError, match="maps and masks: expected the same shape"):
        metrics.aupro(maps, masks[:, :3])
    with pytest.raises(ValueError, match="masks: expected binary"):
        metrics.aupro(maps, masks * 255)
    with pytest.raises(ValueError, match="maps: contains NaN"):
        metrics.aupro(np.where(masks, np.nan, 0.0), masks)
    with pytest.raises(ValueError, match="masks: no anomalous pixel"):
        metrics.aupro(maps, np.zeros_like(masks))
    with pytest.raises(ValueError, match="masks: every pixel is anomalous"):
        metrics.aupro(maps, np.ones_like(masks))
    with pytest.raises(ValueError, match="maps: expected at least one pixel"):
        metrics.aupro(np.zeros((0, 4, 4)), np.zeros((0, 4, 4)))
    for bad in (0.0, -0.1, 1.5, float("nan"), "0.3", None, True):
        with pytest.raises(ValueError, match="fpr_limit"):
            metrics.aupro(maps, masks, fpr_limit=bad)
