"""Gaussian-mixture negative log-likelihoods for the VT-ADL density head.

The head is a mixture density network (Bishop, "Mixture Density Networks", 1994): for
every patch embedding a network outputs mixture logits, component means and scales, and
the loss is the negative log-likelihood of the embedding itself under that mixture,

    NLL(z) = -logsumexp_k [ log softmax(logits)_k + log N(z; mu_k, Sigma_k) ].

Everything is computed in log space with the full Gaussian constant (D/2 log 2 pi).

Memory. With ``k_chunk`` the K components are visited in chunks of ``k_chunk`` inside a
``lax.scan`` that carries a running (max, sum) logsumexp; each chunk is cut from the
inputs with a clamped ``dynamic_slice`` (the last chunk overlaps the previous one and its
already-counted components are masked to -inf), so nothing of size (..., K, D) is copied
or padded, and the chunk body is wrapped in ``jax.checkpoint`` so the backward pass
recomputes a chunk instead of storing every chunk's residuals. When ``means``/``scales``
are inputs, XLA (CPU) already fuses the unchunked reduction, so the chunked form mainly
matters where they are *computed*: ``mixture_nll_from_head`` builds each chunk's means
and scales from the head's weights inside the scan, so the (..., K, D) tensors
(B * N * K * D numbers, e.g. 64 * 4096 * 512 = 134M) are never materialised.
"""
from __future__ import annotations

import functools
import math
from typing import Callable, Optional

import jax
import jax.numpy as jnp
from jax import lax
from jax.scipy.linalg import solve_triangular

Array = jax.Array
_LOG_2PI = math.log(2.0 * math.pi)


# ----------------------------------------------------------------------------- checks
def _is_concrete(x) -> bool:
    return not isinstance(x, jax.core.Tracer)


def _check_k_chunk(k_chunk) -> None:
    if k_chunk is None:
        return
    if isinstance(k_chunk, bool) or not isinstance(k_chunk, int) or k_chunk < 1:
        raise ValueError(f"k_chunk must be None or a positive int, got {k_chunk!r}")


def _batch_shape(**shapes: tuple) -> tuple:
    try:
        return jnp.broadcast_shapes(*shapes.values())
    except ValueError:
        desc = ", ".join(f"{k}={v}" for k, v in shapes.items())
        raise ValueError(f"leading (batch) shapes do not broadcast: {desc}") from None


def _check_mixture_args(z, logits, means) -> tuple[int, int, tuple]:
    """Validate z (..., D), logits (..., K), means (..., K, D); return (K, D, batch)."""
    if z.ndim < 1:
        raise ValueError(f"z must have shape (..., D), got {z.shape}")
    if logits.ndim < 1:
        raise ValueError(f"logits must have shape (..., K), got {logits.shape}")
    d, k = z.shape[-1], logits.shape[-1]
    if means.ndim < 2 or means.shape[-2:] != (k, d):
        raise ValueError(f"means must have shape (..., K={k}, D={d}), got {means.shape}")
    batch = _batch_shape(z=z.shape[:-1], logits=logits.shape[:-1], means=means.shape[:-2])
    return k, d, batch


def _check_positive(name: str, x) -> None:
    if _is_concrete(x) and bool(jnp.any(jnp.asarray(x) <= 0)):
        raise ValueError(f"{name} must be strictly positive")


# ------------------------------------------------------------------------- log terms
def _diag_log_terms(z: Array, log_w: Array, means: Array, scales: Array) -> Array:
    """log w_k + log N(z; mu_k, diag(s_k^2)); z (..., D), log_w (..., k), means (..., k, D)."""
    r = (z[..., None, :] - means) / scales
    return (log_w - 0.5 * jnp.sum(r * r, axis=-1) - jnp.sum(jnp.log(scales), axis=-1)
            - 0.5 * z.shape[-1] * _LOG_2PI)


def _full_log_terms(z: Array, log_w: Array, means: Array, chol: Array) -> Array:
    """log w_k + log N(z; mu_k, L_k L_k^T); chol (..., k, D, D) lower-triangular."""
    diff = z[..., None, :] - means
    y = solve_triangular(chol, diff[..., None], lower=True)[..., 0]
    logdet = jnp.sum(jnp.log(jnp.abs(jnp.diagonal(chol, axis1=-2, axis2=-1))), axis=-1)
    return log_w - 0.5 * jnp.sum(y * y, axis=-1) - logdet - 0.5 * z.shape[-1] * _LOG_2PI


