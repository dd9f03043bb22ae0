"""Area under the per-region-overlap (PRO) curve, as in the MVTec AD evaluation.

Definition (Bergmann et al., "MVTec AD - A Comprehensive Real-World Dataset for
Unsupervised Anomaly Detection", CVPR 2019; Bergmann et al., "The MVTec Anomaly Detection
Dataset: A Comprehensive Real-World Dataset for Unsupervised Anomaly Detection", IJCV
2021), restated in ``shared/design/METHODS.md`` part C:

- The ground-truth regions are the connected components of every mask, with
  8-connectivity (pixels touching at a corner belong to one region). Regions never
  span two images.
- Every distinct score in ``maps`` is a threshold ``t``; a pixel is predicted anomalous
  when ``score >= t``. Ties therefore enter the curve together.
- FPR(t) = (# anomaly-free pixels with score >= t) / (# anomaly-free pixels), over all
  images, anomaly-free images included.
- PRO(t) = mean over all regions C of all images of |{p in C: score_p >= t}| / |C|.
- The curve starts at (FPR, PRO) = (0, 0) (threshold +inf); PRO is integrated over FPR
  from 0 to ``fpr_limit`` with the trapezoid rule, the last point linearly interpolated
  exactly at ``fpr_limit``; the area is divided by ``fpr_limit`` so that a perfect map
  scores 1. Vertical steps (only anomalous pixels entering) add no area.

Algorithm: one sort of all pixels (decreasing score, region ids carried along by
``_sorting.sort_with_payload``), cumulative sums of per-pixel weights (anomaly-free
pixel: 1 count for FPR; pixel of region r: 1 / (|r| * #regions) for PRO), read at the
last index of each group of equal scores; for the area alone the PRO sums stop at the
first point past ``fpr_limit``. Time O(P log P), memory O(P) for P pixels (about 27
bytes per pixel for ``aupro``, 40 for the full ``pro_curve``, float32 maps); never
O(thresholds * pixels).
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage

from vtadl_jax.metrics._sorting import group_ends, sort_with_payload
from vtadl_jax.metrics.ranking import _as_labels, _as_scores

__all__ = ["aupro", "pro_curve", "label_regions"]

# 8-connectivity inside each image, none across the image axis.
_STRUCTURE_2D = np.ones((3, 3), dtype=bool)
_STRUCTURE_3D = np.zeros((3, 3, 3), dtype=bool)
_STRUCTURE_3D[1] = _STRUCTURE_2D


def _validate(maps: np.ndarray, masks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Checks shapes and values; returns maps (N, H, W) float and masks (N, H, W) bool."""
    maps_a = np.asarray(maps)
    masks_a = np.asarray(masks)
    if maps_a.ndim != 3:
        raise ValueError(f"maps: expected rank 3 (N, H, W), got shape {maps_a.shape}")
    if masks_a.ndim != 3:
        raise ValueError(f"masks: expected rank 3 (N, H, W), got shape {masks_a.shape}")
    if maps_a.shape != masks_a.shape:
        raise ValueError(f"maps and masks: expected the same shape, got {maps_a.shape} "
                         f"and {masks_a.shape}")
    if maps_a.size == 0:
        raise ValueError(f"maps: expected at least one pixel, got shape {maps_a.shape}")
    scores = _as_scores(maps_a, "maps").reshape(maps_a.shape)
    anomalous = _as_labels(masks_a, "masks").reshape(masks_a.shape)
    return scores, anomalous


def label_regions(masks: np.ndarray) -> tuple[np.ndarray, int]:
    """Connected ground-truth regions (8-connectivity), numbered across all images.

    Args:
      masks: (N, H, W) bool.

    Returns:
      regions: (N, H, W) int32, 0 for anomaly-free pixels, 1..R for the regions; a region
        lies inside one image.
      num_regions: R.
    """
    masks = np.asarray(masks, dtype=bool)
    if masks.ndim != 3:
        raise ValueError(f"masks: expected rank 3 (N, H, W), got shape {masks.shape}")
    regions = np.zeros(masks.shape, dtype=np.int32)
    num = ndimage.label(masks, structure=_STRUCTURE_3D, output=regions)
    return regions, int(num)


