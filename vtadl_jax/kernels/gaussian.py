"""Per-position Gaussians for patch features: streaming fit, Cholesky, Mahalanobis.

Fitting keeps, per grid position, the count, the mean and the matrix of centred sums of
squares m2 = sum_i (x_i - mean)(x_i - mean)^T (memory O(P * C^2), independent of the
number of images). Batches and partial results are combined with the pairwise update of
Chan, Golub & LeVeque ("Updating formulae and a pairwise algorithm for computing sample
variances", 1979):

    n = n_a + n_b,  delta = mean_b - mean_a,  mean = mean_a + delta * n_b / n,
    m2 = m2_a + m2_b + (n_a n_b / n) delta delta^T.

Each batch's own statistics are computed two-pass (centred on the batch mean), so no
large sums of raw squares are formed: features with a large common offset (e.g.
1e3 + N(0, 1)) keep float32 accuracy, where the naive sum(x x^T)/n - mean mean^T loses
every significant digit. In float64 the result equals np.cov to rounding.

Scoring: Sigma = L L^T once; M(x) = |L^-1 (x - mu)| by a batched triangular solve, or by
a precomputed whitening matrix W = L^-1 and one einsum.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
from jax import lax
from jax.scipy.linalg import solve_triangular

Array = jax.Array


class PatchStats(NamedTuple):
    """Streaming Gaussian statistics (a pytree).

    count: () number of vectors seen per position (same for every position).
    mean: (P, C) running mean.
    m2: (P, C, C) centred sums of outer products, sum_i (x_i - mean)(x_i - mean)^T.
    """

    count: Array
    mean: Array
    m2: Array


def _is_concrete(x) -> bool:
    return not isinstance(x, jax.core.Tracer)


def _check_stats(stats: PatchStats, name: str = "stats") -> tuple[int, int]:
    if stats.mean.ndim != 2 or stats.m2.shape != stats.mean.shape + stats.mean.shape[-1:] \
            or jnp.shape(stats.count) != ():
        raise ValueError(f"{name} must have count (), mean (P, C), m2 (P, C, C); got "
                         f"{jnp.shape(stats.count)}, {stats.mean.shape}, {stats.m2.shape}")
    return stats.mean.shape


def init(num_positions: int, channels: int, dtype=None) -> PatchStats:
    """Empty statistics for ``num_positions`` positions of ``channels`` features.

    dtype: None -> float64 when jax_enable_x64 is on, else float32.
    """
    if int(num_positions) < 1 or int(channels) < 1:
        raise ValueError(f"num_positions and channels must be >= 1, got "
                         f"{num_positions}, {channels}")
    dtype = jnp.zeros((), dtype=dtype if dtype is not None else float).dtype
    return PatchStats(jnp.zeros((), dtype), jnp.zeros((num_positions, channels), dtype),
                      jnp.zeros((num_positions, channels, channels), dtype))


def batch_stats(feats: Array, dtype=None) -> PatchStats:
    """Statistics of one batch, two-pass: feats (B, P, C) -> PatchStats with count B."""
    if feats.ndim != 3:
        raise ValueError(f"feats must have shape (B, P, C), got {feats.shape}")
    x = feats.astype(dtype) if dtype is not None else feats
    mean = jnp.mean(x, axis=0)
    d = x - mean
    m2 = jnp.einsum("bpc,bpd->pcd", d, d, precision=lax.Precision.HIGHEST)
    return PatchStats(jnp.asarray(x.shape[0], x.dtype), mean, m2)


def merge(a: PatchStats, b: PatchStats) -> PatchStats:
    """Combine two sets of statistics (Chan, Golub & LeVeque 1979). Either may be empty."""
    if _check_stats(a, "a") != _check_stats(b, "b"):
        raise ValueError(f"a and b must have the same (P, C), got {a.mean.shape}, {b.mean.shape}")
    n = a.count + b.count
    frac_b = jnp.where(n > 0, b.count / jnp.where(n > 0, n, 1), 0)
    delta = b.mean - a.mean
    mean = a.mean + delta * frac_b
    m2 = a.m2 + b.m2 + (a.count * frac_b) * delta[:, :, None] * delta[:, None, :]
    return PatchStats(n, mean, m2)


def update(stats: PatchStats, feats: Array) -> PatchStats:
    """Fold a batch feats (B, P, C) into ``stats`` (P, C); feats are cast to its dtype."""
    p, c = _check_stats(stats)
    if feats.ndim != 3 or feats.shape[1:] != (p, c):
        raise ValueError(f"feats must have shape (B, P={p}, C={c}), got {feats.shape}")
    return merge(stats, batch_stats(feats, stats.mean.dtype))


def merge_across(stats: PatchStats, axis_name) -> PatchStats:
    """Combine the per-device statistics over a named device axis (shard_map / pmap).

    n = psum(n_i); mean = psum(n_i mean_i) / n;
    m2 = psum(m2_i + n_i (mean_i - mean)(mean_i - mean)^T)  (the k-way Chan et al. form).
    """
    _check_stats(stats)
    n = lax.psum(stats.count, axis_name)
    safe_n = jnp.where(n > 0, n, 1)
    mean = lax.psum(stats.count * stats.mean, axis_name) / safe_n
    delta = stats.mean - mean
    m2 = lax.psum(stats.m2 + stats.count * delta[:, :, None] * delta[:, None, :], axis_name)
    return PatchStats(n, mean, m2)


def finalize(stats: PatchStats, eps: float = 0.01) -> tuple[Array, Array]:
    """Mean (P, C) and unbiased covariance m2 / (n - 1) + eps I (P, C, C), symmetrised.

    Raises ValueError when the count is concrete and < 2; under jit such a count gives NaN.
    """
    p, c = _check_stats(stats)
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    if _is_concrete(stats.count) and float(stats.count) < 2:
        raise ValueError(f"finalize needs stats.count >= 2, got {float(stats.count)}")
    cov = stats.m2 / (stats.count - 1)
    cov = 0.5 * (cov + jnp.swapaxes(cov, -1, -2)) + eps * jnp.eye(c, dtype=cov.dtype)
    cov = jnp.where(stats.count >= 2, cov, jnp.nan)
    return stats.mean, cov


def cholesky_factor(cov: Array) -> Array:
    """Lower Cholesky factors L with cov = L L^T; cov (P, C, C) -> (P, C, C)."""
    if cov.ndim != 3 or cov.shape[1] != cov.shape[2]:
        raise ValueError(f"cov must have shape (P, C, C), got {cov.shape}")
    return jnp.linalg.cholesky(cov)


def _check_scoring(feats: Array, mean: Array, mat: Array, name: str) -> None:
    if mean.ndim != 2:
        raise ValueError(f"mean must have shape (P, C), got {mean.shape}")
    p, c = mean.shape
    if feats.ndim != 3 or feats.shape[1:] != (p, c):
        raise ValueError(f"feats must have shape (B, P={p}, C={c}), got {feats.shape}")
    if mat.shape != (p, c, c):
        raise ValueError(f"{name} must have shape (P={p}, C={c}, C={c}), got {mat.shape}")


def mahalanobis(feats: Array, mean: Array, chol: Array) -> Array:
    """Mahalanobis distances sqrt((x - mu)^T Sigma^-1 (x - mu)) per position.

    One triangular solve per position (vmapped over P) with all B vectors as right-hand
    sides: y = L_p^-1 [x_1 - mu_p, ..., x_B - mu_p].

    Args:
      feats: (B, P, C); mean: (P, C); chol: (P, C, C) lower Cholesky factors of Sigma.
    Returns:
      (B, P) distances.
    """
    _check_scoring(feats, mean, chol, "chol")
    rhs = jnp.transpose(feats - mean, (1, 2, 0))  # (P, C, B)
    y = jax.vmap(lambda l, b: solve_triangular(l, b, lower=True))(chol, rhs)
    return jnp.sqrt(jnp.sum(y * y, axis=1)).T


def whitening_matrix(chol: Array) -> Array:
    """W = L^-1 per position, (P, C, C) -> (P, C, C), so that |W (x - mu)| is the distance."""
    if chol.ndim != 3 or chol.shape[1] != chol.shape[2]:
        raise ValueError(f"chol must have shape (P, C, C), got {chol.shape}")
    eye = jnp.broadcast_to(jnp.eye(chol.shape[-1], dtype=chol.dtype), chol.shape)
    return solve_triangular(chol, eye, lower=True)


def mahalanobis_whitened(feats: Array, mean: Array, whiten: Array,
                         precision: Optional[lax.Precision] = lax.Precision.HIGHEST) -> Array:
    """Mahalanobis distances with a precomputed W = L^-1: |W_p (x - mu_p)|, one einsum.

    Args:
      feats: (B, P, C); mean: (P, C); whiten: (P, C, C) from ``whitening_matrix``.
      precision: matmul precision (HIGHEST keeps float32 on accelerators exact-ish).
    Returns:
      (B, P) distances.
    """
    _check_scoring(feats, mean, whiten, "whiten")
    y = jnp.einsum("pcd,bpd->bpc", whiten, feats - mean, precision=precision)
    return jnp.sqrt(jnp.sum(y * y, axis=-1))
