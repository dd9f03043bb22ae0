"""2-D transposed convolution as a sub-pixel (phase) decomposition: no zero multiplied.

Semantics of PyTorch ``ConvTranspose2d`` (bias excluded), per spatial axis with
stride s, padding p, output padding q and kernel w of side k:

    y[o] = sum_{i, a : o = i * s + a - p} x[i] w[a],   0 <= o < (L - 1) s - 2p + k + q.

The textbook implementation inserts s - 1 zeros between input pixels and runs a dense
convolution, so s^2 - 1 of every s^2 multiplications (2-D) multiply a zero. Writing the
uncropped output position as t = o + p = m s + r (phase r in [0, s)) and the kernel tap
as a = j s + r gives

    y_r[m] = sum_j x[m - j] w[j s + r],   j = 0 .. J - 1,  J = ceil(k / s),

an ordinary stride-1 convolution of the undilated input with the r-th phase of the
kernel (taps beyond k are zero). All s^2 phases (r_h, r_w) are computed by ONE
convolution with s^2 * Cout output channels; depth-to-space interleaves them and a
slice applies the padding / output padding (Shi et al. 2016, "Real-Time Single Image
and Video Super-Resolution Using an Efficient Sub-Pixel Convolutional Neural Network",
show the equivalence of sub-pixel convolution and transposed convolution). Only the
phase rows that reach the output are computed. Work: (J s / k)^2 of the exact count
(1 for k divisible by s; (10/7)^2 for k 7, s 5), instead of s^2.

The gradients are the autodiff gradients of that stride-1 convolution, a gather and a
reshape: again no zero-dilated operand.
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from jax import lax


def _pair(v: int | Sequence[int], name: str) -> tuple[int, int]:
    t = (int(v), int(v)) if isinstance(v, int) else tuple(int(u) for u in v)
    if len(t) != 2:
        raise ValueError(f"{name} must be an int or a pair, got {v!r}")
    return t


def conv_transpose_output_size(size: int, kernel: int, stride: int, padding: int,
                               output_padding: int = 0) -> int:
    """PyTorch ConvTranspose output side: (size - 1) * stride - 2 * padding + kernel + q."""
    return (size - 1) * stride - 2 * padding + kernel + output_padding


def _axis_plan(size: int, k: int, s: int, p: int, q: int) -> dict:
    """Per-axis phase-convolution geometry (pure integers)."""
    if s < 1 or k < 1:
        raise ValueError(f"stride ({s}) and kernel ({k}) must be >= 1")
    if not 0 <= p <= k - 1:
        raise ValueError(f"padding={p} must lie in [0, kernel-1={k - 1}]")
    if not 0 <= q < s:
        raise ValueError(f"output_padding={q} must lie in [0, stride-1={s - 1}]")
    out = conv_transpose_output_size(size, k, s, p, q)
    if out < 1:
        raise ValueError(f"empty output: size {size}, kernel {k}, stride {s}, padding {p}")
    taps = -(-k // s)  # J
    m0, m1 = p // s, (p + out - 1) // s  # phase rows that reach the output
    # Phase output m reads x[m - J + 1 .. m]: pad J - 1 - m0 before (>= 0) and m1 - size + 1
    # after (>= 0 since out + p >= (size - 1) s + 1); output rows m0 .. m1.
    return dict(taps=taps, pad=(taps - 1 - m0, m1 - size + 1), start=p - m0 * s, out=out)


def phase_kernel(kernel: jax.Array, stride: tuple[int, int]) -> jax.Array:
    """(kh, kw, Cin, Cout) -> (Jh, Jw, Cin, sh * sw * Cout), spatially flipped.

    Output channel (rh * sw + rw) * Cout + c of tap (Jh - 1 - jh, Jw - 1 - jw) holds
    kernel[jh * sh + rh, jw * sw + rw, :, c] (zero past the kernel's end), so that a
    cross-correlation (``lax.conv_general_dilated``) gives every phase at once.
    """
    kh, kw, cin, cout = kernel.shape
    (sh, sw) = stride
    jh, jw = -(-kh // sh), -(-kw // sw)
    w = jnp.pad(kernel, ((0, jh * sh - kh), (0, jw * sw - kw), (0, 0), (0, 0)))
    w = w.reshape(jh, sh, jw, sw, cin, cout).transpose(0, 2, 4, 1, 3, 5)
    return w.reshape(jh, jw, cin, sh * sw * cout)[::-1, ::-1]


def conv_transpose(x: jax.Array, kernel: jax.Array, stride: int | Sequence[int] = 1,
                   padding: int | Sequence[int] = 0,
                   output_padding: int | Sequence[int] = 0) -> jax.Array:
    """Transposed convolution with PyTorch ``conv_transpose2d`` semantics, NHWC.

    Args:
      x: (B, H, W, Cin), any float dtype; the computation runs in ``x.dtype``
        (the kernel is cast to it; XLA chooses the accumulation, as for any conv).
      kernel: (kh, kw, Cin, Cout): PyTorch's weight (Cin, Cout, kh, kw) transposed
        to (2, 3, 0, 1), with no spatial flip: y[i * s + a - p] += x[i] kernel[a].
      stride: s (int or (sh, sw)), >= 1.
      padding: p, 0 <= p <= k - 1 per axis.
      output_padding: q, 0 <= q < s per axis (extra rows/columns at the end).

    Returns:
      (B, H', W', Cout) with H' = (H - 1) sh - 2 ph + kh + qh (likewise W').
    """
    if x.ndim != 4 or kernel.ndim != 4 or kernel.shape[2] != x.shape[3]:
        raise ValueError(f"x (B, H, W, Cin) and kernel (kh, kw, Cin, Cout) expected, got "
                         f"{x.shape} and {kernel.shape}")
    s, p, q = _pair(stride, "stride"), _pair(padding, "padding"), _pair(output_padding,
                                                                          "output_padding")
    b, _, _, _ = x.shape
    cout = kernel.shape[3]
    plans = [_axis_plan(x.shape[1 + d], kernel.shape[d], s[d], p[d], q[d]) for d in (0, 1)]
    # Explicit zero padding + "VALID": XLA:CPU runs the kernel gradient of a padded
    # convolution about 20x slower than that of the same convolution of a padded input.
    x = jnp.pad(x, ((0, 0), plans[0]["pad"], plans[1]["pad"], (0, 0)))
    y = lax.conv_general_dilated(
        x, phase_kernel(kernel.astype(x.dtype), s), window_strides=(1, 1), padding="VALID",
        dimension_numbers=("NHWC", "HWIO", "NHWC"))
    mh, mw = y.shape[1], y.shape[2]
    # depth-to-space: (B, Mh, Mw, sh, sw, Cout) -> (B, Mh * sh, Mw * sw, Cout)
    y = y.reshape(b, mh, mw, s[0], s[1], cout).transpose(0, 1, 3, 2, 4, 5)
    y = y.reshape(b, mh * s[0], mw * s[1], cout)
    (h0, w0), (ho, wo) = (plans[0]["start"], plans[1]["start"]), (plans[0]["out"],
                                                                  plans[1]["out"])
    return y[:, h0:h0 + ho, w0:w0 + wo, :]
