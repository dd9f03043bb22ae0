"""EfficientNet-Lite0 in Flax linen (NHWC), matching the lukemelas-style PyTorch weights.

EfficientNet (Tan & Le, "EfficientNet: Rethinking Model Scaling for Convolutional Neural
Networks", ICML 2019) is a stack of mobile inverted-bottleneck blocks (MBConv). The Lite
variants (TensorFlow "EfficientNet-Lite" release, efficientnet/lite/README.md of
tensorflow/tpu, 2020) change it for mobile accelerators: ReLU6 instead of swish, no
squeeze-and-excitation, and stem (32) and head (1280) widths that are not scaled.

Lite0 (width 1.0, depth 1.0, resolution 224), blocks per stage
(repeats, kernel, stride, expand ratio, in, out):

    stage 1: 1, 3x3, 1, 1,  32 ->  16      stage 5: 3, 5x5, 1, 6,  80 -> 112
    stage 2: 2, 3x3, 2, 6,  16 ->  24      stage 6: 4, 5x5, 2, 6, 112 -> 192
    stage 3: 2, 5x5, 2, 6,  24 ->  40      stage 7: 1, 3x3, 1, 6, 192 -> 320
    stage 4: 3, 3x3, 2, 6,  40 ->  80

Numerics follow the reference PyTorch port (efficientnet_lite_pytorch 0.1.0): BatchNorm
eps 1e-3 (TF momentum 0.99 = PyTorch momentum 0.01); convolutions with TensorFlow "SAME"
padding (the reference pads statically for 224x224 with exactly these amounts; for any
even input side the two agree, for odd sides this module keeps TF "SAME", like the
original TF model); residual only when stride 1 and in == out; stochastic depth
(drop-connect, rate 0.2 * block_index / 16) and dropout 0.2 before the classifier in
training only.

Input: float (B, H, W, 3) RGB, normalised as :func:`normalize` does. The EfficientNet-Lite
release trained with (x - 127) / 128 on [0, 255] pixels ("inception-style" mean/std, chosen
for post-quantisation; MEAN_RGB/STDDEV_RGB of its efficientnet_lite_builder.py): scheme
"tf_lite", the default. The reference PyTorch package's usage example instead uses the
ImageNet mean/std on [0, 1] pixels (scheme "imagenet", inherited from EfficientNet-B*).
Both give the right ImageNet classes on the test photos; "tf_lite" is more confident
(chelsea: Egyptian cat 0.79 vs 0.78; coffee: espresso 0.91 vs 0.82).

Outputs at 224x224 (B = batch):

    stem    (B, 112, 112, 32)    block4 (B, 14, 14, 80)     head   (B, 7, 7, 1280)
    block1  (B, 112, 112, 16)    block5 (B, 14, 14, 112)    pooled (B, 1280)
    block2  (B, 56, 56, 24)      block6 (B, 7, 7, 192)      logits (B, 1000)
    block3  (B, 28, 28, 40)      block7 (B, 7, 7, 320)
"""
from __future__ import annotations

