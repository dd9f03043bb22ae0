"""Base VT-ADL training config (the paper's Table I); experiments/configs/*.py start from it.

Fields:
  seed: int; parameters from fold_in(seed, 0), training noise from fold_in(seed, 1).
  model.variant: "paper" | "mnist" | "tiny"; model.overrides: VTADL fields to change
    (e.g. projection="routing", attn_scale="model", num_components=10,
    mdn_head="vtadl_code", noise_std=0.0, image_size=32); any field of
    models.variants.OVERRIDABLE can be set from the command line
    (`model.overrides.mdn_head=vtadl_code`), checked by models.variants.check_fields;
    model.overrides.dtype: compute dtype "float32" (default) | "bfloat16" (mixed
    precision; parameters, optimiser state and the loss stay float32).
  data.name / data.split / data.root / data.preset / data.image_size / data.scale /
    data.backend ("tfds" | "direct") / data.data_dir / data.max_examples: passed to
    vtadl_jax.data.make_source by the pipelines (vtadl_jax/pipelines/common.py);
    data.source_range: "[-1,1]" | "[0,1]", what the Source yields.
  input_range: "[-1,1]" (default, matches the tanh decoder) | "[0,1]" (the code).
  batch_size: global batch (divisible by the device count); num_steps: optimiser steps.
  optim.learning_rate 1e-4, optim.weight_decay 1e-4 (coupled, torch Adam).
  loss: LossConfig fields (weights 1 / 5 / 0.5, ssim_form "one_minus" | "negative",
    ssim_max_val None -> width of input_range, nll_reduction, k_chunk, fused_head).
  checkpoint.every_steps / keep (latest N) / keep_best / best_metric ("train_loss", the
    mean loss since the previous save, or a key of eval_fn's metrics) / best_mode /
    async_save.
  resume: continue from the latest checkpoint in workdir.
  progress: tqdm bar; distributed: call jax.distributed.initialize().
"""
from __future__ import annotations

import ml_collections

from vtadl_jax.configs import register_open_section


def _model_override_fields(config: ml_collections.ConfigDict) -> dict:
    """`model.overrides` may start empty: every VTADL field can be set by an override."""
    from vtadl_jax.models import variants  # (imports flax: only when an override needs it)

    return variants.override_defaults(config.model.variant)


register_open_section("model.overrides", _model_override_fields)


def base_config() -> ml_collections.ConfigDict:
    """The paper's settings: Adam 1e-4, wd 1e-4, batch 8, K 150, noise 0.2."""
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.model = ml_collections.ConfigDict({"variant": "paper",
                                         "overrides": {}})
    c.data = ml_collections.ConfigDict({"name": "mvtec_ad/hazelnut", "split": "train",
                                        "root": None, "preset": "vtadl_mvtec",
                                        "image_size": None, "scale": None,
                                        "backend": "tfds", "data_dir": None,
                                        "max_examples": None, "source_range": "[-1,1]"})
    c.input_range = "[-1,1]"
    c.batch_size = 8
    c.num_steps = 400 * 50  # ~400 epochs of a ~400-image MVTec category at batch 8
    c.optim = ml_collections.ConfigDict({"learning_rate": 1e-4, "weight_decay": 1e-4})
    c.loss = ml_collections.ConfigDict({
        "nll_weight": 1.0, "mse_weight": 5.0, "ssim_weight": 0.5, "ssim_form": "one_minus",
        "ssim_max_val": None, "ssim_filter_size": 11, "ssim_sigma": 1.5,
        "nll_reduction": "sum", "k_chunk": None, "fused_head": False})
    c.checkpoint = ml_collections.ConfigDict({
        "every_steps": 500, "keep": 3, "keep_best": 1, "best_metric": "train_loss",
        "best_mode": "min", "async_save": True})
    c.resume = True
    c.progress = True
    c.distributed = False
    return c
