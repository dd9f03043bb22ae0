"""Dini & Rahtu (VISAPP 2023): patch Gaussians on ImageNet ConTNet-B, MVTec AD.

Stages 3 and 4 (both 7x7 at 224x224) concatenated to 1536 channels per position;
Sigma + 0.01 I; Mahalanobis map up-sampled bilinearly to 224 and smoothed with sigma 4.

    vtadl-jax fit --config experiments/configs/patch_gaussian_mvtec.py:bottle --workdir runs/pg_bottle \
        data.root=/path/to/mvtec_anomaly_detection backbone.weights=/path/to/contnet_b.pth

arg: the MVTec AD category. MVTec AD and the ConTNet-B weights must be supplied by the
user (neither can be downloaded on the project machines). `backbone.name=efficientnet_lite0
backbone.stages="('block3','block5')"` runs the same experiment on the offline backbone.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
from patch_gaussian_common import base_config  # noqa: E402


def get_config(arg: str | None = None):
    c = base_config()
    c.data.name = f"mvtec_ad/{arg or 'bottle'}"
    c.data.root = os.environ.get("MVTEC_AD_ROOT")
    c.backbone.name = "contnet_b"
    c.backbone.stages = ("stage3", "stage4")
    c.backbone.weights = os.environ.get("CONTNET_B_WEIGHTS")
    return c
