"""Patch Gaussians on EfficientNet-Lite0 on the generated MVTec-layout set.

    vtadl-jax make-synthetic --out outputs/synthetic
    vtadl-jax fit --config experiments/configs/patch_gaussian_synthetic.py:object --workdir runs/pg_object
    vtadl-jax evaluate --workdir runs/pg_object

arg: the category folder of the generated set ("object" or "texture").
"""

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
from patch_gaussian_common import base_config  # noqa: E402


def get_config(arg: str | None = None):
    c = base_config()
    c.data.name = "folder"
    c.data.root = os.path.join("outputs", "synthetic", arg or "object")
    return c
