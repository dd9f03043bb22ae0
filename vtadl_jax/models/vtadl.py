"""VT-ADL: patch ViT encoder + reconstruction decoder + mixture density head.

Mishra et al. 2021 (VT-ADL, ISIE 2021), with the ViT of Dosovitskiy et al. 2021.
Forward pass (images (B, H, W, C), in [-1, 1] by default):

1. ``PatchViT`` -> patch embeddings z (B, N, D);
2. in training only, z += N(0, noise_std^2) noise (before both paths, as the code);
3. reconstruction vector r = projection(z): ``"linear"`` (the paper's learned weighted
   sum: Linear(N*D -> recon_dim)) or ``"routing"`` (the code's capsule layer with one
   output capsule: N*D/8 input capsules of dim 8, each mapped by its own recon_dim x 8
   matrix, summed and squashed; with a single output capsule the routing coefficients
   are identically 1, so this is exactly a bias-free linear map followed by squash);
4. decoder(r) -> reconstruction (B, H, W, C) in [-1, 1];
5. ``MixtureDensityHead`` on every (noisy) z -> mixture parameters.

Mixed precision (``dtype="bfloat16"``): Dense, attention and LayerNorm layers and the
decoder convolutions compute in bfloat16 (flax ``dtype``) while every parameter stays
float32 (``param_dtype``), so the optimiser state does too; LayerNorm and BatchNorm
statistics and the attention softmax are computed in float32, and the outputs
(embeddings, reconstruction, mixture parameters) are returned in float32
(``models.precision``), so the MDN likelihood, SSIM and the losses are float32
whatever the compute dtype. ``dtype="float32"`` casts nothing.

``density_stop_gradient=True`` (a DEVIATION from paper and code, default False): the
density head sees, and the NLL is computed on, ``stop_gradient(z)``, so the NLL trains
the head only and the encoder is trained by the reconstruction terms alone. Without it
the encoder can lower the NLL without bound by shrinking (collapsing) its embeddings
onto the narrow components the head learns; on real MVTec AD bottle this makes the
patch NLL a function of grid position rather than of content
(experiments/ablate_vtadl_bottle.py measures the effect).

Noise is drawn per example: the key of example i is fold_in(make_rng("noise"), id_i)
with ``example_ids`` the global example indices, so that a data-parallel run gives
the same noise as a single-device run of the same global batch.
"""
from __future__ import annotations

from typing import Any, Literal

import flax.linen as nn
import jax
import jax.numpy as jnp

from vtadl_jax.models.decoder import SmallDecoder, VTADLCodeDecoder
from vtadl_jax.models.mdn import MixtureDensityHead
from vtadl_jax.models.precision import at_least_float32, flax_dtype
from vtadl_jax.kernels.capsule import single_capsule_sum, squash
from vtadl_jax.models.vit import PatchViT

SQUASH_EPS = 1e-8


class CapsuleProjection(nn.Module):
    """The code's one-output-capsule layer as matmul + squash. (B, N, D) -> (B, out_dim).

    Weight W: (N*D/in_dim_caps, out_dim, in_dim_caps), init 0.01 * normal (the code's
    (1, n_in, out, in_dim) tensor without its leading 1).
    """

    out_dim: int = 512
    in_dim_caps: int = 8

    @nn.compact
    def __call__(self, z: jax.Array) -> jax.Array:
        b = z.shape[0]
        u = z.reshape(b, -1, self.in_dim_caps)  # the code's encoded.view(b, N*D/8, 8)
        w = self.param("W", nn.initializers.normal(0.01),
                       (u.shape[1], self.out_dim, self.in_dim_caps))
        s = single_capsule_sum(u, w.astype(u.dtype))  # weight not transposed
        return squash(at_least_float32(s), axis=-1, eps=SQUASH_EPS)  # a norm: float32


