"""Tests for vtadl_jax.kernels.mixture against independent float64 references."""
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.special
import scipy.stats
from jax.test_util import check_grads

from vtadl_jax.kernels.mixture import (mixture_nll, mixture_nll_from_head,
                                       mixture_nll_full_cov, vtadl_code_mdn_loss)


def _params(rng, batch, k, d, spread=1.0):
    z = rng.normal(size=batch + (d,))
    logits = rng.normal(size=batch + (k,)) * 2
    means = rng.normal(size=batch + (k, d)) * spread
    scales = rng.uniform(0.3, 2.0, size=batch + (k, d))
    return z, logits, means, scales


def _np_diag_nll(z, logits, means, scales):
    """Float64 NumPy/SciPy reference (independent of the code under test)."""
    log_w = logits - scipy.special.logsumexp(logits, axis=-1, keepdims=True)
    log_n = scipy.stats.norm.logpdf(z[..., None, :], means, scales).sum(-1)
    return -scipy.special.logsumexp(log_w + log_n, axis=-1)


def test_matches_distrax_float64(x64):
    import distrax

    z, logits, means, scales = _params(np.random.default_rng(0), (3, 4), 5, 6)
    dist = distrax.MixtureSameFamily(
        distrax.Categorical(logits=jnp.asarray(logits)),
        distrax.MultivariateNormalDiag(loc=jnp.asarray(means), scale_diag=jnp.asarray(scales)))
    ref = -np.asarray(dist.log_prob(jnp.asarray(z)))
    out = mixture_nll(*map(jnp.asarray, (z, logits, means, scales)))
    assert out.shape == (3, 4) and out.dtype == jnp.float64
    np.testing.assert_allclose(np.asarray(out), ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("k_chunk", [None, 3])
def test_matches_scipy_float64_with_broadcast(x64, k_chunk):
    rng = np.random.default_rng(1)
    z = rng.normal(size=(6, 4))
    _, logits, means, scales = _params(rng, (), 7, 4)  # one mixture shared by all z
    out = mixture_nll(jnp.asarray(z), jnp.asarray(logits), jnp.asarray(means),
                      jnp.asarray(scales), k_chunk=k_chunk)
    ref = _np_diag_nll(z, logits, means, scales)
    np.testing.assert_allclose(np.asarray(out), ref, rtol=1e-12, atol=1e-12)


def test_float32_tolerance():
    z, logits, means, scales = _params(np.random.default_rng(2), (8,), 16, 32)
    ref = _np_diag_nll(z, logits, means, scales)
    f32 = [jnp.asarray(a, jnp.float32) for a in (z, logits, means, scales)]
    for kc in (None, 5):
        out = mixture_nll(*f32, k_chunk=kc)
        assert out.dtype == jnp.float32
        np.testing.assert_allclose(np.asarray(out), ref, rtol=2e-6, atol=1e-4)


@pytest.mark.parametrize("k_chunk", [1, 4, 5, 12, 64])
def test_chunked_equals_unchunked_value_and_grad(x64, k_chunk):
    args = tuple(map(jnp.asarray, _params(np.random.default_rng(3), (2, 3), 13, 5)))

    def loss(kc, *a):
        return jnp.sum(mixture_nll(*a, k_chunk=kc) * jnp.arange(1.0, 7.0).reshape(2, 3))

    v0, g0 = jax.value_and_grad(partial(loss, None), argnums=(0, 1, 2, 3))(*args)
    v1, g1 = jax.jit(jax.value_and_grad(partial(loss, k_chunk), argnums=(0, 1, 2, 3)))(*args)
    np.testing.assert_allclose(v1, v0, rtol=1e-13)
    for a, b in zip(g1, g0):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-11, atol=1e-13)


