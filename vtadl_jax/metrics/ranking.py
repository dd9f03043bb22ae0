"""Threshold-free ranking metrics of binary detection: ROC, precision-recall, F1-max.

All functions take ``scores`` (higher = more anomalous) and ``labels`` (1/True =
anomalous) of any matching shape; both are flattened, so the same call serves image
level, ``auroc(scores (N,), labels (N,))``, and pixel level, ``auroc(maps (N, H, W),
masks (N, H, W))``.

Convention: a sample is predicted positive at threshold ``t`` when ``score >= t``. Every
distinct score is one threshold; samples with equal scores enter together (ties are one
step of the curve, never split), which gives the tie-exact AUROC (equal to the
Mann-Whitney statistic with ties counted 1/2) and the same numbers as scikit-learn's
``roc_auc_score`` / ``average_precision_score``.

Everything is exact up to float64 rounding and vectorised: one sort, cumulative counts.
The sort carries the labels along (``_sorting.sort_with_payload``), avoiding a slow argsort.
"""
from __future__ import annotations

import numpy as np

from vtadl_jax.metrics._sorting import group_ends, sort_with_payload

__all__ = ["auroc", "average_precision", "f1_max", "roc_curve", "pr_curve",
           "binary_clf_curve"]


def _as_scores(scores: np.ndarray, name: str = "scores") -> np.ndarray:
    """Flattened real scores; float32/float64 kept (sorting float32 is faster), else float64."""
    a = np.asarray(scores)
    if a.dtype == np.bool_ or np.issubdtype(a.dtype, np.integer):
        a = a.astype(np.float64)
    elif a.dtype == np.float16:
        a = a.astype(np.float32)
    elif not np.issubdtype(a.dtype, np.floating):
        raise ValueError(f"{name}: expected a real numeric array, got dtype {a.dtype}")
    a = a.reshape(-1)
    if np.isnan(a).any():
        raise ValueError(f"{name}: contains NaN; expected only comparable scores")
    return a


def _as_labels(labels: np.ndarray, name: str = "labels") -> np.ndarray:
    """Flattened boolean labels; accepts bool or numbers that are all 0 or 1."""
    a = np.asarray(labels)
    if a.dtype == np.bool_:
        return a.reshape(-1)
    if not (np.issubdtype(a.dtype, np.integer) or np.issubdtype(a.dtype, np.floating)):
        raise ValueError(f"{name}: expected bool or 0/1 numbers, got dtype {a.dtype}")
    a = a.reshape(-1)
    is_one = a == 1
    bad = ~(is_one | (a == 0))
    if bad.any():
        example = a[np.flatnonzero(bad)[0]]
        raise ValueError(f"{name}: expected binary values 0/1 (or bool), found {example!r}")
    return is_one


