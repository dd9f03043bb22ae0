"""Sub-pixel transposed convolution vs independent definitions (float64).

References: a NumPy scatter loop of the definition y[i*s + a - p] += x[i] w[a] and its
adjoint (the gradients; ``vtadl_jax.reference_numerics``, also used by the selftest),
``jax.lax.conv_transpose`` (zero-dilated input, flipped kernel) and, when installed,
``torch.nn.functional.conv_transpose2d``.
"""
import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vtadl_jax.kernels.conv_transpose import conv_transpose, kernel_grad_gemm
from vtadl_jax import reference_numerics as numerics
from vtadl_jax.models.decoder import VTADL_CODE_LAYERS

# the module (vtadl_jax.kernels re-exports the function under the same name)
ct_module = importlib.import_module("vtadl_jax.kernels.conv_transpose")
# (kernel, stride, padding, output_padding): the code decoder's six layers, the small
# decoder's two, and odd cases (non-square stride/kernel, output padding > padding, k < s).
CODE = [(k, s, p, 0) for _, k, s, p in VTADL_CODE_LAYERS]
SMALL = [(4, 2, 1, 0), (3, 1, 1, 0)]
ODD = [(5, 3, 2, 2), (2, 3, 0, 0), (1, 1, 0, 0), (3, 2, 0, 1), ((3, 5), (2, 3), (1, 0), (1, 2)),
       (4, 4, 3, 3), (6, 4, 5, 1)]
CASES = CODE + SMALL + ODD


def _pair(v):
    return (v, v) if isinstance(v, int) else v


