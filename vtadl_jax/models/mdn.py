"""Mixture density head of VT-ADL (Mishra et al. 2021) and its per-patch NLL.

For every patch embedding z in R^D the head outputs K mixture logits, K means in R^D
and K diagonal scales; the loss is the negative log-likelihood of z itself under that
mixture. Two heads:

- ``head="paper"`` (default, the paper's mathematics): linear logits (D -> K), linear
  means (D -> K*D), scales = softplus(linear(D -> K*D)) + ``scale_floor`` (initialised
  to a zero kernel and bias softplus^-1(1), so every scale starts at 1); the NLL is
  the exact mixture NLL with the full Gaussian constant (``kernels.mixture.mixture_nll``,
  chunked over K with ``k_chunk`` so that no (..., K, D) intermediate beyond one chunk
  is needed by the log-density reduction).
- ``head="vtadl_code"`` (the authors' code): no hidden layer, three bias-free linear
  maps of clamp(z, min=eps) (eps = float64 machine epsilon, as the code's
  ``np.finfo(float).eps``); the softplus output is used as a LOG-variance; the
  "loss" is the code's Jensen bound ``kernels.mixture.vtadl_code_mdn_loss``. The code
  reshapes its outputs as (..., D, K); the same layout is kept here and moved to
  (..., K, D), so weights convert from the code without permutation.
"""
from __future__ import annotations

import math
from typing import Literal, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vtadl_jax.models.precision import at_least_float32

CODE_CLAMP_EPS = float(np.finfo(np.float64).eps)
SOFTPLUS_INV_ONE = math.log(math.e - 1.0)  # softplus(x) = 1


class MixtureParams(NamedTuple):
    """Head outputs; shapes for z of shape (..., D).

    logits: (..., K) unnormalised log mixture weights.
    means: (..., K, D).
    scales: (..., K, D); standard deviations for ``head="paper"``, the code's
      softplus output (a log-variance) for ``head="vtadl_code"``.
    """

    logits: jax.Array
    means: jax.Array
    scales: jax.Array


def _torch_linear_default(fan_in: int):
    bound = 1.0 / math.sqrt(fan_in)

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


class MixtureDensityHead(nn.Module):
    """Per-embedding Gaussian-mixture parameters. z (..., D) -> MixtureParams.

    Attributes:
      num_components: K.
      head: "paper" or "vtadl_code" (see the module docstring).
      scale_floor: added to the softplus scales of the paper head.
      dtype: compute dtype of the linear maps (None: that of the inputs); their
        outputs are cast up to float32 before the softplus, so the mixture parameters
        are float32 (or float64) whatever the compute dtype.
    """

    num_components: int
    head: Literal["paper", "vtadl_code"] = "paper"
    scale_floor: float = 1e-3
    dtype: jnp.dtype | None = None

    @nn.compact
    def __call__(self, z: jax.Array) -> MixtureParams:
        k, d = self.num_components, z.shape[-1]
        lead = z.shape[:-1]
        f32 = at_least_float32
        if self.head == "paper":
            logits = f32(nn.Dense(k, dtype=self.dtype, name="logits")(z))
            means = f32(nn.Dense(k * d, dtype=self.dtype, name="means")(z)).reshape(*lead, k, d)
            # Scales start at 1 + floor (zero kernel, bias softplus^-1(1)): a sane
            # initial NLL whatever the embedding scale; the means break the symmetry.
            raw = f32(nn.Dense(k * d, dtype=self.dtype, kernel_init=nn.initializers.zeros,
                               bias_init=nn.initializers.constant(SOFTPLUS_INV_ONE),
                               name="scales")(z)).reshape(*lead, k, d)
            return MixtureParams(logits, means, jax.nn.softplus(raw) + self.scale_floor)
        if self.head == "vtadl_code":
            init = _torch_linear_default(d)
            x = jnp.maximum(z, CODE_CLAMP_EPS)
            dense = lambda n, name: nn.Dense(n, use_bias=False, kernel_init=init,  # noqa: E731
                                             dtype=self.dtype, name=name)
            logits = f32(dense(k, "pi")(x))
            means = f32(dense(d * k, "mu")(x)).reshape(*lead, d, k)
            logvar = jax.nn.softplus(f32(dense(d * k, "sigma_sq")(x)).reshape(*lead, d, k))
            return MixtureParams(logits, jnp.swapaxes(means, -1, -2), jnp.swapaxes(logvar, -1, -2))
        raise ValueError(f"head must be 'paper' or 'vtadl_code', got {self.head!r}")


def patch_nll(z: jax.Array, params: MixtureParams, *,
              head: Literal["paper", "vtadl_code"] = "paper",
              k_chunk: int | None = None) -> jax.Array:
    """Per-embedding density score, z (..., D) -> (...).

    ``head="paper"``: the exact mixture NLL -log sum_k w_k N(z; mu_k, diag sigma_k^2).
    ``head="vtadl_code"``: the code's per-patch value sum_k w_k * (-log N_k(z)), with
    the softplus output as a log-variance and 0.5 log(2 pi) counted once.
    """
    from vtadl_jax.kernels import mixture  # imported lazily: written by another module

    if head == "paper":
        return mixture.mixture_nll(z, params.logits, params.means, params.scales,
                                   k_chunk=k_chunk)
    if head == "vtadl_code":
        return mixture.vtadl_code_mdn_loss(z, params.logits, params.means, params.scales,
                                           reduction="none")
    raise ValueError(f"head must be 'paper' or 'vtadl_code', got {head!r}")


def fused_paper_nll(z: jax.Array, head_params: dict, *, k_chunk: int | None,
                    scale_floor: float, matmul_dtype=None) -> jax.Array:
    """Paper-head NLL computed from the head's weights, chunk by chunk over K.

    Equal to ``patch_nll(z, MixtureDensityHead(K, "paper")(z))`` but, with ``k_chunk``,
    the (..., K, D) means and scales are never materialised
    (``kernels.mixture.mixture_nll_from_head``). head_params: the head's "params"
    subtree {"logits", "means", "scales"} with Dense kernels (D, K) / (D, K*D).
    z: (..., D) -> (...). matmul_dtype: the head's compute dtype under mixed precision
    (bfloat16: the linear maps multiply in it and accumulate in z's dtype).
    """
    from vtadl_jax.kernels import mixture

    d = z.shape[-1]
    k = head_params["logits"]["kernel"].shape[-1]
    w = lambda name: head_params[name]["kernel"].reshape(d, k, d)  # noqa: E731
    return mixture.mixture_nll_from_head(
        z, z, head_params["logits"]["kernel"], w("means"), w("scales"),
        b_logits=head_params["logits"]["bias"],
        b_means=head_params["means"]["bias"].reshape(k, d),
        b_scales=head_params["scales"]["bias"].reshape(k, d),
        k_chunk=k_chunk, scale_fn=jax.nn.softplus, min_scale=scale_floor,
        matmul_dtype=matmul_dtype)
