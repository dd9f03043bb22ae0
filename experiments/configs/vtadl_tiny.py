"""VT-ADL "tiny" config: 32x32x3 images, seconds on a CPU (tests, CI, demos).

Mishra et al. 2021 (VT-ADL) loss and optimiser, a very small model (variants.py).
"""
from __future__ import annotations

import ml_collections

from vtadl_jax.train.config import base_config


def get_config() -> ml_collections.ConfigDict:
    """Tiny model, batch 8, 40 steps, lr 1e-3 so the loss visibly falls in a few dozen."""
    c = base_config()
    c.model.variant = "tiny"
    c.data.name = "folder"
    c.data.preset = "vtadl_btad"  # resize to data.image_size, [-1, 1]
    c.data.image_size = 32
    c.batch_size = 8
    c.num_steps = 40
    c.optim.learning_rate = 1e-3
    c.checkpoint.every_steps = 10
    c.checkpoint.async_save = False
    c.progress = False
    return c
