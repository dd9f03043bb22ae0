"""VT-ADL, small model, on the generated MVTec-layout set (demo and machinery checks).

    vtadl-jax make-synthetic --out outputs/synthetic
    vtadl-jax train --config experiments/configs/vtadl_synthetic.py:object --workdir runs/vt_object
    vtadl-jax evaluate --workdir runs/vt_object

64x64 inputs, patch 8 (8x8 grid as the paper's 512/64), the "tiny" variant widened to
D 64; the paper's loss and noise; lr 1e-3 (not the paper's 1e-4) so that a few hundred
steps on a CPU suffice. arg: the category folder ("object" or "texture").
"""
from __future__ import annotations

import os

import ml_collections

from vtadl_jax.train.config import base_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    c = base_config()
    c.model.variant = "tiny"
    c.model.overrides.update({"image_size": 64, "patch_size": 8, "dim": 64, "num_heads": 4,
                              "mlp_dim": 128, "num_components": 16, "recon_dim": 128,
                              "decoder_width": 32, "decoder_num_up": 3})
    c.data.name = "folder"
    c.data.root = os.path.join("outputs", "synthetic", arg or "object")
    c.data.preset = "vtadl_btad"  # resize to data.image_size, [-1, 1]
    c.data.image_size = 64
    c.batch_size = 8
    c.num_steps = 400
    c.optim.learning_rate = 1e-3
    c.checkpoint.every_steps = 200
    c.score_form = "default"
    return c
