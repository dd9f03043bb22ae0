"""VT-ADL on MVTec AD with the paper's settings (Mishra et al. 2021, Table I / Table III).

    vtadl-jax train --config experiments/configs/vtadl_mvtec.py:hazelnut --workdir runs/vt_hazelnut \
        data.root=/path/to/mvtec_anomaly_detection
    vtadl-jax evaluate --workdir runs/vt_hazelnut

Resize 550, centre crop 512, [-1, 1]; P 64, D 512, depth 6, 8 heads, MLP 1024, K 150;
Adam 1e-4, coupled weight decay 1e-4, batch 8, 400 epochs; noise 0.2; NLL + 5 MSE +
0.5 (1 - SSIM). `model.overrides.projection=routing` gives the authors' capsule layer.
arg: the MVTec AD category. MVTec AD must be supplied by the user (MVTEC_AD_ROOT).
"""
from __future__ import annotations

import os

import ml_collections

from vtadl_jax.train.config import base_config

# Training images per category (MVTec AD train/good), for "400 epochs" in steps.
TRAIN_IMAGES = {"bottle": 209, "cable": 224, "capsule": 219, "carpet": 280, "grid": 264,
                "hazelnut": 391, "leather": 245, "metal_nut": 220, "pill": 267, "screw": 320,
                "tile": 230, "toothbrush": 60, "transistor": 213, "wood": 247, "zipper": 240}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    category = arg or "hazelnut"
    c = base_config()
    c.model.variant = "paper"
    c.data.name = f"mvtec_ad/{category}"
    c.data.root = os.environ.get("MVTEC_AD_ROOT")
    c.data.preset = "vtadl_mvtec"
    c.batch_size = 8
    c.num_steps = 400 * max(1, TRAIN_IMAGES.get(category, 250) // 8)
    c.score_form = "default"
    return c