def _curve(scores: np.ndarray, anomalous: np.ndarray, fpr_limit: float | None = None
           ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fpr, pro, thresholds), each (T + 1,): (0, 0, inf), then every distinct score.

    With ``fpr_limit`` the curve stops at the first point with fpr > fpr_limit (all that
    the integral needs), which saves time and memory.
    """
    regions, num_regions = label_regions(anomalous)
    num_normal = int(anomalous.size - np.count_nonzero(anomalous))
    if num_regions == 0:
        raise ValueError("masks: no anomalous pixel in any mask; AUPRO is undefined without "
                         "at least one ground-truth region")
    if num_normal == 0:
        raise ValueError("masks: every pixel is anomalous; the FPR (and AUPRO) is undefined "
                         "without anomaly-free pixels")
    sizes = np.bincount(regions.reshape(-1), minlength=num_regions + 1)
    weight = np.zeros(num_regions + 1, dtype=np.float64)
    weight[1:] = 1.0 / (sizes[1:].astype(np.float64) * num_regions)

    s_asc, r_asc = sort_with_payload(scores.reshape(-1), regions.reshape(-1))
    del regions
    s_sorted, region_sorted = s_asc[::-1], r_asc[::-1]  # decreasing; ties in any order
    small = s_sorted.size < 2**31  # 32-bit indices and counts suffice
    ends = group_ends(s_sorted)
    if small:
        ends = ends.astype(np.int32)

    # FPR: anomaly-free pixels seen up to the end of each group of equal scores
    fpr = np.empty(ends.size + 1)
    fpr[0] = 0.0
    fpr[1:] = np.cumsum(region_sorted == 0, dtype=np.int32 if small else np.int64)[ends]
    fpr[1:] /= float(num_normal)
    if fpr_limit is not None:  # keep the points with fpr <= limit and the next one
        keep = min(int(np.searchsorted(fpr, fpr_limit, side="right")), ends.size)
        ends, fpr = ends[:keep], fpr[:keep + 1]

    thresholds = np.empty(ends.size + 1, dtype=s_sorted.dtype)
    thresholds[0] = np.inf
    thresholds[1:] = s_sorted[ends]
    del s_sorted, s_asc

    # PRO: sum of 1 / (|region| * #regions) over anomalous pixels seen so far
    cumulative = weight[region_sorted[:int(ends[-1]) + 1]]
    del region_sorted, r_asc
    np.cumsum(cumulative, out=cumulative)
    pro = np.empty(ends.size + 1)
    pro[0] = 0.0
    np.take(cumulative, ends, out=pro[1:])
    np.minimum(pro, 1.0, out=pro)  # the total weight is 1 up to rounding
    return fpr, pro, thresholds


def pro_curve(maps: np.ndarray, masks: np.ndarray
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The full FPR / PRO curve, starting at (0, 0).

    Args:
      maps: (N, H, W) anomaly maps (higher = more anomalous), at the masks' resolution.
      masks: (N, H, W) ground truth, bool or 0/1 (zeros for anomaly-free images).

    Returns:
      fpr: (T + 1,) float64, non-decreasing from 0 to 1.
      pro: (T + 1,) float64, non-decreasing from 0 to 1.
      thresholds: (T + 1,) ``inf`` then the T distinct scores, decreasing; float32 for
        float32 maps, else float64.
    """
    scores, anomalous = _validate(maps, masks)
    return _curve(scores, anomalous)


def _area_up_to(x: np.ndarray, y: np.ndarray, x_max: float) -> float:
    """Trapezoid area under (x, y) for x in [x[0], x_max]; x non-decreasing, x[0] <= x_max.

    The curve is cut at x_max with y linearly interpolated on the segment that crosses it.
    """
    k = int(np.searchsorted(x, x_max, side="right"))  # x[:k] <= x_max < x[k:]
    xs, ys = x[:k], y[:k]
    area = float(np.sum(np.diff(xs) * (ys[1:] + ys[:-1])) / 2.0)
    if k < x.size:  # x[k-1] <= x_max < x[k], so the segment is not vertical
        x0, x1, y0, y1 = x[k - 1], x[k], y[k - 1], y[k]
        y_cut = y0 + (y1 - y0) * (x_max - x0) / (x1 - x0)
        area += float((x_max - x0) * (y0 + y_cut) / 2.0)
    return area


def aupro(maps: np.ndarray, masks: np.ndarray, fpr_limit: float = 0.3, *,
          return_curve: bool = False
          ) -> float | tuple[float, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Normalised area under the PRO curve up to ``fpr_limit`` (MVTec AD AUPRO).

    Args:
      maps: (N, H, W) anomaly maps (higher = more anomalous), at the masks' resolution.
      masks: (N, H, W) ground truth, bool or 0/1; anomaly-free images have all-zero
        masks and count for the FPR. At least one anomalous and one anomaly-free pixel.
      fpr_limit: upper integration limit, in (0, 1]; the MVTec default is 0.3.
      return_curve: also return the full curve ``(fpr, pro, thresholds)`` of
        :func:`pro_curve` (each (T + 1,)).

    Returns:
      AUPRO in [0, 1] as a Python float, or ``(aupro, (fpr, pro, thresholds))``.
    """
    if isinstance(fpr_limit, (bool, np.bool_)) or not isinstance(
            fpr_limit, (int, float, np.integer, np.floating)):
        raise ValueError(f"fpr_limit: expected a number in (0, 1], got {fpr_limit!r}")
    if not 0.0 < float(fpr_limit) <= 1.0:  # also rejects NaN
        raise ValueError(f"fpr_limit: expected a number in (0, 1], got {fpr_limit!r}")
    scores, anomalous = _validate(maps, masks)
    fpr, pro, thr = _curve(scores, anomalous, None if return_curve else float(fpr_limit))
    area = _area_up_to(fpr, pro, float(fpr_limit))
    value = min(max(area / float(fpr_limit), 0.0), 1.0)
    if return_curve:
        return value, (fpr, pro, thr)
    return value
