"""ConTNet (Yan et al. 2021, "ConTNet: Why not use convolution and transformer at the same
time?") in Flax linen, NHWC, as the authors' released code builds it; the backbone of the
patch-Gaussian method of Dini & Rahtu (VISAPP 2023).

Structure (ConTNet-B, :func:`contnet_b`; shapes for a 224x224x3 input):

- stem ``layer0``: 7x7 conv stride 2 (no bias, no BN, no ReLU), 3x3 max-pool stride 2
  -> (B, 56, 56, 64).
- stage i (``layer1..layer4``), width p = 64, 128, 256, 512, blocks 3, 4, 6, 3:
  every ConT block but the last keeps p channels; the last maps p -> 2p and halves the
  resolution in stages 1-3 (stride 1 in the last stage). Outputs "stage1".."stage4":
  (B, 28, 28, 128), (B, 14, 14, 256), (B, 7, 7, 512), (B, 7, 7, 1024).
- head (optional): global average pool + Dense(1000) -> "logits" (B, 1000).

ConT block (pre-activation): ``a = relu(BN(x))``; shortcut ``x`` or, in a stage's last
block, a 1x1 conv of ``a`` (with the stage stride; "avgpool": 2x2 average pool then a
1x1 conv); residual = out_conv(STE2(STE1(a))), out_conv a 3x3 conv with the block's
stride (1x1 in the last block of the last stage); out = residual + shortcut.
STE = a transformer encoder layer applied independently inside non-overlapping windows
(7 and 14; 7 and 7 in the last stage), with an absolute 2-D position embedding (first
C/2 channels get a per-row vector, last C/2 a per-column vector) or a relative
position bias (Swin-style table), post-norm (default) or pre-norm, MLP with exact GELU.

The input side must be a multiple of :attr:`ConTNetConfig.input_multiple` (224 for
ConTNet-B) so that every stage's map splits into whole windows.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

__all__ = ["ConTNetConfig", "ConTNet", "ConTBlock", "STE", "MHSA", "contnet_b",
           "contnet_tiny", "relative_position_index", "STAGE_NAMES"]

LN_EPS = 1e-5       # torch.nn.LayerNorm default
BN_EPS = 1e-5       # torch.nn.BatchNorm2d default
BN_MOMENTUM = 0.9   # Flax convention (= PyTorch momentum 0.1)
STAGE_NAMES = ("stage1", "stage2", "stage3", "stage4")

_dense_init = nn.initializers.truncated_normal(0.02)
_conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


@dataclasses.dataclass(frozen=True)
class ConTNetConfig:
    """Hyper-parameters of a ConTNet (defaults: ConTNet-B with the training script's options).

    Attributes:
      inplanes: stem width; stage i has width ``inplanes * 2**i`` (its last block doubles it).
      blocks: ConT blocks per stage.
      mlp_dims: MLP hidden width per stage.
      heads: attention heads per stage.
      windows: (STE1, STE2) window side per stage.
      dropout: attention/MLP dropout per stage (training only).
      last_dropout: dropout after the very last block (training only).
      position_embedding: "absolute" (pe.0 / pe.1) or "relative" (bias table per head).
      shortcut: "conv" (strided 1x1 conv) or "avgpool" (2x2 average pool + 1x1 conv).
      qkv_bias: bias in the qkv projection.
      pre_norm: pre-norm transformer layers (the released code's default is post-norm).
      num_classes: classifier width, or None for no head.
      in_channels: input channels.
    """
    inplanes: int = 64
    blocks: tuple[int, ...] = (3, 4, 6, 3)
    mlp_dims: tuple[int, ...] = (256, 512, 1024, 1024)
    heads: tuple[int, ...] = (1, 2, 4, 8)
    windows: tuple[tuple[int, int], ...] = ((7, 14), (7, 14), (7, 14), (7, 7))
    dropout: tuple[float, ...] = (0.0, 0.0, 0.1, 0.1)
    last_dropout: float = 0.2
    position_embedding: str = "absolute"
    shortcut: str = "conv"
    qkv_bias: bool = True
    pre_norm: bool = False
    num_classes: int | None = 1000
    in_channels: int = 3

    def __post_init__(self) -> None:
        n = len(self.blocks)
        for name in ("mlp_dims", "heads", "windows", "dropout"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"ConTNetConfig.{name} has {len(getattr(self, name))} entries "
                                 f"but blocks has {n} stages")
        if self.position_embedding not in ("absolute", "relative"):
            raise ValueError(f"position_embedding must be 'absolute' or 'relative', got "
                             f"{self.position_embedding!r}")
        if self.shortcut not in ("conv", "avgpool"):
            raise ValueError(f"shortcut must be 'conv' or 'avgpool', got {self.shortcut!r}")
        for i, (w, h) in enumerate(zip(self.widths, self.heads)):
            if w % h:
                raise ValueError(f"stage {i + 1}: width {w} is not divisible by {h} heads")
            if self.position_embedding == "absolute" and w % 2:
                raise ValueError(f"stage {i + 1}: absolute position embedding needs an even "
                                 f"width, got {w}")

    @property
    def widths(self) -> tuple[int, ...]:
        """Input width of each stage (its output width is twice that)."""
        return tuple(self.inplanes * 2 ** i for i in range(len(self.blocks)))

    @property
    def strides(self) -> tuple[int, ...]:
        """Stride of each stage's last block: 2, except 1 in the last stage."""
        return tuple(2 if i < len(self.blocks) - 1 else 1 for i in range(len(self.blocks)))

    @property
    def input_multiple(self) -> int:
        """Smallest side that splits every stage's map into whole windows (224 for B)."""
        m, factor = 1, 4
        for (w1, w2), s in zip(self.windows, self.strides):
            m = math.lcm(m, factor * w1, factor * w2)
            factor *= s
        return m


def relative_position_index(window: int) -> np.ndarray:
    """(window**2, window**2) int index into a ((2w-1)**2, heads) bias table (Swin layout)."""
    coords = np.stack(np.meshgrid(np.arange(window), np.arange(window), indexing="ij"))
    coords = coords.reshape(2, -1)
    rel = (coords[:, :, None] - coords[:, None, :]).transpose(1, 2, 0) + (window - 1)
    return rel[..., 0] * (2 * window - 1) + rel[..., 1]


class MHSA(nn.Module):
    """Multi-head self-attention on tokens (N, T, C), T = window**2; scale head_dim**-0.5."""
    heads: int
    window: int
    relative: bool = False
    qkv_bias: bool = True
    dropout: float = 0.0

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        n, t, c = x.shape
        d = c // self.heads
        qkv = nn.Dense(3 * c, use_bias=self.qkv_bias, kernel_init=_dense_init, name="qkv")(x)
        qkv = qkv.reshape(n, t, 3, self.heads, d).transpose(2, 0, 3, 1, 4)  # (3, N, h, T, d)
        q, k, v = qkv[0] * d ** -0.5, qkv[1], qkv[2]
        logits = jnp.einsum("nhqd,nhkd->nhqk", q, k)
        if self.relative:
            size = (2 * self.window - 1) ** 2
            table = self.param("relative_position_bias_table", _dense_init,
                               (size, self.heads))
            index = relative_position_index(self.window).reshape(-1)
            bias = table[index].reshape(t, t, self.heads).transpose(2, 0, 1)
            logits = logits + bias[None].astype(logits.dtype)
        attn = jax.nn.softmax(logits, axis=-1)
        attn = nn.Dropout(self.dropout, deterministic=not train)(attn)
        y = jnp.einsum("nhqk,nhkd->nqhd", attn, v).reshape(n, t, c)
        y = nn.Dense(c, kernel_init=_dense_init, name="proj")(y)
        return nn.Dropout(self.dropout, deterministic=not train)(y)


class MLP(nn.Module):
    """Dense(hidden) -> exact GELU -> Dense(C), dropout after each (training only)."""
    hidden: int
    dropout: float = 0.0

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        c = x.shape[-1]
        x = nn.gelu(nn.Dense(self.hidden, kernel_init=_dense_init, name="fc1")(x),
                    approximate=False)
        x = nn.Dropout(self.dropout, deterministic=not train)(x)
        x = nn.Dense(c, kernel_init=_dense_init, name="fc2")(x)
        return nn.Dropout(self.dropout, deterministic=not train)(x)


class STE(nn.Module):
    """Standard transformer encoder layer inside non-overlapping windows: (B, H, W, C) -> same."""
    window: int
    mlp_dim: int
    heads: int
    relative: bool = False
    qkv_bias: bool = True
    pre_norm: bool = False
    dropout: float = 0.0

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        b, h, w, c = x.shape
        p = self.window
        nh, nw = h // p, w // p
        x = x.reshape(b, nh, p, nw, p, c).transpose(0, 1, 3, 2, 4, 5).reshape(-1, p, p, c)
        if not self.relative:
            pe_row = self.param("pe_0", nn.initializers.zeros, (1, p, 1, c // 2))
            pe_col = self.param("pe_1", nn.initializers.zeros, (1, 1, p, c // 2))
            x = jnp.concatenate([x[..., : c // 2] + pe_row, x[..., c // 2:] + pe_col], axis=-1)
        x = x.reshape(-1, p * p, c)
        attn = MHSA(self.heads, p, self.relative, self.qkv_bias, self.dropout, name="attn")
        mlp = MLP(self.mlp_dim, self.dropout, name="mlp")
        norm1 = nn.LayerNorm(epsilon=LN_EPS, name="norm1")
        norm2 = nn.LayerNorm(epsilon=LN_EPS, name="norm2")
        if self.pre_norm:
            x = x + attn(norm1(x), train)
            x = x + mlp(norm2(x), train)
        else:
            x = norm1(x + attn(x, train))
            x = norm2(x + mlp(x, train))
        return x.reshape(b, nh, nw, p, p, c).transpose(0, 1, 3, 2, 4, 5).reshape(b, h, w, c)


class ConTBlock(nn.Module):
    """One ConT block: (B, H, W, C) -> (B, H/stride, W/stride, out_channels).

    ``has_downsample`` (a stage's last block) replaces the identity shortcut by a 1x1 conv;
    with ``stride == 1`` it also makes out_conv 1x1 and adds ``last_dropout``.
    """
    out_channels: int
    mlp_dim: int
    heads: int
    windows: tuple[int, int]
    stride: int = 1
    has_downsample: bool = False
    avgpool_shortcut: bool = False
    relative: bool = False
    qkv_bias: bool = True
    pre_norm: bool = False
    dropout: float = 0.0
    last_dropout: float = 0.0

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        a = nn.BatchNorm(use_running_average=not train, momentum=BN_MOMENTUM, epsilon=BN_EPS,
                         name="bn")(x)
        a = nn.relu(a)
        shortcut = x
        if self.has_downsample:
            s = a
            conv_stride = self.stride
            if self.avgpool_shortcut and self.stride != 1:
                s = nn.avg_pool(s, (self.stride, self.stride), strides=(self.stride,) * 2)
                conv_stride = 1
            shortcut = nn.Conv(self.out_channels, (1, 1), strides=conv_stride, padding="VALID",
                               use_bias=False, kernel_init=_conv_init, name="downsample")(s)
        r = a
        for i, p in enumerate(self.windows, start=1):
            r = STE(p, self.mlp_dim, self.heads, self.relative, self.qkv_bias, self.pre_norm,
                    self.dropout, name=f"ste{i}")(r, train)
        last = self.stride == 1 and self.has_downsample
        k = 1 if last else 3
        r = nn.Conv(self.out_channels, (k, k), strides=self.stride, padding=(k - 1) // 2,
                    use_bias=False, kernel_init=_conv_init, name="out_conv")(r)
        out = r + shortcut
        if last:
            out = nn.Dropout(self.last_dropout, deterministic=not train)(out)
        return out


class ConTNet(nn.Module):
    """ConTNet backbone (+ optional classifier) returning every stage's feature map.

    ``__call__(x, train=False)``: x (B, H, W, in_channels), H and W multiples of
    ``config.input_multiple``; returns {"stage1".."stageN": (B, h_i, w_i, 2 * width_i)}
    plus "logits" (B, num_classes) when ``config.num_classes`` is set. With
    ``train=True`` BatchNorm uses batch statistics (pass ``mutable=["batch_stats"]``) and
    dropout needs a "dropout" PRNG key.
    """
    config: ConTNetConfig = ConTNetConfig()

    def _check_input(self, x: jax.Array) -> None:
        cfg = self.config
        if x.ndim != 4 or x.shape[-1] != cfg.in_channels:
            raise ValueError(f"ConTNet expects (B, H, W, {cfg.in_channels}) images, "
                             f"got shape {tuple(x.shape)}")
        m = cfg.input_multiple
        for axis, size in (("height", x.shape[1]), ("width", x.shape[2])):
            if size % m or size == 0:
                raise ValueError(
                    f"ConTNet input {axis} {size} is not a multiple of {m} (stage windows "
                    f"{cfg.windows} must tile every feature map); resize to "
                    f"{max(m, round(size / m) * m)}, e.g. {m} or {2 * m}")

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> dict[str, jax.Array]:
        self._check_input(x)
        cfg = self.config
        x = nn.Conv(cfg.inplanes, (7, 7), strides=2, padding=3, use_bias=False,
                    kernel_init=_conv_init, name="layer0_conv")(x)
        x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        out: dict[str, jax.Array] = {}
        for i, width in enumerate(cfg.widths):
            for j in range(cfg.blocks[i]):
                last = j == cfg.blocks[i] - 1
                x = ConTBlock(
                    out_channels=2 * width if last else width, mlp_dim=cfg.mlp_dims[i],
                    heads=cfg.heads[i], windows=tuple(cfg.windows[i]),
                    stride=cfg.strides[i] if last else 1, has_downsample=last,
                    avgpool_shortcut=cfg.shortcut == "avgpool",
                    relative=cfg.position_embedding == "relative", qkv_bias=cfg.qkv_bias,
                    pre_norm=cfg.pre_norm, dropout=cfg.dropout[i],
                    last_dropout=cfg.last_dropout, name=f"layer{i + 1}_ConTBlock{j}")(x, train)
            out[f"stage{i + 1}"] = x
        if cfg.num_classes is not None:
            pooled = jnp.mean(x, axis=(1, 2))
            out["logits"] = nn.Dense(cfg.num_classes, kernel_init=_dense_init, name="fc")(pooled)
        return out


def contnet_b(**overrides: Any) -> ConTNet:
    """ConTNet-B (blocks 3/4/6/3, widths 64..512, heads 1/2/4/8): 36,043,112 parameters
    with the 1000-class head (the authors' code; the paper's table says 39.6M)."""
    return ConTNet(ConTNetConfig(**overrides))


def contnet_tiny(**overrides: Any) -> ConTNet:
    """A small ConTNet with the same structure for fast tests: widths 8..64, blocks
    2/1/1/2, windows 2/4 (2/2 last stage), input multiple 64, 10 classes."""
    kw: dict[str, Any] = dict(inplanes=8, blocks=(2, 1, 1, 2), mlp_dims=(16, 32, 64, 64),
                              windows=((2, 4), (2, 4), (2, 4), (2, 2)), num_classes=10)
    kw.update(overrides)
    return ConTNet(ConTNetConfig(**kw))
