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

The gradients are those of that stride-1 convolution, a gather and a reshape: again no
zero-dilated operand. How reverse mode computes them is ``grad_impl``; all give the
same values up to float rounding, and only "conv" also allows forward mode:

* "conv": autodiff's (the transposed convolutions XLA derives).
* "gemm": input gradient autodiff's; kernel gradient an explicit im2col GEMM,
  dW[(a, b, c), d] = sum over (n, i, j) of x[n, i + a, j + b, c] g[n, i, j, d],
  accumulated over bands of output rows whose patch matrix stays in cache
  (:func:`kernel_grad_gemm`). XLA:CPU runs the kernel gradient of a convolution with
  few images and a large map as a convolution whose "kernel" is the whole output map.
* "blocked": both gradients of the same convolution computed on 2x2 output blocks
  (space-to-depth of the input, a ceil((k + 1) / 2)-tap kernel holding every
  (input phase, output phase) pair, depth-to-space of the output), which gives
  XLA:CPU 4x wider channel dimensions for thin layers (few output channels).
* "auto" (default): on the CPU backend "gemm" for >= 32 phase channels, "blocked" for
  stride 1 with < 8 output channels, else "conv"; "conv" on other backends.

The forward values are computed by ``fwd_impl``: "conv" (the phase convolution as is)
or "wblocked" (:func:`conv_valid_wblocked`: the same convolution 4 output columns at a
time, as one width-strided convolution with 4x the output channels); "auto" (default)
takes "wblocked" on the CPU backend for layers with < 16 phase channels unless
``grad_impl="conv"`` was asked for (which keeps plain autodiff, forward mode included).

