"""Tests for vtadl_jax.kernels.gaussian against float64 NumPy references."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as PS

from vtadl_jax.kernels import gaussian as G


def _features(rng, n, p, c, offset=0.0):
    mix = rng.normal(size=(p, c, c)) / np.sqrt(c)
    x = np.einsum("pcd,npd->npc", mix, rng.normal(size=(n, p, c)))
    return x + offset + rng.normal(size=(p, c))


def _np_fit(x, eps):
    mean = x.mean(0)
    cov = np.stack([np.cov(x[:, i, :], rowvar=False, ddof=1) for i in range(x.shape[1])])
    return mean, cov + eps * np.eye(x.shape[2])


def _assert_stats_close(a, b, tol):
    for u, v in zip(a, b):
        np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=tol, atol=tol)


def test_fit_matches_numpy_float64(x64):
    x = _features(np.random.default_rng(0), 40, 6, 5, offset=3.0)
    stats = G.update(G.init(6, 5), jnp.asarray(x))
    assert stats.mean.dtype == jnp.float64 and float(stats.count) == 40
    mean, cov = G.finalize(stats, eps=0.01)
    ref_mean, ref_cov = _np_fit(x, 0.01)
    np.testing.assert_allclose(np.asarray(mean), ref_mean, rtol=1e-13, atol=1e-13)
    np.testing.assert_allclose(np.asarray(cov), ref_cov, rtol=1e-12, atol=1e-13)


def test_batches_merges_and_devices_agree(x64):
    p, c, n = 5, 4, 96
    x = jnp.asarray(_features(np.random.default_rng(1), n, p, c, offset=-2.0))
    one = G.update(G.init(p, c), x)

    # Many uneven batches through a jitted update.
    upd = jax.jit(G.update)
    many, start = G.init(p, c), 0
    for size in (7, 13, 1, 29, 2, 44):
        many, start = upd(many, x[start:start + size]), start + size
    assert start == n
    _assert_stats_close(many, one, 1e-10)

    # 8 unequal parts, merged pairwise as a tree.
    cuts = np.array([0, 3, 4, 20, 31, 50, 51, 70, 96])
    parts = [G.update(G.init(p, c), x[a:b]) for a, b in zip(cuts[:-1], cuts[1:])]
    while len(parts) > 1:
        parts = [G.merge(parts[i], parts[i + 1]) for i in range(0, len(parts), 2)]
    _assert_stats_close(parts[0], one, 1e-10)

    # 8 equal parts on the 8 host devices, combined with merge_across inside shard_map.
    devices = jax.devices()
    assert len(devices) >= 8
    mesh = jax.sharding.Mesh(np.array(devices[:8]), ("d",),
                             axis_types=(jax.sharding.AxisType.Auto,))

    @jax.jit
    @functools.partial(jax.shard_map, mesh=mesh, in_specs=PS("d"), out_specs=PS())
    def fit_sharded(xs):
        return G.merge_across(G.update(G.init(p, c), xs), "d")

    _assert_stats_close(fit_sharded(x), one, 1e-10)

    # merge_across with unequal counts (and an empty member) via a named vmap axis.
    unequal = [G.update(G.init(p, c), x[a:b]) for a, b in zip(cuts[:-1], cuts[1:])]
    unequal.append(G.init(p, c))
    stacked = jax.tree.map(lambda *a: jnp.stack(a), *unequal)
    merged = jax.vmap(lambda s: G.merge_across(s, "d"), axis_name="d")(stacked)
    _assert_stats_close(jax.tree.map(lambda a: a[3], merged), one, 1e-10)


def test_float32_large_offset_is_accurate():
    rng = np.random.default_rng(2)
    p, c, n = 4, 8, 2000
    x = _features(rng, n, p, c, offset=1e3)
    _, ref_cov = _np_fit(x, 0.0)
    x32 = jnp.asarray(x, jnp.float32)
    stats = G.init(p, c, jnp.float32)
    upd = jax.jit(G.update)
    for i in range(0, n, 100):
        stats = upd(stats, x32[i:i + 100])
    _, cov = G.finalize(stats, eps=0.0)
    assert cov.dtype == jnp.float32
    err = np.abs(np.asarray(cov, np.float64) - ref_cov).max()

    # Naive float32 accumulation of sum(x x^T) and sum(x): cancels catastrophically.
    s1 = jnp.sum(x32, axis=0)
    s2 = jnp.einsum("npc,npd->pcd", x32, x32, precision=jax.lax.Precision.HIGHEST)
    naive = (s2 - s1[:, :, None] * s1[:, None, :] / n) / (n - 1)
    naive_err = np.abs(np.asarray(naive, np.float64) - ref_cov).max()
    assert err < 1e-4              # covariance entries are O(1); measured ~6e-6
    assert naive_err > 1000 * err  # measured ~0.5: every significant digit lost


def test_mahalanobis_matches_numpy_float64(x64):
    rng = np.random.default_rng(3)
    p, c, b = 6, 5, 7
    train = _features(rng, 30, p, c)
    mean, cov = _np_fit(train, 0.01)
    test = _features(rng, b, p, c) + rng.normal(size=(b, p, c))
    diff = test - mean
    ref = np.sqrt(np.einsum("bpc,pcd,bpd->bp", diff, np.linalg.inv(cov), diff))

    chol = G.cholesky_factor(jnp.asarray(cov))
    np.testing.assert_allclose(np.asarray(chol @ jnp.swapaxes(chol, 1, 2)), cov, rtol=1e-13,
                               atol=1e-14)
    dist = jax.jit(G.mahalanobis)(jnp.asarray(test), jnp.asarray(mean), chol)
    assert dist.shape == (b, p)
    np.testing.assert_allclose(np.asarray(dist), ref, rtol=1e-10)
    w = G.whitening_matrix(chol)
    np.testing.assert_allclose(np.asarray(w @ chol), np.broadcast_to(np.eye(c), (p, c, c)),
                               atol=1e-12)
    dist_w = jax.jit(G.mahalanobis_whitened)(jnp.asarray(test), jnp.asarray(mean), w)
    np.testing.assert_allclose(np.asarray(dist_w), np.asarray(dist), rtol=1e-11)


def test_mahalanobis_float32_tolerance():
    rng = np.random.default_rng(4)
    p, c, b = 4, 32, 5
    train = _features(rng, 200, p, c)
    mean, cov = _np_fit(train, 0.01)
    test = _features(rng, b, p, c)
    diff = test - mean
    ref = np.sqrt(np.einsum("bpc,pcd,bpd->bp", diff, np.linalg.inv(cov), diff))
    chol = G.cholesky_factor(jnp.asarray(cov, jnp.float32))
    args = (jnp.asarray(test, jnp.float32), jnp.asarray(mean, jnp.float32))
    np.testing.assert_allclose(np.asarray(G.mahalanobis(*args, chol)), ref, rtol=1e-4)
    np.testing.assert_allclose(np.asarray(G.mahalanobis_whitened(*args, G.whitening_matrix(chol))),
                               ref, rtol=1e-4)


def test_bad_arguments_raise():
    s = G.init(3, 4)
    with pytest.raises(ValueError, match="feats"):
        G.update(s, jnp.ones((2, 3, 5)))
    with pytest.raises(ValueError, match="feats"):
        G.update(s, jnp.ones((3, 4)))
    with pytest.raises(ValueError, match="same"):
        G.merge(s, G.init(3, 5))
    with pytest.raises(ValueError, match="count"):
        G.finalize(G.update(s, jnp.ones((1, 3, 4))))
    with pytest.raises(ValueError, match="num_positions"):
        G.init(0, 4)
    with pytest.raises(ValueError, match="eps"):
        G.finalize(G.update(s, jnp.ones((2, 3, 4))), eps=-1.0)
    with pytest.raises(ValueError, match="cov"):
        G.cholesky_factor(jnp.ones((3, 4, 5)))
    feats, mean, chol = jnp.ones((2, 3, 4)), jnp.zeros((3, 4)), jnp.eye(4)[None].repeat(3, 0)
    with pytest.raises(ValueError, match="feats"):
        G.mahalanobis(jnp.ones((2, 4, 4)), mean, chol)
    with pytest.raises(ValueError, match="mean"):
        G.mahalanobis(feats, jnp.zeros(4), chol)
    with pytest.raises(ValueError, match="chol"):
        G.mahalanobis(feats, mean, chol[:2])
    with pytest.raises(ValueError, match="whiten"):
        G.mahalanobis_whitened(feats, mean, jnp.eye(4))
    with pytest.raises(ValueError, match="chol"):
        G.whitening_matrix(jnp.eye(4))