def test_extreme_values_stable():
    rng = np.random.default_rng(4)
    k, d = 2000, 8
    z = np.full((3, d), 1e3)
    logits = rng.normal(size=(3, k)) * 50.0
    means = rng.normal(size=(3, k, d))
    scales = rng.uniform(1e-3, 1e-2, size=(3, k, d))
    ref = _np_diag_nll(z, logits, means, scales)  # ~5e10: exp(-NLL) underflows
    assert np.all(np.isfinite(ref)) and ref.min() > 1e10
    args = [jnp.asarray(a, jnp.float32) for a in (z, logits, means, scales)]
    for kc in (None, 333):
        out, grads = jax.jit(lambda *a: (mixture_nll(*a, k_chunk=kc),  # noqa: B023
                                         jax.grad(lambda *b: mixture_nll(*b, k_chunk=kc).sum(),
                                                  argnums=(0, 1, 2, 3))(*a)))(*args)
        np.testing.assert_allclose(np.asarray(out), ref, rtol=1e-5)
        assert all(np.all(np.isfinite(g)) for g in grads)


@pytest.mark.parametrize("k_chunk", [None, 3])
def test_check_grads(x64, k_chunk):
    z, logits, means, scales = map(jnp.asarray, _params(np.random.default_rng(5), (2,), 7, 3))
    f = jax.jit(lambda *a: mixture_nll(*a, k_chunk=k_chunk))
    check_grads(f, (z, logits, means, scales), order=1, modes=("rev",), atol=1e-6, rtol=1e-6)


def _bf16_rounded(x) -> np.ndarray:
    """x rounded to bfloat16 (via float32), as float64: the operands a bf16 product sees."""
    return np.asarray(jnp.asarray(x, jnp.float32).astype(jnp.bfloat16), np.float64)


def test_low_precision_matmul_value_and_gradients():
    """Forward and both backward products on bf16-rounded operands (cotangent rounded
    too), accumulated in float32: a float64 NumPy reference on the rounded arrays."""
    from vtadl_jax.kernels.mixture import low_precision_matmul

    rng = np.random.default_rng(8)
    a, b, g = (rng.normal(size=s).astype(np.float32) for s in ((5, 64), (64, 7), (5, 7)))
    bf = _bf16_rounded
    y, pull = jax.vjp(lambda x, w: low_precision_matmul(x, w, jnp.bfloat16), a, b)
    da, db = pull(jnp.asarray(g))
    assert y.dtype == da.dtype == db.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(y), bf(a) @ bf(b), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(da), bf(g) @ bf(b).T, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(db), bf(a).T @ bf(g), rtol=1e-5, atol=1e-5)
    # and not the unrounded products (the tolerance separates the two)
    assert np.abs(np.asarray(db) - a.astype(np.float64).T @ g).max() > 1e-3


@pytest.mark.parametrize("k_chunk", [None, 4])
def test_from_head_bf16_matmuls_accumulate_in_float32(k_chunk):
    """matmul_dtype=bfloat16: the three maps multiply bf16-rounded inputs and accumulate
    in float32, so the NLL equals a float64 reference on the rounded h and weights to
    float32 accuracy."""
    rng = np.random.default_rng(7)
    hdim, k, d = 32, 6, 8
    z, h = rng.normal(size=(4, d)), rng.normal(size=(4, hdim))
    w = dict(w_logits=rng.normal(size=(hdim, k)) * 0.2,
             w_means=rng.normal(size=(hdim, k, d)) * 0.2,
             w_scales=rng.normal(size=(hdim, k, d)) * 0.05)
    bf = _bf16_rounded
    hr, wr = bf(h), {n: bf(v) for n, v in w.items()}
    ref = _np_diag_nll(z, hr @ wr["w_logits"], np.einsum("nh,hkd->nkd", hr, wr["w_means"]),
                       np.logaddexp(0.0, np.einsum("nh,hkd->nkd", hr, wr["w_scales"])) + 0.01)
    f32 = lambda a: jnp.asarray(a, jnp.float32)  # noqa: E731
    out = mixture_nll_from_head(f32(z), f32(h), *(f32(w[n]) for n in w), k_chunk=k_chunk,
                                min_scale=0.01, matmul_dtype=jnp.bfloat16)
    assert out.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(out), ref, rtol=2e-5)
    plain = mixture_nll_from_head(f32(z), f32(h), *(f32(w[n]) for n in w), k_chunk=k_chunk,
                                  min_scale=0.01)
    # The tolerance tells the paths apart: unrounded float32 inputs miss it by far.
    assert np.abs(np.asarray(plain) - ref).max() > 10 * 2e-5 * np.abs(ref).max()


