"""Named VT-ADL variants decoded from a table (Mishra et al. 2021).

- "paper": 512x512x3 input, P 64 (8x8 grid), D 512, depth 6, 8 heads, MLP 1024,
  K 150 (the paper's Table I), the code's six-layer decoder; projection "linear"
  (paper) by default, "routing" (the code's capsule layer) as an override.
- "mnist": 28x28x1 input, P 4 (7x7 grid), D 64, depth 4, 4 heads, MLP 128, K 16,
  reconstruction vector 128, small decoder (7x7 -> 28x28). ``image_size=32`` with
  the same P gives an 8x8 grid.
- "tiny": 32x32x3 input, P 8 (4x4 grid), D 32, depth 2, 2 heads, MLP 64, K 4,
  reconstruction vector 64, small decoder; a train step takes milliseconds on a CPU.

``get_variant(name, **overrides)`` returns a ``VTADL`` module; any field may be
overridden (``image_size`` may be an int for square images). ``dtype`` is the compute
dtype, "float32" (default) or "bfloat16" (mixed precision: parameters, optimiser state,
normalisation statistics and the loss stay float32; see ``models.vtadl``).
"""
from __future__ import annotations

from typing import Any

from vtadl_jax.models.precision import COMPUTE_DTYPES
from vtadl_jax.models.vtadl import VTADL

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
    unknown = set(overrides) - set(VTADL.__dataclass_fields__)
    if unknown:
        raise ValueError(f"overrides: unknown VTADL fields {sorted(unknown)}")
    fields.update({k: v for k, v in overrides.items() if v is not None})
    if fields.get("dtype", "float32") not in COMPUTE_DTYPES:
        raise ValueError(f"dtype (model.overrides.dtype) must be one of {COMPUTE_DTYPES}, "
                         f"got {fields['dtype']!r}")
    size = fields["image_size"]
    fields["image_size"] = (size, size) if isinstance(size, int) else tuple(size)
    return fields


def get_variant(name: str, **overrides: Any) -> VTADL:
    """A ``VTADL`` module for a named variant ("paper", "mnist", "tiny")."""
    return VTADL(**variant_fields(name, **overrides))
