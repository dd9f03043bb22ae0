"""VT-ADL on BTAD (Mishra et al. 2021, Table IV): products 01, 02, 03, resize 512.

    vtadl-jax train --config experiments/configs/vtadl_btad.py:01 --workdir runs/vt_btad01 \
        data.root=/path/to/BTech_Dataset_transformed

Same model and training as experiments/configs/vtadl_mvtec.py. BTAD must be supplied by the
user (BTAD_ROOT).
"""
from __future__ import annotations

import os

import ml_collections

from vtadl_jax.train.config import base_config

TRAIN_IMAGES = {"01": 400, "02": 399, "03": 1000}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    product = arg or "01"
    c = base_config()
    c.model.variant = "paper"
    c.data.name = f"btad/{product}"
    c.data.root = os.environ.get("BTAD_ROOT")
    c.data.preset = "vtadl_btad"
    c.batch_size = 8
    c.num_steps = 400 * max(1, TRAIN_IMAGES.get(product, 400) // 8)
    c.score_form = "default"
    return c