@pytest.mark.parametrize("k_chunk", [None, 4, 5])
def test_from_head_equals_materialised(x64, k_chunk):
    rng = np.random.default_rng(6)
    hdim, k, d = 6, 11, 4
    z, h = rng.normal(size=(2, 3, d)), rng.normal(size=(2, 3, hdim))
    w = dict(w_logits=rng.normal(size=(hdim, k)), w_means=rng.normal(size=(hdim, k, d)),
             w_scales=rng.normal(size=(hdim, k, d)) * 0.3, b_logits=rng.normal(size=(k,)),
             b_means=rng.normal(size=(k, d)), b_scales=rng.normal(size=(k, d)))
    logits = h @ w["w_logits"] + w["b_logits"]
    means = np.einsum("bnh,hkd->bnkd", h, w["w_means"]) + w["b_means"]
    scales = np.logaddexp(0.0, np.einsum("bnh,hkd->bnkd", h, w["w_scales"]) + w["b_scales"])
    ref = _np_diag_nll(z, logits, means, scales + 0.01)
    wj = {n: jnp.asarray(v) for n, v in w.items()}
    out = mixture_nll_from_head(jnp.asarray(z), jnp.asarray(h), **wj, k_chunk=k_chunk,
                                min_scale=0.01)
    np.testing.assert_allclose(np.asarray(out), ref, rtol=1e-12)

    def loss(kc, zz, hh, ww):
        return mixture_nll_from_head(zz, hh, **ww, k_chunk=kc, min_scale=0.01).sum()

    grad = lambda kc: jax.jit(jax.grad(partial(loss, kc), argnums=(0, 1, 2)))  # noqa: E731
    g_ref = grad(None)(jnp.asarray(z), jnp.asarray(h), wj)
    g = grad(k_chunk)(jnp.asarray(z), jnp.asarray(h), wj)
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-11, atol=1e-13)


def _random_chol(rng, shape, d):
    a = rng.normal(size=shape + (d, d)) * 0.4
    chol = np.tril(a, -1) + np.eye(d) * rng.uniform(0.5, 1.5, size=shape + (1, d))
    return chol


@pytest.mark.parametrize("k_chunk", [None, 2, 3])
def test_full_cov_matches_scipy(x64, k_chunk):
    rng = np.random.default_rng(7)
    b, k, d = 5, 4, 3
    z, logits, means = rng.normal(size=(b, d)), rng.normal(size=(b, k)), rng.normal(size=(b, k, d))
    chol = _random_chol(rng, (b, k), d)
    chol_with_junk_upper = chol + np.triu(rng.normal(size=chol.shape), 1)  # never read
    ref = np.empty(b)
    for i in range(b):
        log_w = logits[i] - scipy.special.logsumexp(logits[i])
        log_n = [scipy.stats.multivariate_normal(means[i, j], chol[i, j] @ chol[i, j].T)
                 .logpdf(z[i]) for j in range(k)]
        ref[i] = -scipy.special.logsumexp(log_w + np.array(log_n))
    out = mixture_nll_full_cov(*map(jnp.asarray, (z, logits, means, chol_with_junk_upper)),
                               k_chunk=k_chunk)
    np.testing.assert_allclose(np.asarray(out), ref, rtol=1e-11)


def test_full_cov_diagonal_equals_diag_and_grads(x64):
    z, logits, means, scales = map(jnp.asarray, _params(np.random.default_rng(8), (3,), 5, 4))
    chol = jax.vmap(jax.vmap(jnp.diag))(scales)
    np.testing.assert_allclose(np.asarray(mixture_nll_full_cov(z, logits, means, chol)),
                               np.asarray(mixture_nll(z, logits, means, scales)), rtol=1e-13)
    f = jax.jit(lambda *a: mixture_nll_full_cov(*a, k_chunk=2))
    check_grads(f, (z, logits, means, chol), order=1, modes=("rev",), atol=1e-6, rtol=1e-6)


