"""Exact anomaly-detection metrics: AUROC, average precision, AUPRO, F1-max."""
