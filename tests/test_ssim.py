"""Tests for vtadl_jax.kernels.ssim (Wang et al. 2004) against skimage, dm_pix, a SciPy
float64 reference and (optional) a torch re-implementation of pytorch_ssim.

Tolerances: float64 vs float64 references atol 1e-12 (skimage / SciPy / torch) and 1e-10
vs dm_pix (which clips variances at float32 eps^2); float32 vs float64 references atol
5e-6 on the mean and 1e-4 on the map (observed 6e-7 / 1e-5: variances E[x^2] - mu^2
cancel in float32 and are divided by ~C2 = 9e-4); float32 vs torch float32 atol 5e-6.
"""
import functools
import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads
from scipy import ndimage

from vtadl_jax.kernels.ssim import ssim, ssim_loss


def _pair(shape, seed=0, scale=1.0):
    """A correlated image pair in [0, scale] (noise added to a smooth-ish image)."""
    rng = np.random.default_rng(seed)
    x = ndimage.uniform_filter(rng.random(shape), size=(1, 3, 3, 1))
    y = np.clip(x + 0.1 * rng.standard_normal(shape), 0.0, 1.0)
    return x * scale, y * scale


def _window(size, sigma):
    g = np.exp(-((np.arange(size) - size // 2) ** 2) / (2 * sigma**2))
    g = g / g.sum()
    return np.outer(g, g)


def _ssim_map_scipy(x, y, max_val, size=11, sigma=1.5, k1=0.01, k2=0.03):
    """float64 reference of the zero-padded ("same") map, one 2-D correlation per channel."""
    w = _window(size, sigma)
    filt = lambda a: np.stack(  # noqa: E731
        [np.stack([ndimage.correlate(a[n, ..., c], w, mode="constant", cval=0.0)
                   for c in range(a.shape[-1])], -1) for n in range(a.shape[0])])
    mx, my = filt(x), filt(y)
    vx, vy, cxy = filt(x * x) - mx**2, filt(y * y) - my**2, filt(x * y) - mx * my
    c1, c2 = (k1 * max_val) ** 2, (k2 * max_val) ** 2
    return ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))


def _ssim_torch(x, y, max_val, size=11, sigma=1.5):
    """pytorch_ssim's algorithm (conv2d, padding=size // 2, groups=channels), NCHW."""
    torch = pytest.importorskip("torch")
    import torch.nn.functional as F
    a = torch.from_numpy(x).permute(0, 3, 1, 2)
    b = torch.from_numpy(y).permute(0, 3, 1, 2)
    ch = a.shape[1]
    w = torch.from_numpy(_window(size, sigma)).to(a.dtype).expand(ch, 1, size, size).contiguous()
    conv = lambda t: F.conv2d(t, w, padding=size // 2, groups=ch)  # noqa: E731
    mu1, mu2 = conv(a), conv(b)
    s11, s22, s12 = conv(a * a) - mu1**2, conv(b * b) - mu2**2, conv(a * b) - mu1 * mu2
    c1, c2 = (0.01 * max_val) ** 2, (0.03 * max_val) ** 2
    m = ((2 * mu1 * mu2 + c1) * (2 * s12 + c2)) / ((mu1**2 + mu2**2 + c1) * (s11 + s22 + c2))
    return m.mean(dim=(1, 2, 3)).numpy(), m.permute(0, 2, 3, 1).numpy()


@pytest.mark.parametrize("shape, max_val", [((3, 32, 40, 3), 1.0), ((2, 24, 24, 1), 255.0),
                                            ((1, 11, 13, 2), 1.0)])
def test_valid_matches_skimage(x64, shape, max_val):
    from skimage.metrics import structural_similarity
    x, y = _pair(shape, seed=1, scale=max_val)
    ours = np.asarray(ssim(jnp.asarray(x), jnp.asarray(y), max_val=max_val, padding="valid"))
    ref = [structural_similarity(a, b, gaussian_weights=True, sigma=1.5,
                                 use_sample_covariance=False, data_range=max_val,
                                 channel_axis=-1) for a, b in zip(x, y)]
    assert ours.shape == (shape[0],) and ours.dtype == np.float64
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-12)


def test_valid_matches_skimage_full_map(x64):
    from skimage.metrics import structural_similarity
    x, y = _pair((1, 30, 26, 2), seed=2)
    ours = np.asarray(ssim(x, y, max_val=1.0, padding="valid", return_map=True))
    _, full = structural_similarity(x[0], y[0], gaussian_weights=True, sigma=1.5,
                                    use_sample_covariance=False, data_range=1.0,
                                    channel_axis=-1, full=True)
    assert ours.shape == (1, 20, 16, 2)
    np.testing.assert_allclose(ours[0], full[5:-5, 5:-5], rtol=0, atol=1e-12)


@pytest.mark.parametrize("filter_size, filter_sigma", [(11, 1.5), (7, 1.0), (5, 3.0)])
def test_valid_matches_dm_pix(x64, filter_size, filter_sigma):
    import dm_pix
    x, y = _pair((2, 20, 23, 3), seed=3)
    kw = dict(max_val=1.0, filter_size=filter_size, filter_sigma=filter_sigma)
    ours = ssim(x, y, padding="valid", return_map=True, **kw)
    ref = dm_pix.ssim(jnp.asarray(x), jnp.asarray(y), return_map=True, **kw)
    np.testing.assert_allclose(np.asarray(ours), np.asarray(ref), rtol=0, atol=1e-10)
    np.testing.assert_allclose(np.asarray(ssim(x, y, padding="valid", **kw)),
                               np.asarray(dm_pix.ssim(jnp.asarray(x), jnp.asarray(y), **kw)),
                               rtol=0, atol=1e-10)


@pytest.mark.parametrize("shape, max_val, k", [((2, 17, 21, 3), 1.0, (0.01, 0.03)),
                                               ((1, 8, 9, 1), 2.0, (0.02, 0.05))])
def test_same_matches_scipy_reference(x64, shape, max_val, k):
    x, y = _pair(shape, seed=4, scale=max_val)
    ref_map = _ssim_map_scipy(x, y, max_val, k1=k[0], k2=k[1])
    ours_map = np.asarray(ssim(x, y, max_val=max_val, k1=k[0], k2=k[1], return_map=True))
    ours = np.asarray(ssim(x, y, max_val=max_val, k1=k[0], k2=k[1]))
    assert ours_map.shape == shape
    np.testing.assert_allclose(ours_map, ref_map, rtol=0, atol=1e-12)
    np.testing.assert_allclose(ours, ref_map.mean(axis=(1, 2, 3)), rtol=0, atol=1e-12)


@pytest.mark.torch
def test_same_matches_pytorch_ssim_float64(x64):
    x, y = _pair((2, 20, 16, 3), seed=5)
    ref, ref_map = _ssim_torch(x, y, 1.0)
    np.testing.assert_allclose(np.asarray(ssim(x, y, max_val=1.0)), ref, rtol=0, atol=1e-12)
    np.testing.assert_allclose(np.asarray(ssim(x, y, max_val=1.0, return_map=True)), ref_map,
                               rtol=0, atol=1e-12)


@pytest.mark.torch
def test_same_matches_pytorch_ssim_float32():
    x, y = _pair((2, 32, 32, 3), seed=6)
    x, y = x.astype(np.float32), y.astype(np.float32)
    ref, _ = _ssim_torch(x, y, 1.0)
    ours = np.asarray(jax.jit(functools.partial(ssim, max_val=1.0))(x, y))
    assert ours.dtype == np.float32
    np.testing.assert_allclose(ours, ref, rtol=0, atol=5e-6)


@pytest.mark.parametrize("padding", ["same", "valid"])
def test_float32_close_to_float64_reference(padding):
    x, y = _pair((2, 24, 24, 3), seed=7)
    ref_map = _ssim_map_scipy(x, y, 1.0)
    if padding == "valid":
        ref_map = ref_map[:, 5:-5, 5:-5]
    f = jax.jit(ssim, static_argnames=("max_val", "padding", "return_map"))
    x32, y32 = x.astype(np.float32), y.astype(np.float32)
    np.testing.assert_allclose(np.asarray(f(x32, y32, max_val=1.0, padding=padding)),
                               ref_map.mean(axis=(1, 2, 3)), rtol=0, atol=5e-6)
    np.testing.assert_allclose(
        np.asarray(f(x32, y32, max_val=1.0, padding=padding, return_map=True)), ref_map,
        rtol=0, atol=1e-4)


def test_properties_identity_symmetry_loss(x64):
    x, y = _pair((3, 16, 16, 2), seed=8)
    f = jax.jit(ssim, static_argnames=("max_val", "padding"))
    loss = jax.jit(ssim_loss, static_argnames=("max_val",))
    np.testing.assert_allclose(np.asarray(f(x, x, max_val=1.0)), 1.0, rtol=0, atol=1e-12)
    np.testing.assert_allclose(np.asarray(f(x, x, max_val=1.0, padding="valid")), 1.0,
                               rtol=0, atol=1e-12)
    s = np.asarray(f(x, y, max_val=1.0))
    assert np.all(s < 0.99)
    np.testing.assert_allclose(np.asarray(f(y, x, max_val=1.0)), s, rtol=0, atol=1e-14)
    np.testing.assert_allclose(np.asarray(loss(x, y, max_val=1.0)), 1 - s, rtol=0, atol=1e-15)


@pytest.mark.parametrize("padding", ["same", "valid"])
def test_gradients_finite_at_equal_images(x64, padding):
    x, y = _pair((1, 13, 12, 2), seed=9)
    x, y = jnp.asarray(x), jnp.asarray(y)
    f = jax.jit(lambda a, b: ssim(a, b, max_val=1.0, padding=padding))
    check_grads(lambda a: f(a, x), (x,), order=2, modes=("rev",))
    check_grads(lambda a: f(a, y), (x,), order=2, modes=("rev",))
    f_any = jax.jit(lambda a, b: ssim(a, b, max_val=1.0, padding=padding,
                                      fast_reverse=False))
    check_grads(lambda a: f_any(a, x), (x,), order=1, modes=("fwd", "rev"))
    check_grads(lambda a: f_any(a, y), (x,), order=1, modes=("fwd", "rev"))
    g = jax.jit(jax.grad(lambda a: ssim_loss(a, x, max_val=1.0, padding=padding).sum()))(x)
    assert np.all(np.isfinite(np.asarray(g)))
    np.testing.assert_allclose(np.asarray(g), 0.0, rtol=0, atol=1e-12)  # SSIM max at x == y


def test_bad_arguments():
    x = jnp.zeros((1, 16, 16, 3))
    with pytest.raises(ValueError, match="x must be an NHWC batch"):
        ssim(x[0], x[0], max_val=1.0)
    with pytest.raises(ValueError, match="y must have the same shape"):
        ssim(x, x[..., :2], max_val=1.0)
    with pytest.raises(ValueError, match="padding"):
        ssim(x, x, max_val=1.0, padding="SAME")
    with pytest.raises(ValueError, match="filter_size"):
        ssim(x, x, max_val=1.0, filter_size=10)
    with pytest.raises(ValueError, match="filter_sigma"):
        ssim(x, x, max_val=1.0, filter_sigma=0.0)
    with pytest.raises(ValueError, match="max_val"):
        ssim(x, x, max_val=-1.0)
    with pytest.raises(ValueError, match="k2"):
        ssim(x, x, max_val=1.0, k2=-0.1)
    with pytest.raises(ValueError, match="filter_size=11"):
        ssim(x[:, :10], x[:, :10], max_val=1.0, padding="valid")


@pytest.mark.parametrize("padding", ["same", "valid"])
def test_custom_vjp_blur_equals_autodiff(x64, padding):
    """The blur's hand-written adjoint (reversed taps, complementary padding) against
    autodiff of the plain shifted-slice sum, for z and for asymmetric taps, float64."""
    mod = importlib.import_module("vtadl_jax.kernels.ssim")
    rng = np.random.default_rng(3)
    z = jnp.asarray(rng.standard_normal((2, 3, 17, 14)))  # planes: spatial axes last
    taps = jnp.asarray(rng.uniform(0.1, 1.0, 5))  # not symmetric: catches a missed flip
    out = mod._separable_blur(z, taps, padding)
    g = jnp.asarray(rng.standard_normal(out.shape))
    plain = lambda a, t: mod._plain_blur(a, t, padding)  # noqa: E731
    np.testing.assert_allclose(np.asarray(out), np.asarray(plain(z, taps)), rtol=0, atol=1e-13)
    got = jax.vjp(lambda a, t: mod._separable_blur(a, t, padding), z, taps)[1](g)
    want = jax.vjp(plain, z, taps)[1](g)
    for a, b in zip(got, want):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-12)
    # and the whole SSIM gradient equals plain autodiff's
    x, y = _pair((2, 15, 13, 3), seed=5)
    gf = jax.grad(lambda a: ssim(a, y, max_val=1.0, padding=padding).sum())(jnp.asarray(x))
    gp = jax.grad(lambda a: ssim(a, y, max_val=1.0, padding=padding,
                                 fast_reverse=False).sum())(jnp.asarray(x))
    np.testing.assert_allclose(np.asarray(gf), np.asarray(gp), rtol=0, atol=1e-13)