def test_vtadl_code_loss_matches_numpy_transcription(x64):
    rng = np.random.default_rng(9)
    b, n, k, d = 3, 4, 5, 6
    z = rng.normal(size=(b, n, d))
    logits = rng.normal(size=(b, n, k))
    # The code's heads output D*K numbers viewed as (D, K); ours are (K, D).
    mu_code = rng.normal(size=(b, n, d * k)).reshape(b, n, d, k)
    logvar_code = np.logaddexp(0.0, rng.normal(size=(b, n, d * k))).reshape(b, n, d, k)
    # NumPy transcription of mdn1.log_gaussian / log_gmm / mdn_loss_function:
    pi = np.exp(logits - scipy.special.logsumexp(logits, -1, keepdims=True))
    x = np.broadcast_to(z[..., None], logvar_code.shape)
    log_p = (logvar_code + (x - mu_code) ** 2 / np.exp(logvar_code)).sum(2)
    log_p = -0.5 * (np.log(2 * np.pi) + log_p)
    per_patch = (pi * -log_p).sum(2)
    ref = per_patch.sum(1).mean()
    args = (jnp.asarray(z), jnp.asarray(logits), jnp.asarray(mu_code.transpose(0, 1, 3, 2)),
            jnp.asarray(logvar_code.transpose(0, 1, 3, 2)))
    np.testing.assert_allclose(float(vtadl_code_mdn_loss(*args)), ref, rtol=1e-13)
    np.testing.assert_allclose(np.asarray(vtadl_code_mdn_loss(*args, reduction="none")),
                               per_patch, rtol=1e-13)


def _temp_bytes(fn, *shapes):
    compiled = jax.jit(fn).lower(*shapes).compile()
    ma = compiled.memory_analysis()
    if ma is None:
        pytest.skip("memory_analysis() not available on this backend")
    return ma.temp_size_in_bytes


def test_memory_chunking_bounds_intermediates():
    b, hdim, k, d, kc = 64, 64, 2048, 128, 32
    f32 = lambda *s: jax.ShapeDtypeStruct(s, jnp.float32)  # noqa: E731
    full_kd = b * k * d * 4  # one (B, K, D) float32 tensor

    def head_loss(kc_, z, h, wl, wm, ws):
        return mixture_nll_from_head(z, h, wl, wm, ws, k_chunk=kc_).sum()

    shapes = (f32(b, d), f32(b, hdim), f32(hdim, k), f32(hdim, k, d), f32(hdim, k, d))
    grad = lambda kc_: jax.grad(partial(head_loss, kc_), argnums=(0, 1, 2, 3, 4))  # noqa
    t_full = _temp_bytes(grad(None), *shapes)
    t_chunk = _temp_bytes(grad(kc), *shapes)
    assert t_full >= full_kd  # the unchunked head materialises (B, K, D) tensors
    assert t_chunk < t_full / 20 and t_chunk < full_kd / 4  # O(B * k_chunk * D), not O(K)

    # With means/scales as inputs: chunking must not copy or pad the (B, K, D) inputs.
    def nll_loss(z, lg, m, s):
        return mixture_nll(z, lg, m, s, k_chunk=kc).sum()

    t_nll = _temp_bytes(jax.grad(nll_loss, argnums=(0, 1, 2, 3)),
                        f32(b, d), f32(b, k), f32(b, k, d), f32(b, k, d))
    assert t_nll < full_kd / 4


@pytest.mark.parametrize("bad", [
    dict(z=(4,), logits=(3,), means=(3, 5), scales=(3, 5)),       # D mismatch
    dict(z=(5,), logits=(3,), means=(4, 5), scales=(4, 5)),       # K mismatch
    dict(z=(5,), logits=(3,), means=(3, 5), scales=(3, 4)),       # scales shape
    dict(z=(2, 5), logits=(3, 3), means=(3, 5), scales=(3, 5)),   # batch mismatch
    dict(z=(), logits=(3,), means=(3, 5), scales=(3, 5)),         # rank
])
def test_bad_shapes_raise(bad):
    args = [jnp.ones(bad[n]) for n in ("z", "logits", "means", "scales")]
    with pytest.raises(ValueError):
        mixture_nll(*args)


