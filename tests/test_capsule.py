"""Tests for vtadl_jax.kernels.capsule against a float64 NumPy transcription of
Sabour et al. (2017): eq. 1 (squash), eq. 2 (votes) and Procedure 1 (routing).

Tolerances: float64 atol/rtol 1e-12; float32 vs float64 reference atol 1e-5.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from vtadl_jax.kernels.capsule import capsule_votes, dynamic_routing, squash


def _squash_paper(s, axis=-1, eps=0.0):
    """eq. 1 literally: v = |s|^2 / (1 + |s|^2) * s / |s| (|s| -> sqrt(|s|^2 + eps))."""
    sq = np.sum(s * s, axis=axis, keepdims=True)
    return sq / (1 + sq) * s / np.sqrt(sq + eps)


def _routing_paper(u_hat, iterations, eps=0.0):
    """Procedure 1, one sample and one output capsule at a time (explicit loops)."""
    batch, n_in, n_out, _ = u_hat.shape
    v_all = []
    for b_idx in range(batch):
        u = u_hat[b_idx]
        b = np.zeros((n_in, n_out))
        for _ in range(iterations):
            c = np.exp(b - b.max(axis=1, keepdims=True))
            c = c / c.sum(axis=1, keepdims=True)
            v = []
            for j in range(n_out):
                s_j = sum(c[i, j] * u[i, j] for i in range(n_in))
                v.append(_squash_paper(s_j, eps=eps))
            v = np.stack(v)
            for i in range(n_in):
                for j in range(n_out):
                    b[i, j] += u[i, j] @ v[j]
        v_all.append(v)
    return np.stack(v_all)


def test_squash_matches_paper_formula(x64):
    s = np.random.default_rng(0).standard_normal((4, 5, 8)) * 2.0
    np.testing.assert_allclose(np.asarray(squash(s, eps=0.0)), _squash_paper(s), rtol=1e-13,
                               atol=0)
    # default eps only perturbs by ~eps / (2 |s|^2) relative for |s| ~ 1 and above
    np.testing.assert_allclose(np.asarray(squash(s)), _squash_paper(s), rtol=1e-8, atol=0)
    np.testing.assert_allclose(np.asarray(squash(s)), _squash_paper(s, eps=1e-8), rtol=1e-13,
                               atol=0)
    np.testing.assert_allclose(np.asarray(squash(s, axis=1, eps=0.0)),
                               _squash_paper(s, axis=1), rtol=1e-13, atol=0)
    norms = np.linalg.norm(np.asarray(squash(s)), axis=-1)
    np.testing.assert_allclose(norms, (lambda q: q / (1 + q))(np.sum(s * s, -1)), rtol=1e-8)


def test_squash_zero_vector_and_gradient(x64):
    z = jnp.zeros((3, 8))
    assert np.all(np.asarray(squash(z)) == 0.0)
    g = jax.jacfwd(lambda a: squash(a[0]))(z)
    assert np.all(np.isfinite(np.asarray(g)))
    np.testing.assert_allclose(np.asarray(jax.grad(lambda a: squash(a).sum())(z)), 0.0,
                               atol=1e-12)
    s = jnp.asarray(np.random.default_rng(1).standard_normal((2, 6)))
    check_grads(squash, (s,), order=2, modes=("fwd", "rev"))


def test_capsule_votes_matches_matmul(x64):
    rng = np.random.default_rng(2)
    u, w = rng.standard_normal((3, 5, 4)), rng.standard_normal((5, 2, 6, 4))
    ref = np.zeros((3, 5, 2, 6))
    for b in range(3):
        for i in range(5):
            for j in range(2):
                ref[b, i, j] = w[i, j] @ u[b, i]
    np.testing.assert_allclose(np.asarray(capsule_votes(u, w)), ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("iterations", [1, 2, 3, 5])
def test_routing_matches_procedure1(x64, iterations):
    u_hat = np.random.default_rng(3).standard_normal((2, 7, 3, 4)) * 0.7
    ours = np.asarray(dynamic_routing(jnp.asarray(u_hat), iterations=iterations, eps=0.0))
    assert ours.shape == (2, 3, 4)
    np.testing.assert_allclose(ours, _routing_paper(u_hat, iterations), rtol=1e-12, atol=1e-12)
    ours = np.asarray(dynamic_routing(jnp.asarray(u_hat), iterations=iterations))
    np.testing.assert_allclose(ours, _routing_paper(u_hat, iterations, eps=1e-8), rtol=1e-12,
                               atol=1e-12)


def test_routing_single_output_is_linear_map_plus_squash(x64):
    """VT-ADL code: one output capsule -> coupling coefficients are 1 -> squash(sum_i W_i u_i)."""
    rng = np.random.default_rng(4)
    u, w = rng.standard_normal((3, 16, 8)), 0.1 * rng.standard_normal((16, 1, 12, 8))
    v = np.asarray(dynamic_routing(capsule_votes(u, w), iterations=3))
    linear = u.reshape(3, -1) @ w[:, 0].transpose(0, 2, 1).reshape(16 * 8, 12)
    np.testing.assert_allclose(v[:, 0], _squash_paper(linear, eps=1e-8), rtol=1e-12, atol=1e-14)
    v1 = np.asarray(dynamic_routing(capsule_votes(u, w), iterations=1))
    np.testing.assert_allclose(v1, v, rtol=1e-12, atol=1e-14)


def test_routing_float32_jit_and_gradient(x64):
    u_hat = np.random.default_rng(5).standard_normal((2, 6, 3, 4))
    ref = _routing_paper(u_hat, 3, eps=1e-8)
    f = jax.jit(functools.partial(dynamic_routing, iterations=3))
    with jax.enable_x64(False):
        out32 = f(jnp.asarray(u_hat, jnp.float32))
        assert out32.dtype == jnp.float32
        np.testing.assert_allclose(np.asarray(out32), ref, rtol=0, atol=1e-5)
    check_grads(lambda a: dynamic_routing(a, iterations=3), (jnp.asarray(u_hat),), order=1,
                modes=("fwd", "rev"))


def test_bad_arguments():
    with pytest.raises(ValueError, match="u_hat"):
        dynamic_routing(jnp.zeros((2, 3, 4)))
    with pytest.raises(ValueError, match="iterations"):
        dynamic_routing(jnp.zeros((1, 2, 3, 4)), iterations=0)
    with pytest.raises(ValueError, match="eps"):
        squash(jnp.ones((2, 3)), eps=-1.0)
    with pytest.raises(ValueError, match="axis"):
        squash(jnp.ones((2, 3)), axis=2)
    with pytest.raises(ValueError, match="u must"):
        capsule_votes(jnp.zeros((2, 3)), jnp.zeros((3, 1, 2, 3)))
    with pytest.raises(ValueError, match="W must"):
        capsule_votes(jnp.zeros((2, 3, 4)), jnp.zeros((3, 2, 4)))
    with pytest.raises(ValueError, match="does not match"):
        capsule_votes(jnp.zeros((2, 3, 4)), jnp.zeros((3, 1, 2, 5)))


def test_single_capsule_sum_values_and_gradients_vs_float64():
    """s[b, o] = sum_{i,j} u[b,i,j] W[i,o,j] and its two gradients, against the float64
    loops of reference_numerics (the diagonal-GEMM form must equal the plain sum)."""
    from vtadl_jax import reference_numerics as ref
    from vtadl_jax.kernels.capsule import single_capsule_sum

    rng = np.random.default_rng(7)
    u = rng.normal(size=(3, 10, 4))
    w = rng.normal(size=(10, 6, 4))
    g = rng.normal(size=(3, 6))
    np.testing.assert_allclose(ref.single_capsule_sum(u, w), np.einsum("bij,ioj->bo", u, w),
                               rtol=1e-12)  # the loop reference itself
    du_ref, dw_ref = ref.single_capsule_sum_vjp(u, w, g)
    u32, w32 = jnp.asarray(u, jnp.float32), jnp.asarray(w, jnp.float32)
    out, pull = jax.vjp(single_capsule_sum, u32, w32)
    du, dw = pull(jnp.asarray(g, jnp.float32))
    np.testing.assert_allclose(out, ref.single_capsule_sum(u, w), atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(du, du_ref, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(dw, dw_ref, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="do not match"):
        single_capsule_sum(u32, w32[:, :, :3])
