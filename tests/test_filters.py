"""Tests for vtadl_jax.kernels.filters against SciPy, NumPy references and (optionally) torch.

Tolerances: float64 results agree with float64 references to 1e-12 (Gaussian blur: the
brief's 1e-10 bound, observed ~1e-16); float32 blur to atol 1e-6 for unit-range data;
float32 bilinear vs torch float32 to atol 3e-6 (both round the source coordinate, e.g.
16/7 * 6.5, to float32: ~1e-6 pixel, times the local slope of N(0, 1) data).
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import ndimage

from vtadl_jax.kernels.filters import (gaussian_blur, gaussian_kernel1d, resize_bilinear,
                                       resize_nearest)


# ----------------------------------------------------------------------------- Gaussian


@pytest.mark.parametrize("sigma, taps", [(4.0, 33), (1.5, 13), (0.5, 5), (2.2, 19)])
def test_kernel1d_matches_scipy_impulse_response(x64, sigma, taps):
    k = np.asarray(gaussian_kernel1d(sigma))
    assert k.shape == (taps,) and k.dtype == np.float64
    impulse = np.zeros(101)
    impulse[50] = 1.0
    r = (taps - 1) // 2
    ref = ndimage.gaussian_filter1d(impulse, sigma)[50 - r:50 + r + 1]
    np.testing.assert_allclose(k, ref, rtol=0, atol=1e-15)
    assert ndimage.gaussian_filter1d(impulse, sigma)[50 + r + 1] == 0.0  # radius matches
    np.testing.assert_allclose(k.sum(), 1.0, rtol=0, atol=1e-15)


def test_kernel1d_truncate_and_padim_size():
    for sigma in (1.0, 2.0, 4.0, 3.3):
        assert gaussian_kernel1d(sigma).shape[0] == 2 * int(4 * sigma + 0.5) + 1
    assert gaussian_kernel1d(2.0, truncate=2.0).shape == (9,)
    assert gaussian_kernel1d(2.0, truncate=0.0).shape == (1,)


@pytest.mark.parametrize("shape, sigma", [((3, 20, 17), 0.7), ((2, 2, 24, 31), 2.0),
                                          ((40, 33), 4.0), ((1, 16, 16), 1.5)])
def test_blur_matches_scipy_float64(x64, shape, sigma):
    rng = np.random.default_rng(0)
    maps = rng.standard_normal(shape)
    out = np.asarray(gaussian_blur(jnp.asarray(maps), sigma))
    ref = np.stack([ndimage.gaussian_filter(m, sigma) for m in maps.reshape((-1,) + shape[-2:])])
    assert out.dtype == np.float64
    np.testing.assert_allclose(out, ref.reshape(shape), rtol=0, atol=1e-12)


@pytest.mark.parametrize("shape, sigma", [((2, 5, 3), 4.0), ((1, 1, 1), 2.0), ((3, 2, 40), 3.0),
                                          ((1, 7, 9), 10.0)])
def test_blur_maps_smaller_than_radius_reflect_repeatedly(x64, shape, sigma):
    """radius (e.g. 16 for sigma 4) exceeds the map size: SciPy folds the reflection."""
    rng = np.random.default_rng(1)
    maps = rng.standard_normal(shape)
    out = np.asarray(gaussian_blur(jnp.asarray(maps), sigma))
    ref = np.stack([ndimage.gaussian_filter(m, sigma) for m in maps])
    np.testing.assert_allclose(out, ref, rtol=0, atol=1e-12)


def test_blur_truncate_and_float32_jit():
    rng = np.random.default_rng(2)
    maps = rng.random((4, 28, 30)).astype(np.float32)
    f = jax.jit(functools.partial(gaussian_blur, sigma=4.0, truncate=2.5))
    out = np.asarray(f(maps))
    assert out.dtype == np.float32 and out.shape == maps.shape
    ref = np.stack([ndimage.gaussian_filter(m.astype(np.float64), 4.0, truncate=2.5) for m in maps])
    np.testing.assert_allclose(out, ref, rtol=0, atol=1e-6)


def test_blur_int_input_promoted_and_constant_preserved(x64):
    out = gaussian_blur(jnp.full((2, 5, 6), 3, jnp.int32), 1.0)
    assert jnp.issubdtype(out.dtype, jnp.floating)
    np.testing.assert_allclose(np.asarray(out), 3.0, rtol=0, atol=1e-13)


@pytest.mark.parametrize("sigma", [0.0, -1.0, float("nan")])
def test_blur_bad_sigma(sigma):
    with pytest.raises(ValueError, match="sigma"):
        gaussian_blur(jnp.zeros((2, 4, 4)), sigma)
    with pytest.raises(ValueError, match="sigma"):
        gaussian_kernel1d(sigma)


def test_blur_bad_rank_and_truncate():
    with pytest.raises(ValueError, match="maps"):
        gaussian_blur(jnp.zeros((5,)), 1.0)
    with pytest.raises(ValueError, match="truncate"):
        gaussian_blur(jnp.zeros((4, 4)), 1.0, truncate=-1.0)


# ----------------------------------------------------------------------------- resize


def _bilinear_reference(x: np.ndarray, size, align_corners: bool) -> np.ndarray:
    """PyTorch's bilinear interpolation written from its definition, 2-D per output pixel."""
    n_h, n_w = x.shape[1], x.shape[2]

    def source(j, n_in, n_out):
        if align_corners:
            return j * ((n_in - 1) / (n_out - 1)) if n_out > 1 else 0.0 * j
        return np.maximum((j + 0.5) * n_in / n_out - 0.5, 0.0)

    sy = source(np.arange(size[0], dtype=np.float64), n_h, size[0])
    sx = source(np.arange(size[1], dtype=np.float64), n_w, size[1])
    y0 = np.floor(sy).astype(int)
    x0 = np.floor(sx).astype(int)
    y1 = np.minimum(y0 + 1, n_h - 1)
    x1 = np.minimum(x0 + 1, n_w - 1)
    wy = (sy - y0)[:, None]
    wx = (sx - x0)[None, :]
    if x.ndim == 4:
        wy, wx = wy[..., None], wx[..., None]
    g = lambda yy, xx: x[:, yy][:, :, xx]  # noqa: E731
    return ((1 - wy) * (1 - wx) * g(y0, x0) + (1 - wy) * wx * g(y0, x1)
            + wy * (1 - wx) * g(y1, x0) + wy * wx * g(y1, x1))