def test_bad_arguments_raise():
    z, lg, m, s = jnp.ones(5), jnp.ones(3), jnp.ones((3, 5)), jnp.ones((3, 5))
    for kc in (0, -2, 2.5, True, "4"):
        with pytest.raises(ValueError, match="k_chunk"):
            mixture_nll(z, lg, m, s, k_chunk=kc)
    with pytest.raises(ValueError, match="scales"):
        mixture_nll(z, lg, m, s.at[1, 2].set(0.0))
    with pytest.raises(ValueError, match="chol"):
        mixture_nll_full_cov(z, lg, m, jnp.ones((3, 5, 4)))
    with pytest.raises(ValueError, match="chol"):
        mixture_nll_full_cov(z, lg, m, jnp.zeros((3, 5, 5)))
    with pytest.raises(ValueError, match="reduction"):
        vtadl_code_mdn_loss(z, lg, m, s, reduction="sum")
    with pytest.raises(ValueError, match="B, N, D"):
        vtadl_code_mdn_loss(z, lg, m, s)
    with pytest.raises(ValueError, match="w_means"):
        mixture_nll_from_head(z, jnp.ones(4), jnp.ones((4, 3)), jnp.ones((4, 3, 4)),
                              jnp.ones((4, 3, 5)))


def test_chunked_kernels_inside_shard_map(x64):
    """Chunked over K inside ``jax.shard_map`` on 8 devices (batch split over a mesh axis):
    equal to the SciPy reference, values and gradient w.r.t. z.

    Regression: the chunked logsumexp's scan carry was initialised with constants, which
    shard_map types as device-invariant while the scan body's output varies over the
    mesh axis, so tracing failed (and with it the data-parallel train step with
    ``loss.k_chunk`` set).
    """
    from jax.sharding import PartitionSpec as P

    mesh = jax.make_mesh((8,), ("batch",), axis_types=(jax.sharding.AxisType.Auto,))
    rng = np.random.default_rng(3)
    z, logits, means, scales = _params(rng, (16,), 7, 3)
    h = rng.normal(size=(16, 5))
    wl, wm, ws = rng.normal(size=(5, 7)), rng.normal(size=(5, 7, 3)), rng.normal(size=(5, 7, 3))
    chol = np.tril(rng.normal(size=(16, 7, 3, 3)) * 0.3) + 1.5 * np.eye(3)
    sharded = partial(jax.shard_map, mesh=mesh, out_specs=P("batch"))
    kernels = {
        "diag": (lambda z_, lg, m, s: mixture_nll(z_, lg, m, s, k_chunk=3),
                 (z, logits, means, scales), _np_diag_nll(z, logits, means, scales)),
        "head": (lambda z_, h_: mixture_nll_from_head(z_, h_, wl, wm, ws, k_chunk=3),
                 (z, h), mixture_nll_from_head(jnp.asarray(z), jnp.asarray(h), wl, wm, ws)),
        "full": (lambda z_, lg, m, c: mixture_nll_full_cov(z_, lg, m, c, k_chunk=3),
                 (z, logits, means, chol), mixture_nll_full_cov(*map(jnp.asarray,
                                                                     (z, logits, means, chol)))),
    }
    for name, (fn, args, ref) in kernels.items():
        f = jax.jit(sharded(fn, in_specs=(P("batch"),) * len(args)))
        np.testing.assert_allclose(np.asarray(f(*args)), np.asarray(ref), rtol=1e-12,
                                   err_msg=name)
        g = jax.jit(jax.grad(lambda z_, *rest: jnp.sum(f(z_, *rest))))(*args)
        g_ref = jax.grad(lambda z_, *rest: jnp.sum(fn(z_, *rest)))(*map(jnp.asarray, args))
        np.testing.assert_allclose(np.asarray(g), np.asarray(g_ref), rtol=1e-10, err_msg=name)
