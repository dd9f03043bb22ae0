"""Pure jnp numerical kernels (no Flax): SSIM, mixture NLL, patch Gaussians, filters, capsules,
transposed convolution.

Each is a small jit-able function of arrays with its shapes in the docstring:

    from vtadl_jax import kernels
    kernels.ssim(x, y, max_val=2.0)
    kernels.mixture_nll(z, logits, means, scales, k_chunk=64)
    kernels.gaussian.update(stats, feats)          # streaming patch statistics
"""
from vtadl_jax.kernels import gaussian
from vtadl_jax.kernels.capsule import capsule_votes, dynamic_routing, squash
from vtadl_jax.kernels.conv_transpose import conv_transpose
from vtadl_jax.kernels.filters import (gaussian_blur, gaussian_kernel1d, resize_bilinear,
                                       resize_nearest)
from vtadl_jax.kernels.gaussian import (cholesky_factor, mahalanobis, mahalanobis_whitened,
                                        whitening_matrix)
from vtadl_jax.kernels.mixture import (mixture_nll, mixture_nll_from_head, mixture_nll_full_cov,
                                       vtadl_code_mdn_loss)
from vtadl_jax.kernels.ssim import ssim, ssim_loss

__all__ = [
    "gaussian", "capsule_votes", "conv_transpose", "dynamic_routing", "squash", "gaussian_blur",
    "gaussian_kernel1d", "resize_bilinear", "resize_nearest", "cholesky_factor", "mahalanobis",
    "mahalanobis_whitened", "whitening_matrix", "mixture_nll", "mixture_nll_from_head",
    "mixture_nll_full_cov", "vtadl_code_mdn_loss", "ssim", "ssim_loss",
]
