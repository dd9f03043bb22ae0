"""Compute dtypes of the VT-ADL model (mixed precision).

``dtype="float32"`` casts nothing: the float32 inputs and parameters decide (float64
everywhere under ``jax.enable_x64`` with float64 inputs and parameters).
``dtype="bfloat16"`` makes the Dense, attention and convolution layers compute in
bfloat16 (Micikevicius et al. 2018, "Mixed Precision Training", ICLR: float32 master
weights, low-precision arithmetic) while parameters stay float32; statistics and
likelihoods are brought back to at least float32 with ``at_least_float32``.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

COMPUTE_DTYPES = ("float32", "bfloat16")


def flax_dtype(name: str):
    """The flax ``dtype`` attribute for a compute dtype name: None (no cast) for
    "float32", ``jnp.bfloat16`` for "bfloat16"."""
    if name not in COMPUTE_DTYPES:
        raise ValueError(f"dtype must be one of {COMPUTE_DTYPES}, got {name!r}")
    return None if name == "float32" else jnp.dtype(name)


def at_least_float32(x: jax.Array) -> jax.Array:
    """x cast up to float32 when narrower (bfloat16, float16); float32/float64 unchanged."""
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))