def _lax_reference(x, w, s, p, q):
    (sh, sw), (ph, pw), (qh, qw) = _pair(s), _pair(p), _pair(q)
    kh, kw = w.shape[:2]
    return jax.lax.conv_transpose(
        x, w[::-1, ::-1], (sh, sw),
        ((kh - 1 - ph, kh - 1 - ph + qh), (kw - 1 - pw, kw - 1 - pw + qw)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"))


def _inputs(k, seed, size=(4, 3), cin=3, cout=5):
    kh, kw = _pair(k)
    rng = np.random.default_rng(seed)
    return rng.normal(size=(2, *size, cin)), rng.normal(size=(kh, kw, cin, cout))


@pytest.mark.parametrize("grad_impl,fwd_impl", [("conv", "conv"), ("gemm", "conv"),
                                                ("blocked", "conv"), ("conv", "wblocked"),
                                                ("blocked", "wblocked")])
@pytest.mark.parametrize("k,s,p,q", CASES)
def test_values_and_gradients_match_definition(x64, k, s, p, q, grad_impl, fwd_impl):
    x, w = _inputs(k, seed=len(str((k, s, p, q))))
    y = np.asarray(conv_transpose(jnp.asarray(x), jnp.asarray(w), s, p, q,
                                  grad_impl=grad_impl, fwd_impl=fwd_impl))
    ref = numerics.conv_transpose(x, w, s, p, q)
    assert y.shape == ref.shape and y.dtype == np.float64
    np.testing.assert_allclose(y, ref, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(y, np.asarray(_lax_reference(jnp.asarray(x), jnp.asarray(w),
                                                            s, p, q)), rtol=1e-12, atol=1e-12)

    g = np.random.default_rng(7).normal(size=y.shape)
    loss = lambda f: lambda a, b: jnp.sum(f(a, b) * g)  # noqa: E731
    ours = jax.grad(loss(lambda a, b: conv_transpose(a, b, s, p, q, grad_impl=grad_impl,
                                                     fwd_impl=fwd_impl)), argnums=(0, 1))
    lax_ref = jax.grad(loss(lambda a, b: _lax_reference(a, b, s, p, q)), argnums=(0, 1))
    dx, dw = ours(jnp.asarray(x), jnp.asarray(w))
    rx, rw = numerics.conv_transpose_vjp(x, w, g, s, p)
    np.testing.assert_allclose(np.asarray(dx), rx, rtol=1e-11, atol=1e-11)
    np.testing.assert_allclose(np.asarray(dw), rw, rtol=1e-11, atol=1e-11)
    lx, lw = lax_ref(jnp.asarray(x), jnp.asarray(w))
    np.testing.assert_allclose(np.asarray(dx), np.asarray(lx), rtol=1e-11, atol=1e-11)
    np.testing.assert_allclose(np.asarray(dw), np.asarray(lw), rtol=1e-11, atol=1e-11)


@pytest.mark.parametrize("band_bytes", [1, 700, 1 << 30])
def test_kernel_grad_gemm_bands_equal_numpy(x64, monkeypatch, band_bytes):
    """The banded GEMM kernel gradient against a float64 NumPy loop, for one-row bands,
    bands that do not divide the output height (zero-padded tail) and a single band."""
    monkeypatch.setattr(ct_module, "_BAND_BYTES", band_bytes)
    rng = np.random.default_rng(11)
    x, g = rng.normal(size=(2, 9, 8, 3)), rng.normal(size=(2, 7, 5, 4))  # kernel 3 x 4
    ref = np.zeros((3, 4, 3, 4))
    for a in range(3):
        for b in range(4):
            ref[a, b] = np.einsum("nijc,nijd->cd", x[:, a:a + 7, b:b + 5], g)
    got = kernel_grad_gemm(jnp.asarray(x), jnp.asarray(g), (3, 4))
    np.testing.assert_allclose(np.asarray(got), ref, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="do not fit"):
        kernel_grad_gemm(jnp.asarray(x), jnp.asarray(g), (2, 4))


def _check_valid_conv_form(form, x, w, rng):
    """``form(x, w)`` (values and both gradients) against float64 NumPy loops of the VALID
    stride-1 correlation y = sum_{a,b} x[:, a:a+oh, b:b+ow] @ w[a, b] and its adjoint;
    the cotangent is drawn from ``rng``."""
    kh, kw = w.shape[:2]
    oh, ow = x.shape[1] - kh + 1, x.shape[2] - kw + 1
    ref = np.zeros((x.shape[0], oh, ow, w.shape[-1]))
    for a in range(kh):
        for b in range(kw):
            ref += x[:, a:a + oh, b:b + ow] @ w[a, b]
    y, pull = jax.vjp(form, jnp.asarray(x), jnp.asarray(w))
    np.testing.assert_allclose(np.asarray(y), ref, rtol=1e-12, atol=1e-12)
    g = rng.normal(size=ref.shape)
    dx_ref, dw_ref = np.zeros_like(x), np.zeros_like(w)
    for a in range(kh):
        for b in range(kw):
            dx_ref[:, a:a + oh, b:b + ow] += g @ w[a, b].T
            dw_ref[a, b] = np.einsum("nijc,nijd->cd", x[:, a:a + oh, b:b + ow], g)
    dx, dw = pull(jnp.asarray(g))
    np.testing.assert_allclose(np.asarray(dx), dx_ref, rtol=1e-11, atol=1e-11)
    np.testing.assert_allclose(np.asarray(dw), dw_ref, rtol=1e-11, atol=1e-11)


@pytest.mark.parametrize("shape,kernel", [((2, 9, 8, 3), (3, 4)), ((1, 12, 13, 2), (11, 11)),
                                          ((2, 7, 7, 4), (6, 6)), ((1, 5, 6, 3), (1, 2))])
def test_conv_valid_blocked_equals_numpy(x64, shape, kernel):
    """The 2x2-blocked convolution (values and both gradients) against float64 NumPy
    loops of the VALID correlation, odd and even output sizes and kernels."""
    rng = np.random.default_rng(5)
    x, w = rng.normal(size=shape), rng.normal(size=(*kernel, shape[-1], 3))
    _check_valid_conv_form(ct_module.conv_valid_blocked, x, w, rng)


@pytest.mark.parametrize("shape,kernel,block", [((2, 9, 8, 3), (3, 4), 4),
                                                ((1, 12, 13, 2), (11, 11), 4),
                                                ((2, 7, 7, 4), (6, 6), 3),
                                                ((1, 5, 6, 3), (1, 2), 4),
                                                ((1, 6, 9, 2), (2, 3), 1)])
def test_conv_valid_wblocked_equals_numpy(x64, shape, kernel, block):
    """The width-blocked convolution (values and both gradients) against float64 NumPy
    loops of the VALID correlation: output widths that are and are not multiples of the
    block, blocks wider than the output, block 1."""
    rng = np.random.default_rng(9)
    x, w = rng.normal(size=shape), rng.normal(size=(*kernel, shape[-1], 2))
    _check_valid_conv_form(lambda a, b: ct_module.conv_valid_wblocked(a, b, block), x, w, rng)


def test_fwd_impl_choice():
    x = jnp.ones((1, 4, 4, 2))

    def strided(stride, cout, **kw):  # "wblocked" is a width-strided convolution
        w = jnp.ones((3, 3, 2, cout))
        jaxpr = jax.make_jaxpr(lambda a, b: conv_transpose(a, b, stride, 1, **kw))(x, w)
        return "window_strides=(1, 4)" in str(jaxpr)
    on_cpu = jax.default_backend() == "cpu"
    assert strided(1, 3) == on_cpu and strided(1, 8) == on_cpu  # < 16 phase channels
    assert strided(2, 3) == on_cpu                               # 4 phases x 3 = 12
    assert not strided(2, 4) and not strided(1, 16)              # 16 phase channels
    assert not strided(1, 3, grad_impl="conv")  # plain autodiff asked for: jvp works
    assert strided(1, 16, fwd_impl="wblocked")
    jax.jvp(lambda a: conv_transpose(a, jnp.ones((3, 3, 2, 3)), 1, 1, grad_impl="conv"),
            (x,), (x,))
    with pytest.raises(ValueError, match="fwd_impl must be one of"):
        conv_transpose(x, jnp.ones((3, 3, 2, 2)), 1, 1, fwd_impl="fast")


def test_grad_impl_choice():
    x = jnp.ones((1, 4, 4, 2))

    def custom(grad_impl, stride, cout):
        w = jnp.ones((3, 3, 2, cout))
        jaxpr = jax.make_jaxpr(lambda a, b: conv_transpose(a, b, stride, 1, fwd_impl="conv",
                                                           grad_impl=grad_impl))(x, w)
        return "custom_vjp" in str(jaxpr)
    assert custom("gemm", 1, 8) and custom("blocked", 3, 2) and not custom("conv", 3, 8)
    on_cpu = jax.default_backend() == "cpu"
    assert custom("auto", 2, 8) == on_cpu   # 4 phases x 8 = 32 channels: "gemm"
    assert custom("auto", 1, 3) == on_cpu   # stride 1, 3 channels: "blocked"
    assert not custom("auto", 1, 8)         # stride 1, 8 channels: autodiff's convolution
    with pytest.raises(ValueError, match="grad_impl must be one of"):
        conv_transpose(x, jnp.ones((3, 3, 2, 2)), 1, 1, grad_impl="fast")


def test_float32_and_bfloat16_run_in_input_dtype():
    x, w = _inputs(9, seed=1, size=(6, 6), cin=4, cout=3)
    ref = numerics.conv_transpose(x, w, 2, 0, 0)
    y32 = conv_transpose(jnp.asarray(x, jnp.float32), jnp.asarray(w, jnp.float32), 2, 0)
    assert y32.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(y32), ref, rtol=1e-4, atol=1e-4)
    y16 = conv_transpose(jnp.asarray(x, jnp.bfloat16), jnp.asarray(w, jnp.float32), 2, 0)
    assert y16.dtype == jnp.bfloat16  # the kernel is cast to the input's dtype
    scale = np.abs(ref).max()
    np.testing.assert_allclose(np.asarray(y16, np.float64), ref, atol=0.05 * scale)


def test_rejects_bad_arguments():
    x, w = jnp.zeros((1, 3, 3, 2)), jnp.zeros((3, 3, 2, 4))
    with pytest.raises(ValueError, match="padding=3"):
        conv_transpose(x, w, 2, 3)
    with pytest.raises(ValueError, match="output_padding=2"):
        conv_transpose(x, w, 2, 1, 2)
    with pytest.raises(ValueError, match="Cin"):
        conv_transpose(x, jnp.zeros((3, 3, 5, 4)), 2, 1)


@pytest.mark.torch
@pytest.mark.parametrize("k,s,p,q", CODE + [(5, 3, 2, 2), ((3, 5), (2, 3), (1, 0), (1, 2))])
def test_matches_torch(k, s, p, q):
    torch = pytest.importorskip("torch")
    x, w = _inputs(k, seed=3, size=(5, 4))
    ref = torch.nn.functional.conv_transpose2d(
        torch.from_numpy(x.transpose(0, 3, 1, 2)), torch.from_numpy(w.transpose(2, 3, 0, 1)),
        stride=s, padding=p, output_padding=q).numpy().transpose(0, 2, 3, 1)
    y = conv_transpose(jnp.asarray(x, jnp.float32), jnp.asarray(w, jnp.float32), s, p, q)
    np.testing.assert_allclose(np.asarray(y), ref, rtol=1e-4, atol=1e-4)
