"""Named VT-ADL variants decoded from a table (Mishra et al. 2021).

- "paper": 512x512x3 input, P 64 (8x8 grid), D 512, depth 6, 8 heads, MLP 1024,
  K 150 (the paper's Table I), the code's six-layer decoder; projection "linear"
  (paper) by default, "routing" (the code's capsule layer) as an override.
- "mnist": 28x28x1 input, P 4 (7x7 grid), D 64, depth 4, 4 heads, MLP 128, K 16,
  reconstruction vector 128, small decoder (7x7 -> 28x28). ``image_size=32`` with
  the same P gives an 8x8 grid.
- "tiny": 32x32x3 input, P 8 (4x4 grid), D 32, depth 2, 2 heads, MLP 64, K 4,
  reconstruction vector 64, small decoder; a train step takes milliseconds on a CPU.

``get_variant(name, **overrides)`` returns a ``VTADL`` module; any field of
``OVERRIDABLE`` may be overridden (``image_size`` may be an int for square images);
``check_fields`` validates a table row after overrides (names, types, allowed values,
shape constraints) with messages naming ``model.overrides.<field>``.
``dtype`` is the compute dtype, "float32" (default) or "bfloat16" (mixed precision:
parameters, optimiser state, normalisation statistics and the loss stay float32; see
``models.vtadl``).
"""
from __future__ import annotations

import math
import typing
from typing import Any

from vtadl_jax.errors import ConfigError
from vtadl_jax.models.precision import COMPUTE_DTYPES
from vtadl_jax.models.vtadl import VTADL

# VTADL's settable fields (not flax's parent/name, nor bn_axis_name which the training
# code sets), with the allowed values of the Literal ones.
OVERRIDABLE = ("image_size", "channels", "patch_size", "dim", "depth", "num_heads", "mlp_dim",
               "attn_scale", "projection", "recon_dim", "decoder", "decoder_width",
               "decoder_num_up", "num_components", "mdn_head", "scale_floor",
               "density_stop_gradient", "noise_std", "dtype")
_HINTS = typing.get_type_hints(VTADL)
CHOICES = {name: typing.get_args(_HINTS[name]) for name in OVERRIDABLE
           if typing.get_origin(_HINTS[name]) is typing.Literal}
_CODE_DECODER = dict(recon_dim=512, image_size=(512, 512), channels=3)  # VTADLCodeDecoder

VARIANTS: dict[str, dict[str, Any]] = {
    "paper": dict(image_size=(512, 512), channels=3, patch_size=64, dim=512, depth=6,
                  num_heads=8, mlp_dim=1024, num_components=150, projection="linear",
                  recon_dim=512, decoder="vtadl_code"),
    "mnist": dict(image_size=(28, 28), channels=1, patch_size=4, dim=64, depth=4,
                  num_heads=4, mlp_dim=128, num_components=16, projection="linear",
                  recon_dim=128, decoder="small", decoder_width=64, decoder_num_up=2),
    "tiny": dict(image_size=(32, 32), channels=3, patch_size=8, dim=32, depth=2,
                 num_heads=2, mlp_dim=64, num_components=4, projection="linear",
                 recon_dim=64, decoder="small", decoder_width=16, decoder_num_up=2),
}

_ALIASES = {f"vtadl-{k}": k for k in VARIANTS}


def variant_fields(name: str, **overrides: Any) -> dict[str, Any]:
    """The table row of ``name`` (or "vtadl-<name>") updated with ``overrides``."""
    key = _ALIASES.get(name, name)
    if key not in VARIANTS:
        raise ValueError(f"unknown VT-ADL variant {name!r}; known: {sorted(VARIANTS)}")
    fields = dict(VARIANTS[key])
    unknown = set(overrides) - set(OVERRIDABLE) - {"bn_axis_name"}  # API only
    if unknown:
        raise ConfigError(f"model.overrides: unknown VTADL fields {sorted(unknown)}; "
                          f"settable: {sorted(OVERRIDABLE)}")
    fields.update({k: v for k, v in overrides.items() if v is not None})
    if fields.get("dtype", "float32") not in COMPUTE_DTYPES:
        raise ConfigError(f"model.overrides.dtype: expected one of {list(COMPUTE_DTYPES)}, "
                         f"got {fields['dtype']!r}")
    size = fields["image_size"]
    fields["image_size"] = (size, size) if isinstance(size, int) else tuple(size)
    return fields


def override_defaults(name: str) -> dict[str, Any]:
    """Every overridable field of variant ``name`` with its value (the type an override
    of ``model.overrides.<field>`` is parsed with); image_size: any literal."""
    key = _ALIASES.get(name, name)
    row = {**{f: VTADL.__dataclass_fields__[f].default for f in OVERRIDABLE},
           **VARIANTS.get(key, {})}
    row["image_size"] = None  # an int (square) or an (H, W) pair
    return row


def _fail(field: str, expected: str, value: Any) -> ConfigError:
    return ConfigError(f"model.overrides.{field}: expected {expected}, got {value!r}")


def check_fields(fields: dict[str, Any]) -> None:
    """Raise ``ConfigError`` naming the field if a ``variant_fields`` row cannot build a model."""
    fields = {**{f: VTADL.__dataclass_fields__[f].default for f in OVERRIDABLE}, **fields}
    size = fields["image_size"]
    if not (isinstance(size, tuple) and len(size) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in size)):
        raise _fail("image_size", "an int >= 1 or an (H, W) pair of them", size)
    for name, choices in CHOICES.items():
        if fields[name] not in choices:
            raise _fail(name, f"one of {list(choices)}", fields[name])
    for name in ("channels", "patch_size", "dim", "depth", "num_heads", "mlp_dim", "recon_dim",
                 "decoder_width", "num_components", "decoder_num_up"):
        value, low = fields[name], 0 if name == "decoder_num_up" else 1
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise _fail(name, f"an int >= {low}", value)
    for name, positive in (("scale_floor", True), ("noise_std", False)):
        value = fields[name]
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) \
            and math.isfinite(value) and (value > 0 if positive else value >= 0)
        if not ok:
            raise _fail(name, f"a finite float {'> 0' if positive else '>= 0'}", value)
    if not isinstance(fields["density_stop_gradient"], bool):
        raise _fail("density_stop_gradient", "a boolean", fields["density_stop_gradient"])
    if fields["dtype"] not in COMPUTE_DTYPES:
        raise _fail("dtype", f"one of {list(COMPUTE_DTYPES)}", fields["dtype"])
    if size[0] % fields["patch_size"] or size[1] % fields["patch_size"]:
        raise _fail("patch_size", f"a divisor of image_size {size}", fields["patch_size"])
    if fields["dim"] % fields["num_heads"]:
        raise _fail("num_heads", f"a divisor of dim={fields['dim']}", fields["num_heads"])
    if fields["projection"] == "routing" and \
            (size[0] // fields["patch_size"]) * (size[1] // fields["patch_size"]) \
            * fields["dim"] % 8:
        raise _fail("projection", "'linear' (routing needs N*dim divisible by 8)", "routing")
    if fields["decoder"] == "vtadl_code":
        for name, needed in _CODE_DECODER.items():
            if fields[name] != needed:
                raise ConfigError(f"model.overrides.{name}: decoder 'vtadl_code' needs "
                                  f"{name}={needed}, got {fields[name]!r}")


def get_variant(name: str, **overrides: Any) -> VTADL:
    """A ``VTADL`` module for a named variant ("paper", "mnist", "tiny")."""
    return VTADL(**variant_fields(name, **overrides))
