"""Metrics of thresholded decisions: the confusion matrix of image labels and the
overlap (IoU, Dice) of predicted masks with the ground truth.

A sample is predicted anomalous when ``score >= threshold`` (the package convention).
Ratios with an empty denominator (no predicted positive for precision, no positive for
recall) are NaN, never a silent 0 or 1.
"""
from __future__ import annotations

import numpy as np

__all__ = ["confusion", "mask_overlap"]


def _ratio(num: int, den: int) -> float:
    return float(num / den) if den else float("nan")


def confusion(scores: np.ndarray, labels: np.ndarray, threshold: float) -> dict[str, float]:
    """tp, fp, tn, fn and precision, recall, F1, FPR, accuracy at ``threshold``."""
    scores = np.asarray(scores).reshape(-1)
    labels = np.asarray(labels).reshape(-1).astype(bool)
    if scores.shape != labels.shape:
        raise ValueError(f"scores and labels: expected equal sizes, got {scores.size} and "
                         f"{labels.size}")
    pred = scores >= threshold
    tp, fp = int(np.sum(pred & labels)), int(np.sum(pred & ~labels))
    fn, tn = int(np.sum(~pred & labels)), int(np.sum(~pred & ~labels))
    precision, recall = _ratio(tp, tp + fp), _ratio(tp, tp + fn)
    return {"tp": tp, "fp": fp, "tn": tn, "fn": fn, "precision": precision,
            "recall": recall, "f1": _ratio(2 * tp, 2 * tp + fp + fn),
            "fpr": _ratio(fp, fp + tn), "accuracy": _ratio(tp + tn, labels.size)}


def mask_overlap(maps: np.ndarray, masks: np.ndarray, threshold: float) -> dict[str, float]:
    """IoU and Dice of the predicted masks ``maps >= threshold`` with ``masks``.

    "iou" / "dice" pool every pixel of the set (|P & G| / |P | G|, 2|P & G| / (|P| + |G|));
    "iou_mean_anomalous" averages the per-image IoU over images with a non-empty ground
    truth; "fpr" is the fraction of normal pixels predicted anomalous.
    """
    maps, masks = np.asarray(maps), np.asarray(masks) > 0
    if maps.shape != masks.shape or maps.ndim != 3:
        raise ValueError(f"maps and masks: expected equal shapes (N, H, W), got {maps.shape} "
                         f"and {masks.shape}")
    pred = maps >= threshold
    inter = np.sum(pred & masks, axis=(1, 2))
    union = np.sum(pred | masks, axis=(1, 2))
    has_gt = masks.any(axis=(1, 2))
    normal_pixels = int(np.sum(~masks))
    return {"iou": _ratio(int(inter.sum()), int(union.sum())),
            "dice": _ratio(2 * int(inter.sum()), int(pred.sum()) + int(masks.sum())),
            "iou_mean_anomalous": (float(np.mean(inter[has_gt] / union[has_gt]))
                                   if has_gt.any() else float("nan")),
            "fpr": _ratio(int(np.sum(pred & ~masks)), normal_pixels)}
