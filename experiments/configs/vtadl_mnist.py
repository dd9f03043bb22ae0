"""VT-ADL on one-class MNIST (Mishra et al. 2021, Table II: mean AUROC 0.984).

One digit is normal (training), all others anomalous at test time; the image score is
reconstruction-only (MSE + (1 - SSIM)), as the paper. 28x28x1 images in [-1, 1], patch 4
(7x7 grid), the "mnist" variant (small D, K 16, cheap decoder); set
``model.overrides.image_size = 32`` for 32x32 inputs (8x8 grid).
"""
from __future__ import annotations

import ml_collections

from vtadl_jax.train.config import base_config


def get_config(digit: int = 0) -> ml_collections.ConfigDict:
    """MNIST one-class config for ``digit`` (batch 64, 30 epochs of ~6000 images)."""
    if not 0 <= int(digit) <= 9:
        raise ValueError(f"digit must be in 0..9, got {digit}")
    c = base_config()
    c.model.variant = "mnist"
    c.data.name = f"mnist_one_class/{int(digit)}"
    c.data.preset = "mnist"
    c.batch_size = 64
    c.num_steps = 30 * 6000 // 64
    c.checkpoint.every_steps = 500
    c.score_form = "reconstruction"
    return c