from typing import Any, Literal, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["EfficientNetLite0", "MBConvBlock", "StageSpec", "LITE0_STAGES", "STAGE_NAMES",
           "IMAGENET_MEAN", "IMAGENET_STD", "normalize"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
BN_EPSILON = 1e-3
BN_MOMENTUM = 0.99  # Flax convention (= PyTorch momentum 0.01)


class StageSpec(NamedTuple):
    """One stage of MBConv blocks (Tan & Le 2019, Table 1)."""
    repeats: int
    kernel: int
    stride: int
    expand: int
    in_ch: int
    out_ch: int


LITE0_STAGES: tuple[StageSpec, ...] = (
    StageSpec(1, 3, 1, 1, 32, 16), StageSpec(2, 3, 2, 6, 16, 24),
    StageSpec(2, 5, 2, 6, 24, 40), StageSpec(3, 3, 2, 6, 40, 80),
    StageSpec(3, 5, 1, 6, 80, 112), StageSpec(4, 5, 2, 6, 112, 192),
    StageSpec(1, 3, 1, 6, 192, 320),
)
STAGE_NAMES = ("stem", *(f"block{i}" for i in range(1, 8)), "head", "pooled", "logits")


def normalize(images: jax.Array | np.ndarray,
              scheme: Literal["tf_lite", "imagenet"] = "tf_lite") -> jax.Array:
    """Map RGB images in [0, 1], (..., H, W, 3), to the network's input scale.

    "tf_lite": (255 x - 127) / 128 (the EfficientNet-Lite release's training input);
    "imagenet": (x - IMAGENET_MEAN) / IMAGENET_STD (the reference PyTorch package's example).
    """
    x = jnp.asarray(images, jnp.float32)
    if scheme == "imagenet":
        return (x - jnp.asarray(IMAGENET_MEAN)) / jnp.asarray(IMAGENET_STD)
    if scheme == "tf_lite":
        return (x * 255.0 - 127.0) / 128.0
    raise ValueError(f"normalize: unknown scheme {scheme!r}; use 'imagenet' or 'tf_lite'")


def _bn(name: str, train: bool, dtype: Any) -> nn.BatchNorm:
    return nn.BatchNorm(use_running_average=not train, momentum=BN_MOMENTUM,
                        epsilon=BN_EPSILON, dtype=dtype, name=name)


class MBConvBlock(nn.Module):
    """Mobile inverted bottleneck without SE: (B, H, W, in_ch) -> (B, H/stride, W/stride, out_ch).

    expand 1x1 conv + BN + ReLU6 (skipped if expand == 1), depthwise kxk conv (stride) +
    BN + ReLU6, project 1x1 conv + BN, identity shortcut if stride == 1 and in == out.
    """
    in_ch: int
    out_ch: int
    kernel: int
    stride: int
    expand: int
    drop_connect_rate: float = 0.0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        inputs = x
        hidden = self.in_ch * self.expand
        if self.expand != 1:
            x = nn.Conv(hidden, (1, 1), use_bias=False, dtype=self.dtype, name="expand_conv")(x)
            x = jax.nn.relu6(_bn("bn0", train, self.dtype)(x))
        x = nn.Conv(hidden, (self.kernel, self.kernel), strides=self.stride, padding="SAME",
                    feature_group_count=hidden, use_bias=False, dtype=self.dtype,
                    name="depthwise_conv")(x)
        x = jax.nn.relu6(_bn("bn1", train, self.dtype)(x))
        x = nn.Conv(self.out_ch, (1, 1), use_bias=False, dtype=self.dtype, name="project_conv")(x)
        x = _bn("bn2", train, self.dtype)(x)
        if self.stride == 1 and self.in_ch == self.out_ch:
            if train and self.drop_connect_rate > 0:
                # stochastic depth: drop the whole residual branch per example
                x = nn.Dropout(self.drop_connect_rate, broadcast_dims=(1, 2, 3))(
                    x, deterministic=False)
            x = x + inputs
        return x


class EfficientNetLite0(nn.Module):
    """EfficientNet-Lite0 returning every stage's feature map and the ImageNet logits.

    Attributes:
      num_classes: classifier width (1000 for the ImageNet weights).
      dropout_rate: dropout before the classifier (training only).
      drop_connect_rate: maximum stochastic-depth rate, scaled by block index / #blocks.
      dtype: computation dtype (parameters stay float32).

    ``__call__(x, train=False)``: x (B, H, W, 3) normalised RGB (see :func:`normalize`);
    returns a dict {name: array} with the keys :data:`STAGE_NAMES` (shapes in the module
    docstring). "blockN" is the output of the last block of stage N. With ``train=True``
    BatchNorm uses batch statistics (pass ``mutable=["batch_stats"]``) and, when the rates
    are > 0, needs a "dropout" PRNG key.
    """
    num_classes: int = 1000
    dropout_rate: float = 0.2
    drop_connect_rate: float = 0.2
    dtype: Any = jnp.float32
    stages: tuple[StageSpec, ...] = LITE0_STAGES

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> dict[str, jax.Array]:
        if x.ndim != 4 or x.shape[-1] != 3:
            raise ValueError(f"EfficientNetLite0 expects (B, H, W, 3) images, got {x.shape}")
        out: dict[str, jax.Array] = {}
        x = nn.Conv(self.stages[0].in_ch, (3, 3), strides=2, padding="SAME", use_bias=False,
                    dtype=self.dtype, name="conv_stem")(x.astype(self.dtype))
        x = jax.nn.relu6(_bn("bn0", train, self.dtype)(x))
        out["stem"] = x
        num_blocks = sum(s.repeats for s in self.stages)
        index = 0
        for stage_no, spec in enumerate(self.stages, start=1):
            for r in range(spec.repeats):
                x = MBConvBlock(
                    in_ch=spec.in_ch if r == 0 else spec.out_ch, out_ch=spec.out_ch,
                    kernel=spec.kernel, stride=spec.stride if r == 0 else 1,
                    expand=spec.expand, drop_connect_rate=self.drop_connect_rate * index /
                    num_blocks, dtype=self.dtype, name=f"blocks_{index}")(x, train)
                index += 1
            out[f"block{stage_no}"] = x
        x = nn.Conv(1280, (1, 1), use_bias=False, dtype=self.dtype, name="conv_head")(x)
        x = jax.nn.relu6(_bn("bn1", train, self.dtype)(x))
        out["head"] = x
        pooled = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
        out["pooled"] = pooled
        pooled = nn.Dropout(self.dropout_rate, deterministic=not train)(pooled)
        out["logits"] = nn.Dense(self.num_classes, dtype=jnp.float32, name="fc")(pooled)
        return out
