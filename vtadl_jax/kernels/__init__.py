"""Pure jnp numerical kernels (no Flax): SSIM, mixture NLL, patch Gaussians, filters, capsules."""