Measured on the project's 2-core CPU (VT-ADL decoder at 512 px, batch 2, quiet
machine): 245 -> 497 layer (64 phase channels) kernel gradient 416 ms by "conv" vs
131-143 ms by "gemm"; 502 -> 512 layer (3 channels) input + kernel gradient 269 ms by
"conv" vs 75 ms by "blocked"; the 497 -> 502 layer (8 channels) is fastest with "conv"
(167 ms kernel gradient; "gemm" 215, "blocked" 466). Forward of those two thin layers:
163 -> 56 ms and 87 -> 41 ms by "wblocked" (2x2 "blocked" forward: 295 ms).
"""
from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
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


GRAD_IMPLS = ("auto", "conv", "gemm", "blocked")
FWD_IMPLS = ("auto", "conv", "wblocked")
# Patch matrix of one band of output rows, in bytes: small enough to stay in cache.
_BAND_BYTES = 4 << 20
_GEMM_MIN_CHANNELS = 32   # "auto": phase channels from which "gemm" wins on XLA:CPU
_BLOCKED_MAX_CHANNELS = 8  # "auto": stride-1 output channels below which "blocked" wins
_WBLOCKED_MAX_CHANNELS = 16  # "auto": phase channels below which "wblocked" wins


def _conv_valid(x: jax.Array, w: jax.Array) -> jax.Array:
    return lax.conv_general_dilated(x, w, window_strides=(1, 1), padding="VALID",
                                    dimension_numbers=("NHWC", "HWIO", "NHWC"))


def kernel_grad_gemm(x: jax.Array, g: jax.Array, kernel_hw: tuple[int, int]) -> jax.Array:
    """Kernel gradient of the VALID stride-1 NHWC/HWIO convolution of x, as a GEMM.

    x: (B, H, W, C); g: (B, H - kh + 1, W - kw + 1, D), the output's cotangent.
    Returns (kh, kw, C, D) in x's dtype, accumulated in float32 (at least) over bands of
    output rows: for each band the patch matrix (B * rows * Wout, kh * kw * C) is built
    from kh * kw shifted slices and multiplied by the band's cotangent.
    """
    (kh, kw), (b, mh, mw, d), c = kernel_hw, g.shape, x.shape[-1]
    if x.shape[1] != mh + kh - 1 or x.shape[2] != mw + kw - 1 or x.shape[0] != b:
        raise ValueError(f"x {x.shape} and g {g.shape} do not fit a {kernel_hw} kernel")
    row_bytes = b * mw * kh * kw * c * x.dtype.itemsize
    rows = int(max(1, min(mh, _BAND_BYTES // max(row_bytes, 1))))
    bands = -(-mh // rows)
    extra = bands * rows - mh  # zero rows of g (and x) past the end contribute nothing
    acc_dtype = jnp.promote_types(x.dtype, jnp.float32)  # float32, or float64 under x64
    xp = jnp.pad(x, ((0, 0), (0, extra), (0, 0), (0, 0)))
    gp = jnp.pad(g, ((0, 0), (0, extra), (0, 0), (0, 0)))

    def band(k):
        xb = lax.dynamic_slice_in_dim(xp, k * rows, rows + kh - 1, axis=1)
        gb = lax.dynamic_slice_in_dim(gp, k * rows, rows, axis=1)
        patches = jnp.concatenate([xb[:, u:u + rows, v:v + mw] for u in range(kh)
                                   for v in range(kw)], axis=-1)
        return jnp.einsum("nijk,nijd->kd", patches, gb, preferred_element_type=acc_dtype)

    # The first band starts the sum (not zeros: inside shard_map the carry must vary
    # over the same mesh axes as the inputs).
    acc, _ = lax.scan(lambda a, k: (a + band(k), None), band(0), jnp.arange(1, bands))
    return acc.reshape(kh, kw, c, d).astype(x.dtype)


def _block_taps(k: int, b: int) -> tuple[np.ndarray, np.ndarray]:
    """Tap index k_idx[t, r_in, r_out] = b t + r_in - r_out and its validity, (T, b, b)."""
    taps = (b + k - 2) // b + 1
    idx = (np.arange(taps)[:, None, None] * b + np.arange(b)[None, :, None]
           - np.arange(b)[None, None, :])
    return idx, (idx >= 0) & (idx < k)


def conv_valid_blocked(x: jax.Array, w: jax.Array, block: int = 2) -> jax.Array:
    """The VALID stride-1 NHWC/HWIO convolution of x with w, on block x block outputs.

    With output o = b m + r and input i = b m' + r', y[o] = sum_a x[o + a] w[a] becomes
    Y[m, r] = sum_{t, r'} X[m + t, r'] w[b t + r' - r] (X the input in space-to-depth
    form): a stride-1 convolution with b^2 C input and b^2 D output channels and
    ceil((k + b - 1) / b) taps; depth-to-space and a crop give y.
    """
    n, h, wd, c = x.shape
    kh, kw, _, d = w.shape
    oh, ow = h - kh + 1, wd - kw + 1
    (ih, vh), (iw, vw) = _block_taps(kh, block), _block_taps(kw, block)
    th, tw = ih.shape[0], iw.shape[0]
    mh, mw = -(-oh // block), -(-ow // block)
    # rows/cols of x needed: (m + T - 1) b; pad (zeros feed only cropped outputs) or crop
    need_h, need_w = (mh + th - 1) * block, (mw + tw - 1) * block
    x = jnp.pad(x, ((0, 0), (0, max(need_h - h, 0)), (0, max(need_w - wd, 0)), (0, 0)))
    x = x[:, :need_h, :need_w]
    xs = x.reshape(n, need_h // block, block, need_w // block, block, c)
    xs = xs.transpose(0, 1, 3, 2, 4, 5).reshape(n, need_h // block, need_w // block,
                                               block * block * c)
    # kernel (th, tw, [r_in_h, r_in_w, c], [r_out_h, r_out_w, d])
    wb = jnp.take(w, jnp.asarray(np.clip(ih, 0, kh - 1)), axis=0)  # (th, b, b, kw, c, d)
    wb = jnp.where(jnp.asarray(vh)[:, :, :, None, None, None], wb, 0)
    wb = jnp.take(wb, jnp.asarray(np.clip(iw, 0, kw - 1)), axis=3)  # (th,b,b,tw,b,b,c,d)
    wb = jnp.where(jnp.asarray(vw)[None, None, None, :, :, :, None, None], wb, 0)
    # axes: th, rin_h, rout_h, tw, rin_w, rout_w, c, d
    wb = wb.transpose(0, 3, 1, 4, 6, 2, 5, 7).reshape(th, tw, block * block * c,
                                                     block * block * d)
    y = _conv_valid(xs, wb.astype(x.dtype))
    y = y.reshape(n, mh, mw, block, block, d).transpose(0, 1, 3, 2, 4, 5)
    return y.reshape(n, mh * block, mw * block, d)[:, :oh, :ow]


def conv_valid_wblocked(x: jax.Array, w: jax.Array, block: int = 4) -> jax.Array:
    """The VALID stride-1 NHWC/HWIO convolution of x with w, ``block`` outputs wide at a time.

    Output column o = b m + v (v < b) reads input columns b m + v + a (a < kw), i.e.
    columns b m + u of one (kw + b - 1)-wide window with u = v + a. So
    y[:, :, b m + v, d] = sum_{a_h, u, c} x[:, . + a_h, b m + u, c] T[a_h, u, c, (v, d)]
    with T[a_h, u, c, (v, d)] = w[a_h, u - v, c, d] (zero unless 0 <= u - v < kw): ONE
    convolution of width stride b with b times the output channels and a kernel
    b - 1 columns wider. It multiplies (kw + b - 1) / kw times as many terms as the plain
    convolution, but gives XLA:CPU's convolution b * D output channels instead of D,
    which is what thin layers need (VT-ADL decoder at 512 px, batch 2, this project's
    2-core CPU, b = 4: 8 -> 3 channels 11x11, 163 -> 56 ms; 16 -> 8 channels 6x6,
    87 -> 41 ms; b = 2, 3, 6, 8 were slower).
    """
    n, h, wd, c = x.shape
    kh, kw, _, d = w.shape
    oh, ow = h - kh + 1, wd - kw + 1
    blocks = -(-ow // block)
    span = block + kw - 1
    need = (blocks - 1) * block + span  # input columns read (zeros feed cropped outputs)
    x = jnp.pad(x, ((0, 0), (0, 0), (0, max(need - wd, 0)), (0, 0)))[:, :, :need]
    tap = np.arange(span)[:, None] - np.arange(block)[None, :]  # (u, v) -> a = u - v
    valid = (tap >= 0) & (tap < kw)
    t = jnp.take(w, jnp.asarray(np.clip(tap, 0, kw - 1)), axis=1)  # (kh, span, b, c, d)
    t = jnp.where(jnp.asarray(valid)[None, :, :, None, None], t, 0)
    t = t.transpose(0, 1, 3, 2, 4).reshape(kh, span, c, block * d).astype(x.dtype)
    y = lax.conv_general_dilated(x, t, window_strides=(1, block), padding="VALID",
                                 dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return y.reshape(n, oh, blocks * block, d)[:, :, :ow]


def _grad_conv(x, w, g):
    return jax.vjp(_conv_valid, x, w)[1](g)


def _grad_gemm(x, w, g):
    dx = jax.vjp(lambda a: _conv_valid(a, w), x)[1](g)[0]
    return dx, kernel_grad_gemm(x, g.astype(x.dtype), w.shape[:2]).astype(w.dtype)


def _grad_blocked(x, w, g):
    return jax.vjp(conv_valid_blocked, x, w)[1](g)


_FORWARDS = {"conv": _conv_valid, "wblocked": conv_valid_wblocked}
_GRADIENTS = {"conv": _grad_conv, "gemm": _grad_gemm, "blocked": _grad_blocked}


@functools.lru_cache(maxsize=None)
def _valid_conv(fwd_impl: str, grad_impl: str):
    """The VALID stride-1 convolution computed by ``fwd_impl`` whose reverse-mode
    gradients are computed by ``grad_impl`` (all forms give the same function); plain
    autodiff (forward mode included) for ("conv", "conv")."""
    if (fwd_impl, grad_impl) == ("conv", "conv"):
        return _conv_valid
    forward, gradients = _FORWARDS[fwd_impl], _GRADIENTS[grad_impl]

    @jax.custom_vjp
    def conv(x, w):
        return forward(x, w)

    def fwd(x, w):
        return forward(x, w), (x, w)

    def bwd(residuals, g):
        return gradients(*residuals, g)

    conv.defvjp(fwd, bwd)
    return conv


def _phase_conv(grad_impl: str, fwd_impl: str, stride: tuple[int, int], out_channels: int):
    """The stride-1 VALID convolution for ``grad_impl`` and ``fwd_impl`` (module doc)."""
    if grad_impl not in GRAD_IMPLS:
        raise ValueError(f"grad_impl must be one of {GRAD_IMPLS}, got {grad_impl!r}")
    if fwd_impl not in FWD_IMPLS:
        raise ValueError(f"fwd_impl must be one of {FWD_IMPLS}, got {fwd_impl!r}")
    cpu = jax.default_backend() == "cpu"
    forward_mode = grad_impl == "conv"  # asked for plain autodiff: keep jvp working
    if grad_impl == "auto":
        if not cpu:
            grad_impl = "conv"
        elif stride[0] * stride[1] * out_channels >= _GEMM_MIN_CHANNELS:
            grad_impl = "gemm"
        elif stride == (1, 1) and out_channels < _BLOCKED_MAX_CHANNELS:
            grad_impl = "blocked"
        else:
            grad_impl = "conv"
    if fwd_impl == "auto":
        thin = stride[0] * stride[1] * out_channels < _WBLOCKED_MAX_CHANNELS
        fwd_impl = "wblocked" if cpu and thin and not forward_mode else "conv"
    return _valid_conv(fwd_impl, grad_impl)


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
                   output_padding: int | Sequence[int] = 0, *,
                   grad_impl: str = "auto", fwd_impl: str = "auto") -> jax.Array:
    """Transposed convolution with PyTorch ``conv_transpose2d`` semantics, NHWC.

    Args:
      x: (B, H, W, Cin), any float dtype; the computation runs in ``x.dtype``
        (the kernel is cast to it; XLA chooses the accumulation, as for any conv).
      kernel: (kh, kw, Cin, Cout): PyTorch's weight (Cin, Cout, kh, kw) transposed
        to (2, 3, 0, 1), with no spatial flip: y[i * s + a - p] += x[i] kernel[a].
      stride: s (int or (sh, sw)), >= 1.
      padding: p, 0 <= p <= k - 1 per axis.
      output_padding: q, 0 <= q < s per axis (extra rows/columns at the end).
      grad_impl: how reverse mode computes the gradients: "auto" (default), "conv",
        "gemm" or "blocked" (module docstring). Same values up to float rounding; only
        "conv" also supports forward mode (jax.jvp).
      fwd_impl: how the values are computed: "auto" (default), "conv" (the phase
        convolution as is) or "wblocked" (:func:`conv_valid_wblocked`, for thin layers
        on XLA:CPU); any form other than ("conv", "conv") is a custom VJP (reverse
        mode only).

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
    w = phase_kernel(kernel.astype(x.dtype), s)
    y = _phase_conv(grad_impl, fwd_impl, s, cout)(x, w)
    mh, mw = y.shape[1], y.shape[2]
    # depth-to-space: (B, Mh, Mw, sh, sw, Cout) -> (B, Mh * sh, Mw * sw, Cout)
    y = y.reshape(b, mh, mw, s[0], s[1], cout).transpose(0, 1, 3, 2, 4, 5)
    y = y.reshape(b, mh * s[0], mw * s[1], cout)
    (h0, w0), (ho, wo) = (plans[0]["start"], plans[1]["start"]), (plans[0]["out"],
                                                                  plans[1]["out"])
    return y[:, h0:h0 + ho, w0:w0 + wo, :]
