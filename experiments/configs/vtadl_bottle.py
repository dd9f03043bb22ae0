"""VT-ADL, small model, on the real MVTec AD bottle category at 64 px (a CPU budget).

    vtadl-jax train --config experiments/configs/vtadl_bottle.py --workdir runs/vt_bottle
    vtadl-jax evaluate --workdir runs/vt_bottle

The model of experiments/configs/vtadl_synthetic.py (64x64, patch 8 -> 8x8 grid as the
paper's 512/64, D 64, depth 2, 4 heads, K 16, lr 1e-3, batch 8), on MVTec AD bottle with
the paper's preprocessing (resize, centre crop, [-1, 1]; preset "vtadl_mvtec" at 64 px).
The data root is $MVTEC_AD_ROOT, else ../shared/data/mvtec_ad beside the repository.

arg:
  "paper" - the paper's head and loss unchanged (mixture NLL, scales = softplus + 1e-3):
            on real bottle its NLL collapses (the failing setting of
            experiments/ablate_vtadl_bottle.py).
  "fixed" (default) - the recorded setting that localises on real bottle; it departs from
            the paper by named options only (each documented where it is defined):
            model.overrides.scale_floor=1.0 (component std >= 1, the analogue of the
            authors' code's variance >= 1), model.overrides.density_stop_gradient=True
            (the density loss does not train the encoder) and
            scoring.nll_normalization="per_position" (patch NLL standardised by its
            per-grid-position mean/std over the training images).
            Measured figures: experiments/results/mvtec_bottle/vtadl/.
"""
from __future__ import annotations

import os

import ml_collections

from vtadl_jax.train.config import base_config

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MODEL = {"image_size": 64, "patch_size": 8, "dim": 64, "num_heads": 4, "mlp_dim": 128,
         "num_components": 16, "recon_dim": 128, "decoder_width": 32, "decoder_num_up": 3}
# The departures of arg "fixed" from the paper (see the module docstring).
FIXED_MODEL = {"scale_floor": 1.0, "density_stop_gradient": True}
FIXED_SCORING = {"nll_normalization": "per_position"}


def default_root() -> str:
    """$MVTEC_AD_ROOT, else <repo>/../shared/data/mvtec_ad."""
    return os.environ.get("MVTEC_AD_ROOT") or os.path.join(os.path.dirname(REPO), "shared",
                                                          "data", "mvtec_ad")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    setting = arg or "fixed"
    if setting not in ("paper", "fixed"):
        raise ValueError(f"vtadl_bottle.py: arg must be 'paper' or 'fixed', got {arg!r}")
    c = base_config()
    c.model.variant = "tiny"
    c.model.overrides = dict(MODEL, **(FIXED_MODEL if setting == "fixed" else {}))
    c.data.name = "mvtec_ad/bottle"
    c.data.root = default_root()
    c.data.preset = "vtadl_mvtec"
    c.data.image_size = 64
    c.data.backend = "direct"
    c.batch_size = 8
    c.num_steps = 1500
    c.optim.learning_rate = 1e-3
    c.checkpoint.every_steps = 500
    c.score_form = "default"
    c.scoring = dict(FIXED_SCORING if setting == "fixed" else {})
    return c
