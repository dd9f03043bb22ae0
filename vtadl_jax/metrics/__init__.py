"""Exact anomaly-detection metrics: AUROC, average precision, AUPRO, F1-max.

Pure NumPy functions of arrays; scores are "higher = more anomalous" and a sample (pixel)
is predicted anomalous at threshold t when ``score >= t``.
"""
from vtadl_jax.metrics.aupro import aupro, label_regions, pro_curve
from vtadl_jax.metrics.ranking import (auroc, average_precision, binary_clf_curve, f1_max,
                                       pr_curve, roc_curve)

__all__ = ["auroc", "average_precision", "f1_max", "roc_curve", "pr_curve",
           "binary_clf_curve", "aupro", "pro_curve", "label_regions"]