def _validate(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    s = _as_scores(scores)
    y = _as_labels(labels)
    if s.size != y.size:
        raise ValueError(f"scores and labels: expected the same number of elements, got "
                         f"{s.size} (shape {np.shape(scores)}) and {y.size} "
                         f"(shape {np.shape(labels)})")
    if s.size == 0:
        raise ValueError("scores: expected at least one element, got an empty array")
    return s, y


def binary_clf_curve(scores: np.ndarray, labels: np.ndarray
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """False/true positive counts at every distinct threshold.

    Args:
      scores: (...) real scores, higher = more positive.
      labels: (...) same number of elements, bool or 0/1.

    Returns:
      fps: (T,) int64, number of negatives with ``score >= thresholds[k]``.
      tps: (T,) int64, number of positives with ``score >= thresholds[k]``.
      thresholds: (T,) the distinct scores in decreasing order.
    """
    s, y = _validate(scores, labels)
    return _counts(s, y)


def _counts(s: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    s_asc, y_asc = sort_with_payload(s, y)
    s_sorted, y_sorted = s_asc[::-1], y_asc[::-1]  # decreasing; order inside ties irrelevant
    tps_all = np.cumsum(y_sorted, dtype=np.int64)
    ends = group_ends(s_sorted)  # last position of each group of equal scores
    tps = tps_all[ends]
    fps = ends + 1 - tps
    return fps, tps, s_sorted[ends]


def _positives_and_negatives(y: np.ndarray, need_negative: bool, what: str) -> None:
    n_pos = int(np.count_nonzero(y))
    if n_pos == 0:
        raise ValueError(f"labels: only the negative class (0) is present; {what} is undefined "
                         "without at least one positive (1) label")
    if need_negative and n_pos == y.size:
        raise ValueError(f"labels: only the positive class (1) is present; {what} is undefined "
                         "without at least one negative (0) label")


def roc_curve(scores: np.ndarray, labels: np.ndarray
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ROC curve for plotting.

    Args:
      scores: (...) real scores; labels: (...) bool or 0/1 with both classes present.

    Returns:
      fpr: (T + 1,) float64, starting at 0 (threshold +inf: nothing predicted positive).
      tpr: (T + 1,) float64, starting at 0, ending at 1.
      thresholds: (T + 1,) float64, ``inf`` followed by the distinct scores, decreasing.
    """
    s, y = _validate(scores, labels)
    _positives_and_negatives(y, True, "the ROC curve")
    fps, tps, thr = _counts(s, y)
    fpr = np.concatenate([[0.0], fps / fps[-1]])
    tpr = np.concatenate([[0.0], tps / tps[-1]])
    return fpr, tpr, np.concatenate([[np.inf], thr.astype(np.float64)])


def auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve (trapezoid rule over every distinct threshold).

    Equals P(score_pos > score_neg) + 0.5 P(score_pos == score_neg).

    Args:
      scores: (...) real scores, e.g. (N,) image scores or (N, H, W) anomaly maps.
      labels: (...) same number of elements; bool or 0/1; both classes present.

    Returns the AUROC as a Python float in [0, 1].
    """
    s, y = _validate(scores, labels)
    _positives_and_negatives(y, True, "AUROC")
    fps, tps, _ = _counts(s, y)
    # trapezoid from (0, 0); integer counts keep each step exact, one division at the end
    dfp = np.diff(fps, prepend=0).astype(np.float64)
    tp_mid = (tps + np.concatenate([[0], tps[:-1]])).astype(np.float64)  # 2 * mean height
    area = float(np.dot(dfp, tp_mid)) / (2.0 * float(fps[-1]) * float(tps[-1]))
    return min(max(area, 0.0), 1.0)


def pr_curve(scores: np.ndarray, labels: np.ndarray
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Precision-recall curve for plotting, one point per distinct threshold.

    Args:
      scores: (...) real scores; labels: (...) bool or 0/1 with at least one positive.

    Returns:
      precision: (T,) float64, tp / (tp + fp) at ``score >= thresholds[k]``.
      recall: (T,) float64, tp / num_positives, non-decreasing, ending at 1.
      thresholds: (T,) the distinct scores in decreasing order.
    """
    s, y = _validate(scores, labels)
    _positives_and_negatives(y, False, "the precision-recall curve")
    fps, tps, thr = _counts(s, y)
    precision = tps / (tps + fps)
    recall = tps / tps[-1]
    return precision, recall, thr


def average_precision(scores: np.ndarray, labels: np.ndarray) -> float:
    """Step-wise average precision, sum_k (R_k - R_{k-1}) P_k (as scikit-learn's).

    Args:
      scores: (...) real scores; labels: (...) bool or 0/1 with at least one positive.

    Returns AP as a Python float in [0, 1] (1 when every label is positive).
    """
    precision, recall, _ = pr_curve(scores, labels)
    ap = float(np.dot(np.diff(recall, prepend=0.0), precision))
    return min(max(ap, 0.0), 1.0)


def f1_max(scores: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """Largest F1 score over all thresholds, and the threshold that reaches it.

    F1 at threshold t (predict positive when ``score >= t``) is 2 tp / (2 tp + fp + fn).
    When several thresholds reach the maximum, the highest one is returned.

    Args:
      scores: (...) real scores; labels: (...) bool or 0/1 with at least one positive.

    Returns:
      (f1, threshold): Python floats; ``threshold`` is one of the scores.
    """
    s, y = _validate(scores, labels)
    _positives_and_negatives(y, False, "F1-max")
    fps, tps, thr = _counts(s, y)
    n_pos = tps[-1]
    f1 = 2.0 * tps / (tps + fps + n_pos)  # 2tp / (2tp + fp + fn), fn = n_pos - tp
    k = int(np.argmax(f1))  # first maximum = highest threshold
    return float(f1[k]), float(thr[k])
