"""Convert the authors' PyTorch ConTNet checkpoints (Yan et al. 2021) to Flax and back.

Key layout of the official code (``ConTNet.py`` of yan-hao-tian/ConTNet; DDP checkpoints
wrap it as ``{"model": {"module.<key>": tensor}}``) and where each key goes::

    layer0.conv.conv.weight  (O, I, 7, 7)   -> params/layer0_conv/kernel (7, 7, I, O)
    layer{i}.ConTBlock{j}.bn.{weight,bias}  -> params/layer{i}_ConTBlock{j}/bn/{scale,bias}
      .bn.running_{mean,var}                -> batch_stats/.../bn/{mean,var}
      .bn.num_batches_tracked               -> accepted and dropped
      .ste{1,2}.pe.{0,1} (1,P,1,C/2)/(1,1,P,C/2)   -> .../ste{1,2}/pe_{0,1} (same shape)
      .ste{1,2}.attn.relative_position_bias_table  -> same name (relative variant)
      .ste{1,2}.attn.relative_position_index       -> checked against the recomputed index
      .ste{1,2}.attn.{qkv,proj}.{weight,bias}, .mlp.{fc1,fc2}.*  -> Dense kernel (in, out)
      .ste{1,2}.norm{1,2}.{weight,bias}     -> LayerNorm scale / bias
      .out_conv.conv.weight                 -> .../out_conv/kernel
      .downsample.conv.weight               -> .../downsample/kernel  ("conv" shortcut)
      .downsample.conv.conv.weight          -> .../downsample/kernel  ("avgpool" shortcut)
    fc.{weight,bias}                        -> params/fc/{kernel,bias}

:func:`detect_contnet_config` reads the options from the keys and shapes. Not stored in
a checkpoint and so taken from arguments: pre-norm (default False, the training script's
default), heads (default 1/2/4/8, unless a relative bias table shows them) and dropout.
"""
from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from vtadl_jax.convert.efficientnet_lite import CheckpointMismatchError
from vtadl_jax.convert.pth import load_pth
from vtadl_jax.models.backbones.contnet import ConTNet, ConTNetConfig, relative_position_index

__all__ = ["CheckpointMismatchError", "UnsupportedCheckpointError", "normalize_state_dict",
           "detect_contnet_config",
           "contnet_from_state_dict", "contnet_to_state_dict", "load_contnet_pth"]

class UnsupportedCheckpointError(CheckpointMismatchError, NotImplementedError):
    """A ConTNet variant the Flax model does not build (a ValueError: a bad input file)."""


_BLOCK = re.compile(r"^layer(\d+)\.ConTBlock(\d+)\.")
_LEAF_TO_TORCH = {("params", "kernel"): "weight", ("params", "bias"): "bias",
                  ("params", "scale"): "weight", ("batch_stats", "mean"): "running_mean",
                  ("batch_stats", "var"): "running_var", ("params", "pe_0"): "pe.0",
                  ("params", "pe_1"): "pe.1",
                  ("params", "relative_position_bias_table"): "relative_position_bias_table"}


