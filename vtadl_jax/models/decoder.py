"""Decoders of VT-ADL: the authors' six transposed convolutions and a cheap small one.

``VTADLCodeDecoder`` is the decoder of the authors' code for Mishra et al. 2021
(VT-ADL): the 512-vector viewed as 8x8x8 and up-sampled to 512x512x3 by six
transposed convolutions (in->out, kernel, stride, padding):

    8->16 k3 s2 p1 (15); 16->32 k9 s3 p1 (49); 32->32 k7 s5 p1 (245);
    32->16 k9 s2 p0 (497); 16->8 k6 s1 p0 (502); 8->3 k11 s1 p0 (512)

with BatchNorm + ReLU between them and tanh at the end. ``SmallDecoder`` is a cheap
decoder for small images (MNIST, tests). Both take an optional ``bn_axis_name`` so that
BatchNorm statistics are averaged over a named device axis in data-parallel training,
and a compute ``dtype`` (default float32; None: the input's): activations and kernels
are cast to it before every transposed convolution, while BatchNorm keeps float32
parameters and statistics.

Differences from PyTorch BatchNorm, documented: Flax stores the biased batch variance
in the running statistics (PyTorch stores the unbiased one); momentum 0.1 in PyTorch
is ``momentum=0.9`` here; eps 1e-5 as PyTorch.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from vtadl_jax.kernels.conv_transpose import conv_transpose

# The authors' decoder, (out_channels, kernel, stride, padding) per layer; 8 input channels.
VTADL_CODE_LAYERS: tuple[tuple[int, int, int, int], ...] = (
    (16, 3, 2, 1), (32, 9, 3, 1), (32, 7, 5, 1), (16, 9, 2, 0), (8, 6, 1, 0), (3, 11, 1, 0))


def conv_transpose_size(size: int, kernel: int, stride: int, padding: int) -> int:
    """PyTorch ConvTranspose2d output size: (size - 1) * stride - 2 * padding + kernel."""
    return (size - 1) * stride - 2 * padding + kernel


def _torch_default_uniform(fan_in: int):
    """PyTorch's default ConvTranspose2d init: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / math.sqrt(fan_in)

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


class TorchConvTranspose(nn.Module):
    """2-D transposed convolution with PyTorch ``ConvTranspose2d`` semantics.

    Output side = (in - 1) * stride - 2 * padding + kernel + output_padding. The kernel
    is stored as (kh, kw, in, out), i.e. PyTorch's weight (in, out, kh, kw) transposed
    with no flip, so that y[i * s + a - p] += x[i] * w[a] (the scatter definition).
    Computed by ``kernels.conv_transpose`` (sub-pixel phases: no zero is multiplied).

    Attributes:
      features: output channels.
      kernel_size: square kernel side k.
      stride: s.
      padding: p (0 <= p <= k - 1).
      dtype: compute dtype (input, kernel and bias are cast to it); None: the input's.
      output_padding: q (0 <= q < s), extra rows/columns at the end.
      grad_impl: how ``kernels.conv_transpose`` computes the gradients ("auto": tuned
        per layer shape on XLA:CPU, autodiff elsewhere; "conv" for forward mode).
      fwd_impl: how it computes the values ("auto": width-blocked for thin layers on
        XLA:CPU, the phase convolution elsewhere).
    """

    features: int
    kernel_size: int
    stride: int = 1
    padding: int = 0
    dtype: Any = None
    output_padding: int = 0
    grad_impl: str = "auto"
    fwd_impl: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """x: (B, H, W, Cin) -> (B, H', W', features)."""
        k, s, p = self.kernel_size, self.stride, self.padding
        if not 0 <= p <= k - 1:
            raise ValueError(f"padding={p} must lie in [0, kernel_size-1={k - 1}]")
        cin = x.shape[-1]
        # PyTorch computes fan_in of a (in, out, kh, kw) weight from dim 1: out * k * k.
        init = _torch_default_uniform(self.features * k * k)
        kernel = self.param("kernel", init, (k, k, cin, self.features))
        bias = self.param("bias", init, (self.features,))
        dtype = self.dtype or x.dtype
        y = conv_transpose(x.astype(dtype), kernel.astype(dtype), s, p, self.output_padding,
                           grad_impl=self.grad_impl, fwd_impl=self.fwd_impl)
        return y + bias.astype(dtype)


def _batch_norm(train: bool, axis_name: str | None, name: str) -> nn.BatchNorm:
    return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                        axis_name=axis_name if train else None, name=name)


class VTADLCodeDecoder(nn.Module):
    """The authors' decoder: (B, 512) -> (B, 512, 512, 3) in [-1, 1].

    The vector is viewed as PyTorch's (8, 8, 8) channel-first grid, then moved to NHWC.
    """

    layers: Sequence[tuple[int, int, int, int]] = VTADL_CODE_LAYERS
    in_channels: int = 8
    grid: int = 8
    bn_axis_name: str | None = None
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, v: jax.Array, *, train: bool) -> jax.Array:
        b, length = v.shape
        if length != self.in_channels * self.grid**2:
            raise ValueError(
                f"v: length {length} != in_channels*grid^2 = {self.in_channels * self.grid**2}")
        x = v.reshape(b, self.in_channels, self.grid, self.grid).transpose(0, 2, 3, 1)
        for i, (cout, k, s, p) in enumerate(self.layers):
            x = TorchConvTranspose(cout, k, s, p, self.dtype, name=f"deconv{i}")(x)
            if i < len(self.layers) - 1:
                x = _batch_norm(train, self.bn_axis_name, f"bn{i}")(x)
                x = nn.relu(x)
        return jnp.tanh(x)


def decoder_output_size(layers: Sequence[tuple[int, int, int, int]], grid: int) -> int:
    """Spatial side after ``layers`` starting from ``grid``."""
    size = grid
    for _, k, s, p in layers:
        size = conv_transpose_size(size, k, s, p)
    return size


class SmallDecoder(nn.Module):
    """Cheap decoder for small images of any size (MNIST 28x28/32x32, tests).

    Dense -> (g, g, width) grid with g = ceil(side / 2^num_up) -> ``num_up`` x2
    transposed convolutions (k4 s2 p1, halving the width each time) with BatchNorm +
    ReLU -> 3x3 transposed convolution (k3 s1 p1) to ``channels`` -> centre crop to
    ``image_size`` -> tanh.
    """

    image_size: tuple[int, int]
    channels: int
    width: int = 64
    num_up: int = 2
    bn_axis_name: str | None = None
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, v: jax.Array, *, train: bool) -> jax.Array:
        """v: (B, L) -> (B, H, W, channels) in [-1, 1]."""
        h, w = self.image_size
        gh, gw = -(-h // 2**self.num_up), -(-w // 2**self.num_up)
        x = nn.Dense(gh * gw * self.width, dtype=self.dtype, name="dense")(v)
        x = x.reshape(v.shape[0], gh, gw, self.width)
        x = nn.relu(_batch_norm(train, self.bn_axis_name, "bn_dense")(x))
        width = self.width
        for i in range(self.num_up):
            width = max(width // 2, self.channels)
            x = TorchConvTranspose(width, 4, 2, 1, self.dtype, name=f"deconv{i}")(x)
            x = nn.relu(_batch_norm(train, self.bn_axis_name, f"bn{i}")(x))
        x = TorchConvTranspose(self.channels, 3, 1, 1, self.dtype, name="out")(x)
        top, left = (x.shape[1] - h) // 2, (x.shape[2] - w) // 2
        return jnp.tanh(x[:, top:top + h, left:left + w, :])
