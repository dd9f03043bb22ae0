"""Patch Vision Transformer encoder of VT-ADL.

The encoder of Mishra et al. 2021 ("VT-ADL: A Vision Transformer Network for Image
Anomaly Detection and Localization", ISIE 2021) is the ViT of Dosovitskiy et al. 2021
("An Image is Worth 16x16 Words", ICLR 2021) as the authors' code builds it:

- the image is cut into non-overlapping P x P patches, each flattened in
  (row, column, channel) order and mapped by a linear layer to width D;
- a learned class token is prepended and a learned position embedding of N + 1 rows
  is added;
- ``depth`` pre-LayerNorm blocks: x += MHSA(LN(x)); x += MLP(LN(x)), with a bias-free
  qkv projection, exact (erf) GELU and no dropout; there is no final LayerNorm;
- the class token is dropped at the output: (B, N, D) patch embeddings.

Initialisation follows the code: Kaiming-normal (fan-in, gain sqrt 2) weights with zero
bias for every linear layer, standard-normal class token and position embedding.
"""
from __future__ import annotations

from typing import Literal

import flax.linen as nn
import jax
import jax.numpy as jnp

# torch.nn.init.kaiming_normal_ (fan_in, ReLU gain): an untruncated normal, std sqrt(2/fan_in).
kaiming_normal = nn.initializers.variance_scaling(2.0, "fan_in", "normal")


def patchify(images: jax.Array, patch_size: int) -> jax.Array:
    """Cut images into flattened non-overlapping patches.

    Args:
      images: (B, H, W, C) with H and W multiples of ``patch_size``.
      patch_size: P.

    Returns:
      (B, (H/P) * (W/P), P * P * C), patches in row-major grid order, each flattened in
      (row, column, channel) order (the code's ``b c (h p1) (w p2) -> b (h w) (p1 p2 c)``).
    """
    b, h, w, c = images.shape
    if h % patch_size or w % patch_size:
        raise ValueError(
            f"images: spatial size {h}x{w} is not a multiple of patch_size={patch_size}"
        )
    gh, gw = h // patch_size, w // patch_size
    x = images.reshape(b, gh, patch_size, gw, patch_size, c)
    x = x.transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, gh * gw, patch_size * patch_size * c)


class MultiHeadSelfAttention(nn.Module):
    """Multi-head self-attention with a bias-free qkv projection (as the VT-ADL code).

    Attributes:
      num_heads: number of heads h; the width D must be divisible by h.
      attn_scale: "head" scales logits by (D/h)^-0.5 (standard ViT, the default);
        "model" by D^-0.5 (the authors' code).
    """

    num_heads: int
    attn_scale: Literal["head", "model"] = "head"
    dtype: jnp.dtype | None = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """x: (B, T, D) -> (B, T, D)."""
        b, t, d = x.shape
        if d % self.num_heads:
            raise ValueError(f"num_heads={self.num_heads} does not divide the width {d}")
        head_dim = d // self.num_heads
        if self.attn_scale == "head":
            scale = head_dim**-0.5
        elif self.attn_scale == "model":
            scale = d**-0.5
        else:
            raise ValueError(f"attn_scale must be 'head' or 'model', got {self.attn_scale!r}")
        qkv = nn.Dense(3 * d, use_bias=False, kernel_init=kaiming_normal, dtype=self.dtype,
                       name="to_qkv")(x)
        q, k, v = jnp.split(qkv, 3, axis=-1)
        # 'b t (h e) -> b h t e'
        q, k, v = (a.reshape(b, t, self.num_heads, head_dim).transpose(0, 2, 1, 3)
                   for a in (q, k, v))
        logits = jnp.einsum("bhie,bhje->bhij", q, k) * scale
        attn = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(v.dtype)
        out = jnp.einsum("bhij,bhje->bhie", attn, v)
        out = out.transpose(0, 2, 1, 3).reshape(b, t, d)
        return nn.Dense(d, kernel_init=kaiming_normal, bias_init=nn.initializers.zeros,
                        dtype=self.dtype, name="to_out")(out)


class MlpBlock(nn.Module):
    """Linear -> exact (erf) GELU -> Linear. x: (..., D) -> (..., D)."""

    hidden_dim: int
    dtype: jnp.dtype | None = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        d = x.shape[-1]
        y = nn.Dense(self.hidden_dim, kernel_init=kaiming_normal, dtype=self.dtype,
                     name="fc1")(x)
        y = nn.gelu(y, approximate=False)  # PyTorch nn.GELU is the erf form
        return nn.Dense(d, kernel_init=kaiming_normal, dtype=self.dtype, name="fc2")(y)


class EncoderBlock(nn.Module):
    """Pre-LayerNorm transformer block: x + MHSA(LN(x)), then x + MLP(LN(x))."""

    num_heads: int
    mlp_dim: int
    attn_scale: Literal["head", "model"] = "head"
    dtype: jnp.dtype | None = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """x: (B, T, D) -> (B, T, D)."""
        # PyTorch LayerNorm default eps is 1e-5 (Flax: 1e-6).
        y = nn.LayerNorm(epsilon=1e-5, dtype=self.dtype, name="norm1")(x)
        x = x + MultiHeadSelfAttention(self.num_heads, self.attn_scale, self.dtype,
                                       name="attn")(y)
        y = nn.LayerNorm(epsilon=1e-5, dtype=self.dtype, name="norm2")(x)
        return x + MlpBlock(self.mlp_dim, self.dtype, name="mlp")(y)


class PatchViT(nn.Module):
    """VT-ADL patch encoder (Mishra et al. 2021; ViT of Dosovitskiy et al. 2021).

    Attributes:
      patch_size: P; the image side must be a multiple of it.
      dim: embedding width D.
      depth: number of transformer blocks.
      num_heads: attention heads.
      mlp_dim: hidden width of the block MLP.
      attn_scale: "head" (default) or "model" (the authors' code), see
        ``MultiHeadSelfAttention``.
    """

    patch_size: int
    dim: int
    depth: int
    num_heads: int
    mlp_dim: int
    attn_scale: Literal["head", "model"] = "head"
    dtype: jnp.dtype | None = None

    @nn.compact
    def __call__(self, images: jax.Array) -> jax.Array:
        """images: (B, H, W, C) -> patch embeddings (B, N, D), N = (H/P)(W/P)."""
        patches = patchify(images, self.patch_size)
        x = nn.Dense(self.dim, kernel_init=kaiming_normal, dtype=self.dtype,
                     name="patch_embedding")(patches)
        b, n, d = x.shape
        cls = self.param("cls_token", nn.initializers.normal(1.0), (1, 1, d))
        pos = self.param("pos_embedding", nn.initializers.normal(1.0), (1, n + 1, d))
        x = jnp.concatenate([jnp.broadcast_to(cls, (b, 1, d)).astype(x.dtype), x], axis=1)
        x = x + pos.astype(x.dtype)
        for i in range(self.depth):
            x = EncoderBlock(self.num_heads, self.mlp_dim, self.attn_scale, self.dtype,
                             name=f"block{i}")(x)
        return x[:, 1:, :]