def _varying_like(x: Array, like) -> Array:
    """``x`` typed as device-varying over the manual mesh axes ``like`` varies over.

    Inside ``shard_map`` a constant is device-invariant; a ``scan`` carry initialised
    with constants must be cast to the (varying) type its body returns. Outside
    ``shard_map`` (no manual axes) this returns ``x`` unchanged.
    """
    manual = getattr(like, "manual_axis_type", None)
    axes = tuple(sorted(getattr(manual, "varying", ()) or ()))
    return lax.pcast(x, axes, to="varying") if axes else x


def _chunked_logsumexp(chunk_terms: Callable[[Array, int], Array], k: int, k_chunk: int) -> Array:
    """logsumexp over K of ``chunk_terms(start, k_chunk) -> (*batch, k_chunk)``.

    Chunk i starts at min(i * k_chunk, K - k_chunk); components below i * k_chunk were
    counted by the previous chunk and are masked to -inf. The carry is the running
    (max, sum of exp(t - max)); the max is held out of the gradient (the result does not
    depend on it mathematically), so d lse / d t = exp(t - lse) exactly. The carry's
    initial constants take the manual-axis type of the chunk terms (``_varying_like``),
    so the scan also traces inside ``shard_map``.
    """
    num_chunks = -(-k // k_chunk)
    offsets = jnp.arange(k_chunk)
    out = jax.eval_shape(lambda: chunk_terms(0, k_chunk))  # shape, dtype, manual-axis type

    def body(carry, i):
        m, s = carry
        start = jnp.minimum(i * k_chunk, k - k_chunk)
        t = chunk_terms(start, k_chunk)
        t = jnp.where(start + offsets >= i * k_chunk, t, -jnp.inf)
        m_new = lax.stop_gradient(jnp.maximum(m, jnp.max(t, axis=-1)))
        m_ref = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
        s = s * jnp.exp(m - m_ref) + jnp.sum(jnp.exp(t - m_ref[..., None]), axis=-1)
        return (m_new, s), None

    batch = out.shape[:-1]
    init = (_varying_like(jnp.full(batch, -jnp.inf, out.dtype), out),
            _varying_like(jnp.zeros(batch, out.dtype), out))
    (m, s), _ = lax.scan(jax.checkpoint(body), init, jnp.arange(num_chunks))
    return m + jnp.log(s)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def low_precision_matmul(a: Array, b: Array, dtype) -> Array:
    """a (N, H) @ b (H, M) with both operands rounded to ``dtype`` (e.g. bfloat16) and the
    products accumulated and returned in ``result_type(a, b)`` (float32 for float32
    inputs); the same in the backward pass, whose cotangent is rounded to ``dtype`` too
    (mixed precision: Micikevicius et al. 2018). Plain autodiff of such a product would
    run the two backward matmuls on float32 operands."""
    return lax.dot(a.astype(dtype), b.astype(dtype),
                   preferred_element_type=jnp.result_type(a, b))


def _low_precision_matmul_fwd(a, b, dtype):
    al, bl = a.astype(dtype), b.astype(dtype)
    # Zero-size arrays carry the operands' dtypes to the backward pass.
    tags = (jnp.zeros((0,), a.dtype), jnp.zeros((0,), b.dtype))
    return lax.dot(al, bl, preferred_element_type=jnp.result_type(a, b)), (al, bl, tags)


def _low_precision_matmul_bwd(dtype, res, g):
    al, bl, (ta, tb) = res
    gl = g.astype(dtype)
    da = lax.dot(gl, bl.T, preferred_element_type=ta.dtype)
    db = lax.dot(al.T, gl, preferred_element_type=tb.dtype)
    return da, db


low_precision_matmul.defvjp(_low_precision_matmul_fwd, _low_precision_matmul_bwd)


def _slice_k(x: Array, start, size: int, axis: int) -> Array:
    return lax.dynamic_slice_in_dim(x, start, size, axis=x.ndim + axis)


# ------------------------------------------------------------------------ public API
def mixture_nll(z: Array, logits: Array, means: Array, scales: Array, *,
                k_chunk: Optional[int] = None) -> Array:
    """NLL of z under a diagonal Gaussian mixture (Bishop 1994), in log space.

    -log sum_k softmax(logits)_k N(z; mu_k, diag(scales_k^2)), with the full constant.

    Args:
      z: (..., D) points.
      logits: (..., K) unnormalised mixture log-weights.
      means: (..., K, D) component means.
      scales: (..., K, D) component standard deviations (> 0).
      k_chunk: None (all K at once) or a chunk size; see the module docstring.
    Returns:
      (...) negative log-likelihoods (leading shapes broadcast).
    """
    _check_k_chunk(k_chunk)
    if scales.shape != means.shape:
        raise ValueError(f"scales must have the shape of means {means.shape}, got {scales.shape}")
    k, _, _ = _check_mixture_args(z, logits, means)
    _check_positive("scales", scales)
    log_w = jax.nn.log_softmax(logits, axis=-1)
    if k_chunk is None or k_chunk >= k:
        return -jax.nn.logsumexp(_diag_log_terms(z, log_w, means, scales), axis=-1)

    def terms(start, size):
        return _diag_log_terms(z, _slice_k(log_w, start, size, -1),
                               _slice_k(means, start, size, -2), _slice_k(scales, start, size, -2))

    return -_chunked_logsumexp(terms, k, k_chunk)


def mixture_nll_from_head(z: Array, h: Array, w_logits: Array, w_means: Array,
                          w_scales: Array, *, b_logits: Optional[Array] = None,
                          b_means: Optional[Array] = None, b_scales: Optional[Array] = None,
                          k_chunk: Optional[int] = None,
                          scale_fn: Callable[[Array], Array] = jax.nn.softplus,
                          min_scale: float = 0.0, matmul_dtype=None) -> Array:
    """Diagonal mixture NLL whose parameters are linear maps of head features ``h``.

    logits = h W_l + b_l; means = h W_mu + b_mu; scales = scale_fn(h W_s + b_s) + min_scale.
    With ``k_chunk`` each chunk's means/scales are computed inside the scan, so peak
    memory is O(batch * k_chunk * D) instead of O(batch * K * D). Equal to
    ``mixture_nll`` on the materialised parameters. A Flax ``Dense(K * D)`` kernel
    (H, K * D) reshapes to (H, K, D) without a copy.

    Args:
      z: (..., D) points (the target of the density, e.g. noisy patch embeddings).
      h: (..., H) head input features (leading shape broadcasts with z's).
      w_logits: (H, K); w_means, w_scales: (H, K, D).
      b_logits: (K,) or None; b_means, b_scales: (K, D) or None.
      k_chunk: None or a positive chunk size over K.
      scale_fn: positive activation for the scales (softplus as in the MDN head).
      min_scale: added to the scales (>= 0), a floor for numerical safety.
      matmul_dtype: None (the inputs' dtype), or a narrower dtype (bfloat16) in which
        the three linear maps multiply; they accumulate and return in the inputs' dtype
        (``preferred_element_type``), and everything after them (biases, softplus,
        log-densities, logsumexp) stays in it. Mixed precision without rounding the
        maps' outputs to bfloat16.
    Returns:
      (...) negative log-likelihoods.
    """
    _check_k_chunk(k_chunk)
    if h.ndim < 1 or z.ndim < 1:
        raise ValueError(f"h (..., H) and z (..., D) need rank >= 1, got {h.shape}, {z.shape}")
    hdim, d = h.shape[-1], z.shape[-1]
    if w_logits.ndim != 2 or w_logits.shape[0] != hdim:
        raise ValueError(f"w_logits must have shape (H={hdim}, K), got {w_logits.shape}")
    k = w_logits.shape[1]
    for name, w in (("w_means", w_means), ("w_scales", w_scales)):
        if w.shape != (hdim, k, d):
            raise ValueError(f"{name} must have shape (H={hdim}, K={k}, D={d}), got {w.shape}")
    for name, b, shape in (("b_logits", b_logits, (k,)), ("b_means", b_means, (k, d)),
                           ("b_scales", b_scales, (k, d))):
        if b is not None and b.shape != shape:
            raise ValueError(f"{name} must have shape {shape} or be None, got {b.shape}")
    if min_scale < 0:
        raise ValueError(f"min_scale must be >= 0, got {min_scale}")
    _batch_shape(z=z.shape[:-1], h=h.shape[:-1])  # leading shapes must broadcast

    def linear(w):  # h (..., H) x w (H, ...) -> (..., ...)
        if matmul_dtype is None:
            return jnp.tensordot(h, w, axes=1)
        flat = low_precision_matmul(h.reshape(-1, hdim), w.reshape(hdim, -1), matmul_dtype)
        return flat.reshape(*h.shape[:-1], *w.shape[1:])

    logits = linear(w_logits) + (0.0 if b_logits is None else b_logits)
    log_w = jax.nn.log_softmax(logits, axis=-1)

    def params(start, size):
        mu = linear(_slice_k(w_means, start, size, -2))
        pre = linear(_slice_k(w_scales, start, size, -2))
        if b_means is not None:
            mu = mu + _slice_k(b_means, start, size, -2)
        if b_scales is not None:
            pre = pre + _slice_k(b_scales, start, size, -2)
        return mu, scale_fn(pre) + min_scale

    if k_chunk is None or k_chunk >= k:
        return -jax.nn.logsumexp(_diag_log_terms(z, log_w, *params(0, k)), axis=-1)

    def terms(start, size):
        return _diag_log_terms(z, _slice_k(log_w, start, size, -1), *params(start, size))

    return -_chunked_logsumexp(terms, k, k_chunk)


def mixture_nll_full_cov(z: Array, logits: Array, means: Array, chol: Array, *,
                         k_chunk: Optional[int] = None) -> Array:
    """NLL of z under a full-covariance Gaussian mixture, Sigma_k = L_k L_k^T.

    Only the lower triangle of ``chol`` is read; log det Sigma_k = 2 sum log|diag L_k|.
    Intended for small D (a triangular solve per point and component).

    Args:
      z: (..., D); logits: (..., K); means: (..., K, D);
      chol: (..., K, D, D) lower-triangular Cholesky factors with non-zero diagonal.
      k_chunk: None or a positive chunk size over K.
    Returns:
      (...) negative log-likelihoods.
    """
    _check_k_chunk(k_chunk)
    k, d, batch = _check_mixture_args(z, logits, means)
    if chol.ndim < 3 or chol.shape[-3:] != (k, d, d):
        raise ValueError(f"chol must have shape (..., K={k}, D={d}, D={d}), got {chol.shape}")
    _batch_shape(batch=batch, chol=chol.shape[:-3])  # leading shapes must broadcast
    if _is_concrete(chol) and bool(jnp.any(jnp.diagonal(jnp.asarray(chol), 0, -2, -1) == 0)):
        raise ValueError("chol must have a non-zero diagonal (positive for a Cholesky factor)")
    log_w = jax.nn.log_softmax(logits, axis=-1)
    if k_chunk is None or k_chunk >= k:
        return -jax.nn.logsumexp(_full_log_terms(z, log_w, means, chol), axis=-1)

    def terms(start, size):
        return _full_log_terms(z, _slice_k(log_w, start, size, -1),
                               _slice_k(means, start, size, -2), _slice_k(chol, start, size, -3))

    return -_chunked_logsumexp(terms, k, k_chunk)


def vtadl_code_mdn_loss(z: Array, logits: Array, means: Array, softplus_out: Array, *,
                        reduction: str = "mean") -> Array:
    """The density loss exactly as the official VT-ADL code computes it (option "vtadl_code").

    Per point (patch), with w = softmax(logits) and v = softplus_out used as a LOG-variance:

        loss = sum_k w_k * 0.5 * ( log(2 pi) + sum_d [ v_kd + (z_d - mu_kd)^2 exp(-v_kd) ] )

    Differences from the paper's mixture NLL (``mixture_nll``):
      * the head's softplus output is a log-variance (variance = exp(softplus(.)) >= 1, so
        every component is at least as wide as the unit Gaussian);
      * the constant is 0.5 log 2 pi once, not D/2 log 2 pi;
      * it is sum_k w_k (-log N_k), Jensen's upper bound on -log sum_k w_k N_k (with the
        code's constant), not the mixture NLL: it pushes the weight onto the single best
        component instead of fitting a mixture.
    With reduction="mean" (training), the loss is summed over patches and averaged over
    the batch; reduction="none" returns the per-patch values (the code's test-time map).
    Layout: the code views its Linear output of size D*K as (D, K) (index d*K + k); here
    means/softplus_out are (..., K, D) - a torch weight (D*K, H) maps to (H, K, D) by
    reshape(D, K, H).transpose(2, 1, 0). The code's head also clamps its *input* at
    min=eps (not done here: that belongs to the head); the loss uses the unclamped z.

    Args:
      z: (B, N, D) patch embeddings for "mean"; any (..., D) for "none".
      logits: (..., K); means, softplus_out: (..., K, D).
      reduction: "mean" -> () ; "none" -> (...).
    """
    if reduction not in ("mean", "none"):
        raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
    if softplus_out.shape != means.shape:
        raise ValueError(f"softplus_out must have the shape of means {means.shape}, "
                         f"got {softplus_out.shape}")
    _check_mixture_args(z, logits, means)
    w = jax.nn.softmax(logits, axis=-1)
    sq = (z[..., None, :] - means) ** 2
    neg_log_n = 0.5 * (_LOG_2PI + jnp.sum(softplus_out + sq * jnp.exp(-softplus_out), -1))
    per_patch = jnp.sum(w * neg_log_n, axis=-1)
    if reduction == "none":
        return per_patch
    if per_patch.ndim != 2:
        raise ValueError(f"reduction='mean' needs z of shape (B, N, D), got {z.shape}")
    return jnp.mean(jnp.sum(per_patch, axis=1))
