"""Metrics of an anomaly detector from its outputs, the same for every method.

Both methods end in the same place: an anomaly map per test image (N, H, W), an image
score per test image (N,), and the ground truth (masks (N, H, W), labels (N,)).
`evaluate_outputs` turns those into the metrics of the papers (image AUROC, pixel
AUROC, AUPRO at FPR <= 0.3, PR-AUC, F1-max); `write_metrics` stores them atomically.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from vtadl_jax import metrics


def _check_outputs(maps, scores, masks, labels) -> None:
    if scores.ndim != 1:
        raise ValueError(f"scores: expected shape (N,), got {scores.shape}")
    if labels.shape != scores.shape:
        raise ValueError(f"labels: expected shape {scores.shape} like scores, got {labels.shape}")
    for name, arr in (("maps", maps), ("masks", masks)):
        if arr is None:
            continue
        if arr.ndim != 3:
            raise ValueError(f"{name}: expected shape (N, H, W), got {arr.shape}")
        if arr.shape[0] != scores.shape[0]:
            raise ValueError(f"{name}: expected {scores.shape[0]} {name} (one per score), "
                             f"got {arr.shape[0]}")
    if maps is not None and masks is not None and masks.shape != maps.shape:
        raise ValueError(
            f"maps and masks: expected equal shapes (N, H, W), got {maps.shape} and {masks.shape}")


def evaluate_outputs(maps: np.ndarray | None, scores: np.ndarray, masks: np.ndarray | None,
                     labels: np.ndarray, *, fpr_limit: float = 0.3) -> dict[str, Any]:
    """Image- and pixel-level metrics.

    Args:
      maps: (N, H, W) anomaly maps at the ground-truth resolution, or None.
      scores: (N,) image anomaly scores (higher = more anomalous).
      masks: (N, H, W) binary ground-truth masks (zeros for normal images), or None.
      labels: (N,) 0 normal / 1 anomalous.
      fpr_limit: integration limit of AUPRO.

    Returns a dict of floats. Metrics whose ground truth is missing (no masks, or a test
    set with one class only) are omitted and listed under "skipped" with the reason.
    """
    scores = np.asarray(scores, np.float64)
    labels = np.asarray(labels).astype(np.int64)
    maps = None if maps is None else np.asarray(maps)
    masks = None if masks is None else (np.asarray(masks) > 0).astype(np.uint8)
    _check_outputs(maps, scores, masks, labels)
    out: dict[str, Any] = {"num_images": int(scores.size),
                           "num_anomalous": int(labels.sum())}
    skipped: dict[str, str] = {}
    if 0 < labels.sum() < labels.size:
        out["image_auroc"] = metrics.auroc(scores, labels)
        out["image_ap"] = metrics.average_precision(scores, labels)
        out["image_f1_max"], out["image_f1_threshold"] = (float(v) for v in metrics.f1_max(scores, labels))
    else:
        skipped["image"] = "test set holds a single class"
    if maps is not None and masks is not None and masks.any() and not masks.all():
        out["pixel_auroc"] = metrics.auroc(maps, masks)
        out["pixel_ap"] = metrics.average_precision(maps, masks)
        out["aupro"] = metrics.aupro(maps, masks, fpr_limit=fpr_limit)
        out["aupro_fpr_limit"] = fpr_limit
    elif maps is None and masks is not None:
        skipped["pixel"] = "no anomaly maps"
    elif maps is not None:
        skipped["pixel"] = ("no pixel ground truth" if masks is None
                            else "no pixel ground truth with both classes")
    if skipped:
        out["skipped"] = skipped
    return {k: (float(v) if isinstance(v, (np.floating, float)) else v) for k, v in out.items()}
