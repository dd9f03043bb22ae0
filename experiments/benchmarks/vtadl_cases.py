"""The VT-ADL configurations timed by the train-step profile and the comparison with
the authors' code (Mishra et al. 2021).

- "code": the code-equivalent configuration: variant "paper" with the authors' capsule
  projection, their MDN head with K 10, attention scale D^-0.5 and the loss
  5 MSE - 0.5 SSIM + NLL; its parameter count equals that of their VT_AE + MDN.
- "paper": the paper's variant as is (K 150 paper head, linear projection, 1 - SSIM).
"""
from __future__ import annotations

CODE_OVERRIDES = dict(projection="routing", mdn_head="vtadl_code", num_components=10,
                      attn_scale="model")
CASES = ("code", "paper")


def build_case(name: str):
    """(model, tx, loss_cfg) of case ``name`` ("code" or "paper"), Adam 1e-4, wd 1e-4."""
    from vtadl_jax.models.variants import get_variant
    from vtadl_jax.train.optim import make_optimizer
    from vtadl_jax.train.step import LossConfig

    tx = make_optimizer(1e-4, 1e-4)
    if name == "code":
        return get_variant("paper", **CODE_OVERRIDES), tx, LossConfig(ssim_form="negative")
    if name == "paper":
        return get_variant("paper"), tx, LossConfig()
    raise ValueError(f"unknown case {name!r}; known: {CASES}")