_RESIZE_CASES = [((2, 8, 8), (64, 64)), ((2, 5, 7), (13, 4)), ((1, 16, 16, 3), (7, 33)),
                 ((3, 31, 9, 2), (31, 9)), ((1, 6, 6), (1, 1)), ((1, 1, 5), (4, 3)),
                 ((2, 224, 200), (28, 33))]


@pytest.mark.parametrize("align_corners", [False, True])
@pytest.mark.parametrize("shape, size", _RESIZE_CASES)
def test_bilinear_matches_numpy_definition(x64, shape, size, align_corners):
    x = np.random.default_rng(3).standard_normal(shape)
    out = np.asarray(resize_bilinear(jnp.asarray(x), size, align_corners=align_corners))
    assert out.shape == (shape[0],) + tuple(size) + tuple(shape[3:])
    ref = _bilinear_reference(x, size, align_corners)
    np.testing.assert_allclose(out, ref, rtol=0, atol=1e-12)


@pytest.mark.torch
@pytest.mark.parametrize("dtype, atol", [(np.float64, 1e-12), (np.float32, 3e-6)])
@pytest.mark.parametrize("align_corners", [False, True])
@pytest.mark.parametrize("shape, size", _RESIZE_CASES)
def test_bilinear_matches_torch(x64, shape, size, align_corners, dtype, atol):
    torch = pytest.importorskip("torch")
    x = np.random.default_rng(4).standard_normal(shape).astype(dtype)
    out = np.asarray(resize_bilinear(jnp.asarray(x), size, align_corners=align_corners))
    assert out.dtype == dtype
    t = torch.from_numpy(x)
    t = t[:, None] if x.ndim == 3 else t.permute(0, 3, 1, 2)
    ref = torch.nn.functional.interpolate(t, size=tuple(size), mode="bilinear",
                                          align_corners=align_corners, antialias=False)
    ref = ref[:, 0] if x.ndim == 3 else ref.permute(0, 2, 3, 1)
    np.testing.assert_allclose(out, ref.numpy(), rtol=0, atol=atol)


def test_bilinear_jit_static_size_and_identity():
    x = np.random.default_rng(5).random((2, 9, 11, 3)).astype(np.float32)
    f = jax.jit(resize_bilinear, static_argnames=("size", "align_corners"))
    np.testing.assert_array_equal(np.asarray(f(x, size=(9, 11))), x)
    np.testing.assert_array_equal(np.asarray(f(x, size=(9, 11), align_corners=True)), x)


_NEAREST_CASES = [(8, 64), (64, 8), (7, 3), (3, 7), (5, 10), (10, 5), (224, 28), (28, 56),
                  (3, 123), (2, 82), (13, 200), (200, 13), (1, 5), (6, 1)]


def test_nearest_integer_ratios_match_exact_definition():
    """For these sizes float32 rounding is harmless: src = floor(j * n_in / n_out)."""
    x = np.arange(2 * 12 * 10, dtype=np.int32).reshape(2, 12, 10)
    for (h, w) in [(24, 5), (6, 20), (36, 30), (4, 2), (12, 10)]:
        ref = x[:, (np.arange(h) * 12) // h][:, :, (np.arange(w) * 10) // w]
        np.testing.assert_array_equal(np.asarray(resize_nearest(x, (h, w))), ref)
    assert resize_nearest(x, (5, 5)).dtype == x.dtype


@pytest.mark.torch
@pytest.mark.parametrize("n_in, n_out", _NEAREST_CASES)
def test_nearest_matches_torch_float32(n_in, n_out):
    torch = pytest.importorskip("torch")
    x = np.random.default_rng(6).standard_normal((2, n_in, n_in + 1, 2)).astype(np.float32)
    size = (n_out, n_out + 3)
    out = np.asarray(resize_nearest(jnp.asarray(x), size))
    ref = torch.nn.functional.interpolate(torch.from_numpy(x).permute(0, 3, 1, 2), size=size,
                                          mode="nearest").permute(0, 2, 3, 1).numpy()
    np.testing.assert_array_equal(out, ref)


@pytest.mark.parametrize("fn", [resize_bilinear, resize_nearest])
def test_resize_bad_arguments(fn):
    with pytest.raises(ValueError, match="x must have shape"):
        fn(jnp.zeros((4, 4)), (2, 2))
    with pytest.raises(ValueError, match="x must have shape"):
        fn(jnp.zeros((1, 2, 4, 4, 1)), (2, 2))
    with pytest.raises(ValueError, match="size"):
        fn(jnp.zeros((1, 4, 4)), (0, 2))
    with pytest.raises(ValueError, match="size"):
        fn(jnp.zeros((1, 4, 4)), (2, 2, 2))
    with pytest.raises(ValueError, match="size"):
        fn(jnp.zeros((1, 4, 4)), 3)