class VTADL(nn.Module):
    """VT-ADL model (see the module docstring). Build it with ``get_variant``.

    Attributes:
      image_size: (H, W) of the input.
      channels: C.
      patch_size, dim, depth, num_heads, mlp_dim, attn_scale: the ``PatchViT``.
      projection: "linear" (paper) or "routing" (code's capsule layer).
      recon_dim: length of the reconstruction vector (512 for the code's decoder).
      decoder: "vtadl_code" (six transposed convs, needs recon_dim 512 and 512x512x3
        output) or "small" (``SmallDecoder``).
      decoder_width, decoder_num_up: ``SmallDecoder`` settings.
      num_components: K mixture components.
      mdn_head: "paper" or "vtadl_code" (see ``models.mdn``).
      scale_floor: floor of the paper head's scales (1e-3; 1.0 is a deviation that
        bounds the NLL below, the analogue of the code's variance >= 1).
      density_stop_gradient: the density head and NLL see stop_gradient(z) (deviation,
        see the module docstring); default False (paper and code).
      noise_std: std of the training noise on z (0 disables).
      bn_axis_name: device axis over which BatchNorm statistics are averaged in training.
      dtype: compute dtype, "float32" or "bfloat16" (see the module docstring).
    """

    image_size: tuple[int, int]
    channels: int
    patch_size: int
    dim: int
    depth: int
    num_heads: int
    mlp_dim: int
    attn_scale: Literal["head", "model"] = "head"
    projection: Literal["linear", "routing"] = "linear"
    recon_dim: int = 512
    decoder: Literal["vtadl_code", "small"] = "vtadl_code"
    decoder_width: int = 64
    decoder_num_up: int = 2
    num_components: int = 150
    mdn_head: Literal["paper", "vtadl_code"] = "paper"
    scale_floor: float = 1e-3
    density_stop_gradient: bool = False
    noise_std: float = 0.2
    bn_axis_name: str | None = None
    dtype: str = "float32"

    def setup(self):
        cdtype = flax_dtype(self.dtype)  # None for "float32": no cast
        self.encoder = PatchViT(self.patch_size, self.dim, self.depth, self.num_heads,
                                self.mlp_dim, self.attn_scale, cdtype)
        if self.projection == "linear":
            self.project = nn.Dense(self.recon_dim, dtype=cdtype)
        elif self.projection == "routing":
            self.project = CapsuleProjection(self.recon_dim)
        else:
            raise ValueError(f"projection must be 'linear' or 'routing', got {self.projection!r}")
        if self.decoder == "vtadl_code":
            self.dec = VTADLCodeDecoder(bn_axis_name=self.bn_axis_name, dtype=cdtype)
        elif self.decoder == "small":
            self.dec = SmallDecoder(tuple(self.image_size), self.channels, self.decoder_width,
                                    self.decoder_num_up, self.bn_axis_name, cdtype)
        else:
            raise ValueError(f"decoder must be 'vtadl_code' or 'small', got {self.decoder!r}")
        self.mdn = MixtureDensityHead(self.num_components, self.mdn_head, self.scale_floor,
                                      cdtype)

    @property
    def grid(self) -> tuple[int, int]:
        """Patch grid (gh, gw)."""
        return self.image_size[0] // self.patch_size, self.image_size[1] // self.patch_size

    def add_noise(self, z: jax.Array, example_ids: jax.Array | None) -> jax.Array:
        """z (B, N, D) + N(0, noise_std^2), one key per example id (B,) (default arange)."""
        if example_ids is None:
            example_ids = jnp.arange(z.shape[0])
        base = self.make_rng("noise")
        keys = jax.vmap(lambda i: jax.random.fold_in(base, i))(example_ids)
        # Drawn in float32 (or wider) whatever the compute dtype: the same noise in both.
        dtype = jnp.promote_types(z.dtype, jnp.float32)
        noise = jax.vmap(lambda k: jax.random.normal(k, z.shape[1:], dtype))(keys)
        return z + (self.noise_std * noise).astype(z.dtype)

    def __call__(self, images: jax.Array, *, train: bool,
                 example_ids: jax.Array | None = None) -> dict[str, Any]:
        """images (B, H, W, C) -> dict(embeddings (B, N, D) (noisy in training),
        recon (B, H, W, C), mixture: MixtureParams with leading (B, N)), all float32
        (or wider) whatever the compute dtype; "embeddings" are the density's target
        (stop-gradiented with ``density_stop_gradient``)."""
        if images.shape[1:] != (*self.image_size, self.channels):
            raise ValueError(f"images: shape {images.shape} does not match the model's "
                             f"(B, {self.image_size[0]}, {self.image_size[1]}, {self.channels})")
        z = self.encoder(images)
        if train and self.noise_std > 0:
            z = self.add_noise(z, example_ids)
        recon = self.dec(self.project(z.reshape(z.shape[0], -1)), train=train)
        if recon.shape != images.shape:
            raise ValueError(f"decoder output {recon.shape} != input {images.shape}; "
                             "the 'vtadl_code' decoder needs 512x512x3 images")
        if self.density_stop_gradient:
            z = jax.lax.stop_gradient(z)
        return {"embeddings": at_least_float32(z), "recon": at_least_float32(recon),
                "mixture": self.mdn(z)}