def normalize_state_dict(obj: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Unwrap ``{"model": ...}`` / ``{"state_dict": ...}``, strip "module.", make NumPy.

    Values may be NumPy arrays or anything with ``.detach().cpu().numpy()`` (torch tensors;
    torch itself is never imported).
    """
    while isinstance(obj, Mapping):
        inner = next((obj[k] for k in ("state_dict", "model") if isinstance(obj.get(k), Mapping)),
                     None)
        if inner is None:
            break
        obj = inner
    if not isinstance(obj, Mapping):
        raise CheckpointMismatchError(f"expected a dict-like state dict, got "
                                      f"{type(obj).__name__}")
    out: dict[str, np.ndarray] = {}
    for key, value in obj.items():
        name = key[len("module."):] if key.startswith("module.") else key
        if hasattr(value, "detach"):
            value = value.detach().cpu().numpy()
        out[name] = np.asarray(value)
    return out


def _stage_blocks(sd: Mapping[str, np.ndarray]) -> list[int]:
    """Blocks per stage from the ``layer{i}.ConTBlock{j}.`` keys; they must be contiguous."""
    found: dict[int, set[int]] = {}
    for key in sd:
        m = _BLOCK.match(key)
        if m:
            found.setdefault(int(m.group(1)), set()).add(int(m.group(2)))
    if not found:
        raise CheckpointMismatchError("no 'layer{i}.ConTBlock{j}.*' keys: not a ConTNet "
                                      f"state dict (first keys: {sorted(sd)[:8]})")
    stages = sorted(found)
    if stages != list(range(1, len(stages) + 1)):
        raise CheckpointMismatchError(f"ConTNet stages must be layer1..layerN, found {stages}")
    blocks = []
    for s in stages:
        ids = sorted(found[s])
        if ids != list(range(len(ids))):
            raise CheckpointMismatchError(f"layer{s}: ConTBlock indices {ids} are not 0..n-1")
        blocks.append(len(ids))
    return blocks


def _stage_shape(sd: Mapping[str, np.ndarray], stage: int, suffix: str) -> tuple[int, ...] | None:
    """Shape of the first ``layer{stage}.ConTBlock*.{suffix}`` tensor, or None."""
    pattern = re.compile(rf"^layer{stage}\.ConTBlock\d+\.{re.escape(suffix)}$")
    for key in sorted(sd):
        if pattern.match(key):
            return tuple(sd[key].shape)
    return None


def detect_contnet_config(state_dict: Mapping[str, Any], *, heads: tuple[int, ...] | None = None,
                          pre_norm: bool = False, **overrides: Any) -> ConTNetConfig:
    """Build the :class:`ConTNetConfig` a state dict was trained with (see module docstring).

    Raises UnsupportedCheckpointError (a NotImplementedError and CheckpointMismatchError)
    for stems the Flax model does not build (tweak_C, first_embedding) and
    CheckpointMismatchError when an option cannot be read.
    """
    sd = normalize_state_dict(state_dict)
    if any(k.startswith("layer0.conv_bn") for k in sd):
        raise UnsupportedCheckpointError("this checkpoint uses the ResNet-C stem (tweak_C=True: "
                                  "layer0.conv_bn1..3); only the 7x7 conv stem is supported")
    if "layer0.conv.weight" in sd or any(k.startswith("layer0.norm") for k in sd):
        raise UnsupportedCheckpointError("this checkpoint uses the 4x4 patch-embedding stem "
                                  "(first_embedding=True); only the 7x7 conv stem is supported")
    blocks = _stage_blocks(sd)
    n = len(blocks)
    relative = any(k.endswith(".attn.relative_position_bias_table") for k in sd)
    absolute = any(k.endswith(".pe.0") or k.endswith(".pe.1") for k in sd)
    if relative and absolute:
        raise CheckpointMismatchError("state dict has both absolute (pe.0/pe.1) and relative "
                                      "(relative_position_bias_table) position embeddings")
    if not (relative or absolute):
        raise CheckpointMismatchError("cannot tell the position embedding: no 'ste*.pe.0' and "
                                      "no 'attn.relative_position_bias_table' keys")
    stem = sd.get("layer0.conv.conv.weight")
    bn1 = _stage_shape(sd, 1, "bn.weight")
    if stem is not None and stem.ndim == 4:
        inplanes, in_channels = int(stem.shape[0]), int(stem.shape[1])
    elif bn1 is not None:
        inplanes, in_channels = int(bn1[0]), 3
    else:
        raise CheckpointMismatchError("cannot read the stem width: no 'layer0.conv.conv.weight'"
                                      " and no 'layer1.ConTBlock*.bn.weight'")
    mlp_dims, windows, table_heads = [], [], []
    for s in range(1, n + 1):
        fc1 = (_stage_shape(sd, s, "ste1.mlp.fc1.weight")
               or _stage_shape(sd, s, "ste2.mlp.fc1.weight"))
        if fc1 is None:
            raise CheckpointMismatchError(f"cannot read the MLP width of layer{s}: no "
                                          f"'layer{s}.ConTBlock*.ste*.mlp.fc1.weight'")
        mlp_dims.append(int(fc1[0]))
        wins = []
        for ste in ("ste1", "ste2"):
            if relative:
                shape = _stage_shape(sd, s, f"{ste}.attn.relative_position_bias_table")
                side = None if shape is None else (math.isqrt(shape[0]) + 1) // 2
                if shape is not None:
                    table_heads.append((s, int(shape[1])))
            else:
                shape = _stage_shape(sd, s, f"{ste}.pe.0")
                side = None if shape is None or len(shape) != 4 else int(shape[1])
            if side is None:
                raise CheckpointMismatchError(f"cannot read the {ste} window of layer{s}")
            wins.append(side)
        windows.append(tuple(wins))
    if heads is None:
        if table_heads:
            per_stage = dict(table_heads)
            heads = tuple(per_stage[s] for s in range(1, n + 1))
        elif n == 4:
            heads = (1, 2, 4, 8)
        else:
            raise CheckpointMismatchError(f"{n} stages: pass heads= (not stored in the keys)")
    fc = sd.get("fc.weight", sd.get("fc.bias"))
    kw: dict[str, Any] = dict(
        inplanes=inplanes, in_channels=in_channels, blocks=tuple(blocks),
        mlp_dims=tuple(mlp_dims), heads=tuple(heads), windows=tuple(windows),
        position_embedding="relative" if relative else "absolute",
        shortcut="avgpool" if any(k.endswith("downsample.conv.conv.weight") for k in sd)
        else "conv",
        qkv_bias=any(k.endswith(".attn.qkv.bias") for k in sd), pre_norm=pre_norm,
        num_classes=None if fc is None else int(fc.shape[0]))
    if n != 4:
        kw["dropout"] = (0.0,) * n
    kw.update(overrides)
    return ConTNetConfig(**kw)


def _torch_key(flat_key: tuple[str, ...], config: ConTNetConfig) -> str:
    collection, *modules, leaf = flat_key
    parts = []
    for name in modules:
        m = re.fullmatch(r"layer(\d+)_ConTBlock(\d+)", name)
        if m:
            parts.append(f"layer{m.group(1)}.ConTBlock{m.group(2)}")
        elif name == "layer0_conv":
            parts.append("layer0.conv.conv")
        elif name == "out_conv":
            parts.append("out_conv.conv")
        elif name == "downsample":
            stage = int(re.match(r"layer(\d+)", modules[0]).group(1))
            avg = config.shortcut == "avgpool" and config.strides[stage - 1] != 1
            parts.append("downsample.conv.conv" if avg else "downsample.conv")
        else:
            parts.append(name)
    return ".".join(parts + [_LEAF_TO_TORCH[(collection, leaf)]])


def _to_flax(arr: np.ndarray, leaf: str) -> np.ndarray:
    if leaf == "kernel":
        return arr.transpose(2, 3, 1, 0) if arr.ndim == 4 else arr.T
    return arr


def _to_torch(arr: np.ndarray, leaf: str) -> np.ndarray:
    if leaf == "kernel":
        return arr.transpose(3, 2, 0, 1) if arr.ndim == 4 else arr.T
    return arr


def _expected(config: ConTNetConfig) -> dict[str, tuple[tuple[str, ...], tuple[int, ...]]]:
    """{torch key: (flax flat key, flax shape)} for a model built from ``config``."""
    side = config.input_multiple
    x = jax.ShapeDtypeStruct((1, side, side, config.in_channels), jnp.float32)
    shapes = jax.eval_shape(lambda: ConTNet(config).init(jax.random.key(0), jnp.zeros(x.shape)))
    flat = traverse_util.flatten_dict(jax.tree.map(lambda s: tuple(s.shape), dict(shapes),
                                                   is_leaf=lambda s: hasattr(s, "shape")))
    return {_torch_key(k, config): (k, v) for k, v in flat.items()}


def _buffers(config: ConTNetConfig, names: list[str]) -> dict[str, np.ndarray]:
    """Non-parameter buffers torch stores: BN counters and relative position indices."""
    out = {}
    table = re.compile(r"^(layer(\d+)\.ConTBlock\d+\.ste(\d))\.attn\.relative_position_bias_table$")
    for name in names:
        if name.endswith(".running_mean"):
            out[name[: -len("running_mean")] + "num_batches_tracked"] = np.array(0, np.int64)
        m = table.match(name)
        if m:
            window = config.windows[int(m.group(2)) - 1][int(m.group(3)) - 1]
            out[f"{m.group(1)}.attn.relative_position_index"] = \
                relative_position_index(window).astype(np.int64)
    return out


def contnet_from_state_dict(state_dict: Mapping[str, Any], *, source: str = "state dict",
                            **config_overrides: Any) -> tuple[ConTNetConfig, dict[str, Any]]:
    """Official ConTNet state dict -> (config, ``{"params", "batch_stats"}`` of float32 NumPy).

    ``config_overrides`` go to :func:`detect_contnet_config` (e.g. ``heads=``,
    ``pre_norm=``). Raises CheckpointMismatchError, its message starting with ``source``:
    not a ConTNet, or ALL missing, unexpected and mis-shaped keys (and relative position
    indices that differ from the recomputed ones).
    """
    try:
        sd = normalize_state_dict(state_dict)
        config = detect_contnet_config(sd, **config_overrides)
        expected = _expected(config)
    except CheckpointMismatchError as err:  # name the file in every message
        raise type(err)(f"{source}: {err}") from None
    except (ValueError, TypeError, ArithmeticError) as err:  # shapes no ConTNet has
        raise CheckpointMismatchError(f"{source}: cannot build the ConTNet its keys and "
                                      f"shapes describe: {err}") from None
    buffers = _buffers(config, list(expected))
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected) - set(buffers))
    misshaped, flat = [], {}
    for name, (key, shape) in expected.items():
        if name not in sd:
            continue
        arr = _to_flax(sd[name], key[-1])
        if tuple(arr.shape) != shape:
            want = tuple(_to_torch(np.empty(shape), key[-1]).shape)
            misshaped.append(f"{name}: got {tuple(sd[name].shape)}, expected {want}")
            continue
        flat[key] = np.asarray(arr, np.float32)
    for name, ref in buffers.items():
        if name in sd and name.endswith("relative_position_index"):
            if sd[name].shape != ref.shape or not np.array_equal(sd[name], ref):
                misshaped.append(f"{name}: differs from the recomputed index {ref.shape}")
    if missing or unexpected or misshaped:
        raise CheckpointMismatchError(
            f"{source} does not match the detected ConTNet {config}:\n"
            f"  missing ({len(missing)}): {missing}\n"
            f"  unexpected ({len(unexpected)}): {unexpected}\n"
            f"  mis-shaped ({len(misshaped)}): {misshaped}")
    return config, traverse_util.unflatten_dict(flat)


def contnet_to_state_dict(variables: Mapping[str, Any], config: ConTNetConfig
                          ) -> dict[str, np.ndarray]:
    """Flax variables -> state dict in the official key layout (PyTorch tensor layouts).

    Adds the buffers ``torch.load_state_dict(strict=True)`` wants: ``num_batches_tracked``
    (int64 0) per BatchNorm and, for relative position bias, ``relative_position_index``.
    """
    out: dict[str, np.ndarray] = {}
    for key, value in traverse_util.flatten_dict(dict(variables)).items():
        out[_torch_key(key, config)] = np.ascontiguousarray(_to_torch(np.asarray(value), key[-1]))
    out.update(_buffers(config, list(out)))
    return out


def load_contnet_pth(path: str | Path, **config_overrides: Any
                     ) -> tuple[ConTNet, dict[str, Any]]:
    """Read an official ConTNet .pth (no torch needed) -> (model, variables) for ``apply``."""
    config, variables = contnet_from_state_dict(load_pth(path), source=str(path),
                                                **config_overrides)
    return ConTNet(config), variables
