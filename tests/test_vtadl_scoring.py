"""VT-ADL scoring tests: map computation vs NumPy/SciPy, score forms, predict()."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import ndimage

from vtadl_jax.methods.vtadl_scoring import anomaly_map, image_score, predict
from vtadl_jax.models.mdn import SOFTPLUS_INV_ONE
from vtadl_jax.models.variants import get_variant
from vtadl_jax.train.state import init_variables


def _bilinear_align_corners_np(m: np.ndarray, size: int) -> np.ndarray:
    """Independent reference: separable np.interp on corner-aligned coordinates."""
    g = m.shape[-1]
    src = np.arange(size) * (g - 1) / (size - 1)
    rows = np.stack([np.interp(src, np.arange(g), r) for r in m])       # (g, size)
    return np.stack([np.interp(src, np.arange(g), c) for c in rows.T]).T  # (size, size)


def test_anomaly_map_matches_numpy_scipy(x64):
    grid = np.random.default_rng(0).gamma(2.0, size=(2, 4, 4))
    got = np.asarray(anomaly_map(jnp.asarray(grid), (32, 32), align_corners=True, sigma=4.0))
    for b in range(2):
        ref = ndimage.gaussian_filter(_bilinear_align_corners_np(grid[b], 32), 4.0,
                                      mode="reflect", truncate=4.0)
        np.testing.assert_allclose(got[b], ref, rtol=1e-10, atol=1e-12)
    raw = np.asarray(anomaly_map(jnp.asarray(grid), (32, 32), sigma=0.0))
    np.testing.assert_allclose(raw[1], _bilinear_align_corners_np(grid[1], 32), rtol=1e-12)
    np.testing.assert_allclose(raw[:, ::31, ::31], grid[:, ::3, ::3])  # corners aligned


def test_anomaly_map_align_corners_false_matches_torch():
    torch = pytest.importorskip("torch")
    grid = np.random.default_rng(1).normal(size=(2, 4, 4)).astype(np.float32)
    got = np.asarray(anomaly_map(jnp.asarray(grid), (28, 28), align_corners=False, sigma=0.0))
    ref = torch.nn.functional.interpolate(torch.tensor(grid)[:, None], size=(28, 28),
                                          mode="bilinear", align_corners=False)[:, 0].numpy()
    np.testing.assert_allclose(got, ref, atol=1e-6)


def test_image_score_forms():
    mse, s, mx = jnp.array([0.1, 0.2]), jnp.array([0.9, 0.5]), jnp.array([3.0, 7.0])
    np.testing.assert_allclose(image_score(mse, s, mx), [0.1 + 0.1 + 3.0, 0.2 + 0.5 + 7.0])
    np.testing.assert_allclose(image_score(mse, s, mx, "vtadl_code"), [4.0, 7.7], rtol=1e-6)
    np.testing.assert_allclose(image_score(mse, s, mx, "reconstruction"), [0.2, 0.7], rtol=1e-6)
    with pytest.raises(ValueError, match="score_form"):
        image_score(mse, s, mx, "bogus")


@pytest.fixture(scope="module")
def tiny():
    model = get_variant("tiny")
    variables = init_variables(model, jax.random.PRNGKey(0), (32, 32, 3))
    # A known density: every component N(0, I) (zero kernels, unit scales), so the
    # patch NLL is 0.5 |z|^2 / s^2 + D/2 log(2 pi) + D log s, s = 1 + floor.
    mdn = jax.tree.map(jnp.zeros_like, variables["params"]["mdn"])
    mdn["scales"]["bias"] = jnp.full_like(mdn["scales"]["bias"], SOFTPLUS_INV_ONE)
    params = dict(variables["params"], mdn=mdn)
    return model, {"params": params, "batch_stats": variables["batch_stats"]}


def test_predict_shapes_padding_and_planted_anomaly(tiny):
    model, variables = tiny
    rng = np.random.default_rng(0)
    images = rng.uniform(-0.2, 0.2, (5, 32, 32, 3)).astype(np.float32)
    images[3, 8:16, 16:24, :] = 40.0  # planted: one patch (row 1, col 2) far off-range
    out = predict(model, variables, images, batch_size=4)
    assert out["patch_nll"].shape == (5, 4, 4)
    assert out["anomaly_map"].shape == (5, 32, 32)
    for k in ("image_score", "mse", "ssim", "max_nll"):
        assert out[k].shape == (5,)
    # the padded last chunk does not change results (eval mode: images independent)
    again = predict(model, variables, images[3:], batch_size=2)
    np.testing.assert_allclose(again["patch_nll"], out["patch_nll"][3:], rtol=1e-5)
    # the known density: NLL = 0.5 |z|^2 / s^2 + const; the planted patch scores highest
    z = model.apply(variables, jnp.asarray(images[:1]), train=False)["embeddings"][0]
    d, scale = z.shape[-1], 1.0 + model.scale_floor
    const = 0.5 * d * np.log(2 * np.pi) + d * np.log(scale)
    np.testing.assert_allclose(out["patch_nll"][0].ravel(),
                               0.5 * np.sum(np.square(z), -1) / scale**2 + const, rtol=1e-4)
    assert np.unravel_index(np.argmax(out["patch_nll"][3]), (4, 4)) == (1, 2)
    peak = np.unravel_index(np.argmax(out["anomaly_map"][3]), (32, 32))
    assert 4 <= peak[0] < 20 and 12 <= peak[1] < 28  # within about one patch of it
    assert out["image_score"][3] > out["image_score"][[0, 1, 2, 4]].max()
    np.testing.assert_allclose(out["max_nll"], out["patch_nll"].reshape(5, -1).max(1))
    np.testing.assert_allclose(out["image_score"],
                               out["mse"] + 1 - out["ssim"] + out["max_nll"], rtol=1e-6)


def test_predict_options(tiny):
    model, variables = tiny
    images = np.random.default_rng(2).uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32)
    rec = predict(model, variables, images, score_form="reconstruction", keep_recon=True)
    assert rec["recon"].shape == images.shape
    np.testing.assert_allclose(rec["image_score"], rec["mse"] + 1 - rec["ssim"], rtol=1e-6)
    code = predict(model, variables, images, score_form="vtadl_code", map_sigma=0.0,
                   align_corners=False)
    np.testing.assert_allclose(code["image_score"],
                               code["mse"] + code["ssim"] + code["max_nll"], rtol=1e-6)
    with pytest.raises(ValueError, match="score_form"):
        predict(model, variables, images, score_form="nope")
