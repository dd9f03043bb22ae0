"""Whole-config checks, run before anything is written to a work directory.

``check_vtadl_config`` (``vtadl-jax train``) and ``check_patch_gaussian_config``
(``vtadl-jax fit``) raise ``ConfigError`` naming the first bad field and what is
expected; ``check_training_data`` compares the config with the training images once the
data source exists (size, channels, enough images for one batch). The training loop and
the pipelines call them; nothing here reads or writes files.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import ml_collections

from vtadl_jax.errors import ConfigError

RANGES = ("[-1,1]", "[0,1]")


def _get(config: ml_collections.ConfigDict, key: str) -> Any:
    node: Any = config
    for part in key.split("."):
        if not isinstance(node, (ml_collections.ConfigDict, dict)) or part not in node:
            raise ConfigError(f"{key}: missing from the config")
        node = node[part]
    return node


def _fail(key: str, expected: str, value: Any) -> ConfigError:
    return ConfigError(f"{key}: expected {expected}, got {value!r}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def require_int(config, key: str, minimum: int, *, optional: bool = False) -> None:
    value = _get(config, key)
    if optional and value is None:
        return
    if not _is_int(value) or value < minimum:
        raise _fail(key, f"an int >= {minimum}" + (" or None" if optional else ""), value)


def require_float(config, key: str, *, positive: bool, optional: bool = False) -> None:
    """A finite number, > 0 (positive) or >= 0."""
    value = _get(config, key)
    if optional and value is None:
        return
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < 0 or (positive and value == 0):
        raise _fail(key, f"a finite number {'> 0' if positive else '>= 0'}"
                    + (" or None" if optional else ""), value)


def require_choice(config, key: str, choices: Sequence[Any]) -> None:
    value = _get(config, key)
    if value not in choices:
        raise _fail(key, f"one of {list(choices)}", value)


def require_bool(config, key: str) -> None:
    value = _get(config, key)
    if not isinstance(value, bool):
        raise _fail(key, "true or false", value)


def check_vtadl_config(config: ml_collections.ConfigDict) -> None:
    """Every field the VT-ADL training loop reads (see vtadl_jax/train/config.py)."""
    import jax

    from vtadl_jax.train.step import LossConfig

    require_int(config, "seed", 0)
    require_int(config, "num_steps", 1)
    require_int(config, "batch_size", 1)
    if config.batch_size % jax.device_count():
        raise ConfigError(f"batch_size: expected a multiple of the {jax.device_count()} "
                          f"devices, got {config.batch_size}")
    require_float(config, "optim.learning_rate", positive=True)
    require_float(config, "optim.weight_decay", positive=False)
    unknown = set(_get(config, "optim")) - {"learning_rate", "weight_decay"}
    if unknown:
        raise ConfigError(f"optim: unknown fields {sorted(unknown)}; "
                          "expected learning_rate, weight_decay")
    require_choice(config, "input_range", RANGES)
    require_choice(config, "data.source_range", RANGES)
    require_int(config, "data.image_size", 1, optional=True)
    require_int(config, "data.max_examples", 1, optional=True)

    loss_fields = {f.name: f for f in dataclasses.fields(LossConfig)}
    unknown = set(_get(config, "loss")) - set(loss_fields)
    if unknown:
        raise ConfigError(f"loss: unknown fields {sorted(unknown)}; expected {sorted(loss_fields)}")
    for name in ("nll_weight", "mse_weight", "ssim_weight"):
        require_float(config, f"loss.{name}", positive=False)
    require_float(config, "loss.ssim_max_val", positive=True, optional=True)
    require_float(config, "loss.ssim_sigma", positive=True)
    require_int(config, "loss.ssim_filter_size", 1)
    require_int(config, "loss.k_chunk", 1, optional=True)
    require_choice(config, "loss.ssim_form", ("one_minus", "negative"))
    require_choice(config, "loss.nll_reduction", ("sum", "mean"))
    require_bool(config, "loss.fused_head")

    require_int(config, "checkpoint.every_steps", 1)
    require_int(config, "checkpoint.keep", 1)
    require_int(config, "checkpoint.keep_best", 0)
    require_choice(config, "checkpoint.best_mode", ("min", "max"))
    if not isinstance(_get(config, "checkpoint.best_metric"), str):
        raise _fail("checkpoint.best_metric", "a metric name", config.checkpoint.best_metric)

    check_model_and_data(config)


def check_model_and_data(config: ml_collections.ConfigDict) -> None:
    """`model.variant` / `model.overrides` build a model that takes `data.image_size`."""
    from vtadl_jax.models import variants

    require_int(config, "data.image_size", 1, optional=True)
    variant = _get(config, "model.variant")
    known = sorted(variants.VARIANTS) + sorted(f"vtadl-{k}" for k in variants.VARIANTS)
    if variant not in known:
        raise _fail("model.variant", f"one of {known}", variant)
    fields = variants.variant_fields(variant, **dict(_get(config, "model.overrides") or {}))
    variants.check_fields(fields)
    size = config.data.image_size
    if size is not None and (size, size) != fields["image_size"]:
        raise ConfigError(
            f"data.image_size={size} does not match the model's image_size "
            f"{fields['image_size']} (model.variant {variant!r}, model.overrides.image_size); "
            "expected the same size")


def check_training_data(config: ml_collections.ConfigDict, source) -> None:
    """The training images fit the model and fill at least one batch."""
    from vtadl_jax.models import variants

    count = len(source)
    if count < config.batch_size:
        raise ConfigError(f"batch_size={config.batch_size} is larger than the {count} training "
                          f"images of data.name={config.data.name!r} (data.root="
                          f"{config.data.get('root')!r}); expected batch_size <= {count}")
    fields = variants.variant_fields(config.model.variant, **dict(config.model.overrides or {}))
    expected = (*fields["image_size"], fields["channels"])
    shape = tuple(source[0]["image"].shape)
    if shape != expected:
        raise ConfigError(
            f"the training images are {shape[0]}x{shape[1]}x{shape[-1]} (data.image_size="
            f"{config.data.get('image_size')!r}, data.preset={config.data.get('preset')!r}) but "
            f"the model expects {expected[0]}x{expected[1]}x{expected[2]} (model image_size "
            f"{fields['image_size']}, channels {fields['channels']}); expected the same size")


def check_patch_gaussian_config(config: ml_collections.ConfigDict) -> None:
    """Every field `vtadl-jax fit` reads (see experiments/configs/patch_gaussian_common.py)."""
    from vtadl_jax.models.backbones.registry import BACKBONES, build_module

    require_int(config, "seed", 0)
    require_int(config, "batch_size", 1)
    require_int(config, "data.image_size", 1)
    require_int(config, "data.max_examples", 1, optional=True)
    require_choice(config, "backbone.name", BACKBONES)
    module = build_module(config.backbone.name)  # no weights: cheap
    multiple = int(getattr(getattr(module, "config", None), "input_multiple", 1) or 1)
    if config.data.image_size % multiple:
        raise ConfigError(f"data.image_size: backbone {config.backbone.name!r} expected a "
                          f"multiple of {multiple}, got {config.data.image_size}")
    stages = _get(config, "backbone.stages")
    if not (isinstance(stages, (tuple, list)) and stages and all(isinstance(s, str) for s in stages)):
        raise _fail("backbone.stages", "a non-empty tuple of stage names", stages)
    require_choice(config, "gaussian.upsample", ("bilinear", "nearest"))
    require_choice(config, "gaussian.score_path", ("solve", "whiten"))
    require_float(config, "gaussian.eps", positive=True)
    require_float(config, "gaussian.blur_sigma", positive=False)
    require_int(config, "gaussian.channel_subset", 0)
    require_bool(config, "gaussian.shard_positions")
    if "distributed" in config:
        require_bool(config, "distributed")
