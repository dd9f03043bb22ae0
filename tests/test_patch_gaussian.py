"""Tests of vtadl_jax.methods.patch_gaussian (PaDiM-style patch Gaussians) and the
backbone registry.

References are float64 NumPy/SciPy written here independently of the code under test:
np.cov per position, an explicit inverse for the Mahalanobis distance, PyTorch's
bilinear/nearest source-index formulas, scipy.ndimage.gaussian_filter.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import ndimage

from vtadl_jax.methods import patch_gaussian as pg
from vtadl_jax.models.backbones import registry


# ----------------------------------------------------------------------------------------
# NumPy references
# ----------------------------------------------------------------------------------------

def _np_bilinear_axis(x: np.ndarray, n_out: int, axis: int) -> np.ndarray:
    """PyTorch interpolate(mode="bilinear", align_corners=False) along one axis."""
    n_in = x.shape[axis]
    out = []
    for j in range(n_out):
        src = max((j + 0.5) * n_in / n_out - 0.5, 0.0)
        i0 = min(int(np.floor(src)), n_in - 1)
        i1 = min(i0 + 1, n_in - 1)
        lam = src - i0
        out.append((1 - lam) * np.take(x, i0, axis=axis) + lam * np.take(x, i1, axis=axis))
    return np.stack(out, axis=axis)


def np_bilinear(x: np.ndarray, size) -> np.ndarray:
    """(N, H, W[, C]) -> (N, H', W'[, C])."""
    return _np_bilinear_axis(_np_bilinear_axis(x, size[0], 1), size[1], 2)


def np_nearest(x: np.ndarray, size) -> np.ndarray:
    """PyTorch interpolate(mode="nearest"): src = min(floor(j * n_in / n_out), n_in - 1)."""
    rows = [min(int(np.floor(j * x.shape[1] / size[0])), x.shape[1] - 1) for j in range(size[0])]
    cols = [min(int(np.floor(j * x.shape[2] / size[1])), x.shape[2] - 1) for j in range(size[1])]
    return x[:, rows][:, :, cols]


def np_position_gaussians(feats: np.ndarray, eps: float):
    """feats (N, h, w, C) -> mean (P, C), np.cov(ddof=1) + eps I (P, C, C)."""
    n, h, w, c = feats.shape
    flat = feats.reshape(n, h * w, c).astype(np.float64)
    mean = flat.mean(axis=0)
    cov = np.stack([np.cov(flat[:, p], rowvar=False, ddof=1) for p in range(h * w)])
    return mean, cov + eps * np.eye(c)


def np_mahalanobis(feats: np.ndarray, mean: np.ndarray, cov: np.ndarray) -> np.ndarray:
    """feats (B, h, w, C) -> (B, h, w) sqrt((x - mu)^T inv(S) (x - mu))."""
    b, h, w, c = feats.shape
    d = feats.reshape(b, h * w, c).astype(np.float64) - mean
    prec = np.linalg.inv(cov)
    return np.sqrt(np.einsum("bpc,pcd,bpd->bp", d, prec, d)).reshape(b, h, w)


def _batches(feats: np.ndarray, sizes):
    start = 0
    for s in sizes:
        yield feats[start:start + s]
        start += s
    assert start == feats.shape[0]


def _spec(**kw) -> pg.PatchGaussianSpec:
    kw.setdefault("backbone", "efficientnet_lite0")
    kw.setdefault("stages", ("a",))
    return pg.PatchGaussianSpec(**kw)


# ----------------------------------------------------------------------------------------
# combine_stages, random_channel_subset, spec
# ----------------------------------------------------------------------------------------

@pytest.fixture
def stage_maps():
    rng = np.random.default_rng(0)
    return {"a": rng.standard_normal((2, 8, 6, 3)).astype(np.float32),
            "b": rng.standard_normal((2, 4, 3, 5)).astype(np.float32),
            "c": rng.standard_normal((2, 3, 2, 2)).astype(np.float32),
            "unused": rng.standard_normal((2, 1, 1, 7)).astype(np.float32)}


@pytest.mark.parametrize("mode", ["bilinear", "nearest"])
def test_combine_stages_matches_numpy(stage_maps, mode):
    ref_resize = np_bilinear if mode == "bilinear" else np_nearest
    out = np.asarray(pg.combine_stages(stage_maps, ("a", "b", "c"), mode))
    assert out.shape == (2, 8, 6, 3 + 5 + 2)
    # The first stage is on the grid already and is passed through unchanged.
    np.testing.assert_array_equal(out[..., :3], stage_maps["a"])
    np.testing.assert_allclose(out[..., 3:8], ref_resize(stage_maps["b"].astype(np.float64), (8, 6)),
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out[..., 8:], ref_resize(stage_maps["c"].astype(np.float64), (8, 6)),
                               rtol=1e-5, atol=1e-6)


def test_combine_stages_modes_differ(stage_maps):
    # Guards against "upsample" being ignored: the two modes give different grids.
    bil = np.asarray(pg.combine_stages(stage_maps, ("a", "b"), "bilinear"))
    near = np.asarray(pg.combine_stages(stage_maps, ("a", "b"), "nearest"))
    assert np.abs(bil[..., 3:] - near[..., 3:]).max() > 1e-2


def test_combine_stages_grid_of_first_stage(stage_maps):
    out = np.asarray(pg.combine_stages(stage_maps, ("b", "a"), "nearest"))
    assert out.shape == (2, 4, 3, 5 + 3)
    np.testing.assert_array_equal(out[..., :5], stage_maps["b"])


def test_combine_stages_channel_subset_order(stage_maps):
    full = np.asarray(pg.combine_stages(stage_maps, ("a", "b", "c"), "bilinear"))
    idx = (7, 0, 3, 9)  # deliberately unsorted: the order given is the order returned
    sub = np.asarray(pg.combine_stages(stage_maps, ("a", "b", "c"), "bilinear", idx))
    assert sub.shape == (2, 8, 6, 4)
    np.testing.assert_array_equal(sub, full[..., list(idx)])


def test_combine_stages_missing_stage(stage_maps):
    with pytest.raises(ValueError, match="nope"):
        pg.combine_stages(stage_maps, ("a", "nope"), "bilinear")


def test_random_channel_subset():
    a = pg.random_channel_subset(100, 30, seed=3)
    assert a == pg.random_channel_subset(100, 30, seed=3)
    assert a != pg.random_channel_subset(100, 30, seed=4)
    assert len(a) == 30 and len(set(a)) == 30
    assert list(a) == sorted(a) and min(a) >= 0 and max(a) < 100
    assert all(isinstance(i, int) for i in a)
    assert pg.random_channel_subset(5, 5, seed=0) == (0, 1, 2, 3, 4)
    for keep in (0, 101, -1):
        with pytest.raises(ValueError):
            pg.random_channel_subset(100, keep, seed=0)


def test_spec_validation_and_json_round_trip():
    with pytest.raises(ValueError):
        _spec(upsample="bicubic")
    with pytest.raises(ValueError):
        _spec(score_path="inverse")
    with pytest.raises(ValueError):
        _spec(stages=())
    spec = _spec(stages=("block3", "block5"), channel_indices=(1, 5, 9), eps=0.5)
    assert pg.PatchGaussianSpec.from_json(spec.to_json()) == spec


# ----------------------------------------------------------------------------------------
# fit_statistics / finalize_model
# ----------------------------------------------------------------------------------------

def _random_features(n, h, w, c, seed=0, offset=0.0):
    rng = np.random.default_rng(seed)
    mix = rng.standard_normal((c, c)) / np.sqrt(c)
    x = rng.standard_normal((n, h, w, c)) @ (np.eye(c) + mix)  # correlated channels
    return x + offset + rng.standard_normal((1, h, w, c))  # a different mean per position


def test_fit_matches_numpy_cov_float64(x64):
    feats = _random_features(40, 2, 3, 5)
    eps = 0.01
    stats, grid = pg.fit_statistics(_batches(feats, (16, 7, 1, 16)), dtype=jnp.float64)
    assert grid == (2, 3)
    assert float(stats.count) == 40
    model = pg.finalize_model(stats, grid, _spec(eps=eps))
    mean_ref, cov_ref = np_position_gaussians(feats, eps)
    assert model.num_images == 40 and model.grid == (2, 3)
    assert model.mean.dtype == jnp.float64
    np.testing.assert_allclose(np.asarray(model.mean), mean_ref, rtol=1e-12, atol=1e-12)
    chol = np.asarray(model.chol)
    np.testing.assert_allclose(chol @ np.swapaxes(chol, 1, 2), cov_ref, rtol=1e-10, atol=1e-12)
    np.testing.assert_array_equal(np.triu(chol, 1), 0)
    eye = np.broadcast_to(np.eye(5), cov_ref.shape)
    np.testing.assert_allclose(np.asarray(model.whiten) @ chol, eye, atol=1e-10)


def test_fit_eps_is_applied(x64):
    feats = _random_features(12, 1, 2, 3, seed=1)
    stats, grid = pg.fit_statistics(_batches(feats, (12,)), dtype=jnp.float64)
    m = pg.finalize_model(stats, grid, _spec(eps=0.5))
    _, cov_ref = np_position_gaussians(feats, 0.5)
    chol = np.asarray(m.chol)
    np.testing.assert_allclose(chol @ np.swapaxes(chol, 1, 2), cov_ref, rtol=1e-10)


@pytest.mark.parametrize("shard", [False, True])
def test_finalize_donating_stats_matches_numpy(x64, shard):
    # What `vtadl-jax fit` runs: the statistics' buffers are reused for the model.
    if shard and len(jax.devices()) != 8:
        pytest.skip("needs the 8 host CPU devices of tests/conftest.py")
    feats = _random_features(30, 4, 4, 6, seed=4)
    stats, grid = pg.fit_statistics(_batches(feats, (10, 20)), shard_positions=shard,
                                    dtype=jnp.float64)
    model = pg.finalize_model(stats, grid, _spec(eps=0.05), donate_stats=True)
    mean_ref, cov_ref = np_position_gaussians(feats, 0.05)
    assert model.num_images == 30
    np.testing.assert_allclose(np.asarray(model.mean), mean_ref, rtol=1e-12, atol=1e-12)
    chol = np.asarray(model.chol)
    np.testing.assert_allclose(chol @ np.swapaxes(chol, 1, 2), cov_ref, rtol=1e-10, atol=1e-12)
    eye = np.broadcast_to(np.eye(6), cov_ref.shape)
    np.testing.assert_allclose(np.asarray(model.whiten) @ chol, eye, atol=1e-10)
    if jax.default_backend() == "cpu":  # CPU implements donation: the moments were reused
        assert stats.m2.is_deleted()


def test_fit_float32_default_dtype():
    # Large common offset: a naive sum-of-squares fit would lose every digit in float32.
    feats = _random_features(64, 2, 2, 4, seed=2, offset=100.0)
    stats, grid = pg.fit_statistics(_batches(feats.astype(np.float32), (32, 32)))
    assert stats.m2.dtype == jnp.float32
    model = pg.finalize_model(stats, grid, _spec())
    mean_ref, cov_ref = np_position_gaussians(feats.astype(np.float32), 0.01)
    np.testing.assert_allclose(np.asarray(model.mean), mean_ref, rtol=1e-5)
    chol = np.asarray(model.chol, np.float64)
    np.testing.assert_allclose(chol @ np.swapaxes(chol, 1, 2), cov_ref, rtol=2e-4, atol=2e-4)


def test_fit_sharded_positions(x64):
    if len(jax.devices()) != 8:
        pytest.skip("needs the 8 host CPU devices of tests/conftest.py")
    feats = _random_features(24, 4, 4, 6, seed=3)  # 16 positions, divisible by 8
    sizes = (8, 8, 8)
    plain, grid = pg.fit_statistics(_batches(feats, sizes), dtype=jnp.float64)
    sharded, grid_s = pg.fit_statistics(_batches(feats, sizes), shard_positions=True,
                                        dtype=jnp.float64)
    assert grid_s == grid == (4, 4)
    # Really sharded: every device holds 16 / 8 = 2 positions' C x C moments.
    for arr in (sharded.m2, sharded.mean):
        assert len(arr.sharding.device_set) == 8
        assert not arr.sharding.is_fully_replicated
    shard_shapes = {s.data.shape for s in sharded.m2.addressable_shards}
    assert shard_shapes == {(2, 6, 6)}
    assert len(sharded.m2.addressable_shards) == 8
    np.testing.assert_allclose(np.asarray(sharded.m2), np.asarray(plain.m2), rtol=1e-12,
                               atol=1e-12)
    np.testing.assert_allclose(np.asarray(sharded.mean), np.asarray(plain.mean), rtol=1e-12,
                               atol=1e-12)
    model = pg.finalize_model(sharded, grid_s, _spec())
    mean_ref, cov_ref = np_position_gaussians(feats, 0.01)
    np.testing.assert_allclose(np.asarray(model.mean), mean_ref, rtol=1e-12, atol=1e-12)
    chol = np.asarray(model.chol)
    np.testing.assert_allclose(chol @ np.swapaxes(chol, 1, 2), cov_ref, rtol=1e-10, atol=1e-12)
    # Scoring with sharded parameters gives the NumPy distances too.
    test = _random_features(3, 4, 4, 6, seed=4)
    np.testing.assert_allclose(np.asarray(pg.distance_grid(model, jnp.asarray(test))),
                               np_mahalanobis(test, mean_ref, cov_ref), rtol=1e-9)


def test_fit_shard_positions_fallback_when_not_divisible(x64):
    feats = _random_features(10, 3, 3, 2, seed=5)  # 9 positions: stays on one device
    stats, grid = pg.fit_statistics(_batches(feats, (5, 5)), shard_positions=True,
                                    dtype=jnp.float64)
    mean_ref, _ = np_position_gaussians(feats, 0.01)
    np.testing.assert_allclose(np.asarray(stats.mean), mean_ref, rtol=1e-12)


def test_fit_bad_inputs():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="grid"):
        pg.fit_statistics(iter([rng.standard_normal((2, 4, 4, 3)),
                                rng.standard_normal((2, 4, 5, 3))]))
    with pytest.raises(ValueError):
        pg.fit_statistics(iter([rng.standard_normal((2, 16, 3))]))
    with pytest.raises(ValueError, match="channels"):
        pg.fit_statistics(iter([rng.standard_normal((2, 4, 4, 3)),
                                rng.standard_normal((2, 4, 4, 4))]))
    with pytest.raises(ValueError, match="empty"):
        pg.fit_statistics(iter([rng.standard_normal((0, 4, 4, 3))]))
    with pytest.raises(ValueError, match="at least one"):
        pg.fit_statistics(iter([]))


def test_finalize_single_image_raises():
    feats = np.random.default_rng(0).standard_normal((1, 2, 2, 3))
    stats, grid = pg.fit_statistics(iter([feats]))
    with pytest.raises(ValueError, match="at least 2"):
        pg.finalize_model(stats, grid, _spec())


# ----------------------------------------------------------------------------------------
# scoring
# ----------------------------------------------------------------------------------------

@pytest.fixture
def fitted64(x64):
    feats = _random_features(30, 3, 4, 5, seed=6)
    stats, grid = pg.fit_statistics(_batches(feats, (10, 20)), dtype=jnp.float64)
    mean_ref, cov_ref = np_position_gaussians(feats, 0.01)
    return stats, grid, mean_ref, cov_ref


def test_distance_grid_solve_whiten_numpy(fitted64):
    stats, grid, mean_ref, cov_ref = fitted64
    test = _random_features(4, 3, 4, 5, seed=7)
    test[1, 2, 3] += 5.0
    ref = np_mahalanobis(test, mean_ref, cov_ref)
    out = {}
    for path in ("solve", "whiten"):
        model = pg.finalize_model(stats, grid, _spec(score_path=path))
        out[path] = np.asarray(pg.distance_grid(model, jnp.asarray(test)))
        assert out[path].shape == (4, 3, 4)
        np.testing.assert_allclose(out[path], ref, rtol=1e-9)
    np.testing.assert_allclose(out["solve"], out["whiten"], rtol=1e-10)


def test_distance_grid_float32(fitted64):
    stats, grid, mean_ref, cov_ref = fitted64
    stats32 = jax.tree.map(lambda a: a.astype(jnp.float32), stats)
    test = _random_features(2, 3, 4, 5, seed=8)
    ref = np_mahalanobis(test, mean_ref, cov_ref)
    for path in ("solve", "whiten"):
        model = pg.finalize_model(stats32, grid, _spec(score_path=path))
        d = pg.distance_grid(model, jnp.asarray(test, jnp.float32))
        assert d.dtype == jnp.float32
        np.testing.assert_allclose(np.asarray(d), ref, rtol=1e-4)


def test_distance_grid_shape_errors(fitted64):
    stats, grid, *_ = fitted64
    model = pg.finalize_model(stats, grid, _spec())
    with pytest.raises(ValueError):
        pg.distance_grid(model, jnp.zeros((1, 4, 3, 5)))  # transposed grid
    with pytest.raises(ValueError):
        pg.distance_grid(model, jnp.zeros((1, 3, 4, 6)))  # wrong channels


@pytest.mark.parametrize("sigma", [4.0, 0.0])
def test_anomaly_maps_match_reference(fitted64, sigma):
    stats, grid, mean_ref, cov_ref = fitted64
    model = pg.finalize_model(stats, grid, _spec(blur_sigma=sigma))
    test = _random_features(3, 3, 4, 5, seed=9)
    maps, scores = pg.anomaly_maps(model, jnp.asarray(test), (24, 40))
    maps, scores = np.asarray(maps), np.asarray(scores)
    assert maps.shape == (3, 24, 40) and scores.shape == (3,)
    np.testing.assert_array_equal(scores, maps.reshape(3, -1).max(axis=1))
    ref = np_bilinear(np_mahalanobis(test, mean_ref, cov_ref), (24, 40))
    if sigma > 0:
        ref = np.stack([ndimage.gaussian_filter(m, sigma, mode="reflect", truncate=4.0)
                        for m in ref])
    np.testing.assert_allclose(maps, ref, rtol=1e-9, atol=1e-12)


def test_end_to_end_shifted_position_is_found():
    rng = np.random.default_rng(10)
    h = w = 4
    c = 8
    train = rng.standard_normal((256, h, w, c)).astype(np.float32)
    stats, grid = pg.fit_statistics(_batches(train, (32,) * 8))
    model = pg.finalize_model(stats, grid, _spec())
    test = rng.standard_normal((3, h, w, c)).astype(np.float32)
    test[1, 2, 1] += 10.0  # one anomalous patch, far from N(0, I)
    d = np.asarray(pg.distance_grid(model, jnp.asarray(test)))
    assert np.unravel_index(np.argmax(d[1]), d[1].shape) == (2, 1)
    assert d[1, 2, 1] > 5 * np.delete(d[1].ravel(), 2 * w + 1).max()
    size = 32  # each grid cell covers 8 x 8 pixels
    maps, scores = pg.anomaly_maps(model, jnp.asarray(test), (size, size))
    maps, scores = np.asarray(maps), np.asarray(scores)
    r, col = np.unravel_index(np.argmax(maps[1]), maps[1].shape)
    assert 16 <= r < 24 and 8 <= col < 16, (r, col)
    assert np.argmax(scores) == 1
    assert scores[1] > 2 * max(scores[0], scores[2])


# ----------------------------------------------------------------------------------------
# backbone registry
# ----------------------------------------------------------------------------------------

def test_efficientnet_random_features_shapes():
    backbone = registry.load_backbone("efficientnet_lite0", "random", seed=0)
    images = np.random.default_rng(0).random((2, 64, 64, 3), dtype=np.float32)
    feats = backbone.features(images)
    assert feats["block3"].shape == (2, 8, 8, 40)
    assert feats["block5"].shape == (2, 4, 4, 112)
    assert feats["head"].shape == (2, 2, 2, 1280)
    stages = registry.DEFAULT_STAGES["efficientnet_lite0"]
    combined = pg.combine_stages(feats, stages, "bilinear")
    assert combined.shape == (2, 8, 8, 152)
    assert bool(jnp.all(jnp.isfinite(combined)))
    # Not degenerate: different images give different features of a sane scale.
    assert float(jnp.abs(feats["block5"][0] - feats["block5"][1]).max()) > 0
    assert 1e-2 < float(jnp.std(feats["block5"])) < 1e2
    # Random weights are seeded: same seed -> same variables, another seed -> others.
    same = registry.random_variables(backbone.module, seed=0)
    other = registry.random_variables(backbone.module, seed=1)
    leaves = jax.tree.leaves(backbone.variables["params"])
    assert all(np.array_equal(a, b) for a, b in zip(leaves, jax.tree.leaves(same["params"])))
    assert not all(np.array_equal(a, b) for a, b in zip(leaves, jax.tree.leaves(other["params"])))
    with pytest.raises(ValueError):
        backbone.features(images[..., :1])  # not RGB


def test_contnet_requires_weights():
    with pytest.raises(ValueError, match="checkpoint"):
        registry.load_backbone("contnet_b")
    with pytest.raises(ValueError, match="backbone"):
        registry.load_backbone("resnet18", "random")


def test_contnet_tiny_random_features():
    backbone = registry.load_backbone("contnet_tiny", "random")
    assert backbone.input_multiple == 64
    feats = backbone.features(np.zeros((1, 64, 64, 3), np.float32))
    assert feats["stage3"].shape == (1, 2, 2, 64) and feats["stage4"].shape == (1, 2, 2, 128)
    assert bool(jnp.all(jnp.isfinite(feats["stage4"])))
    with pytest.raises(ValueError, match="multiple"):
        backbone.features(np.zeros((1, 48, 48, 3), np.float32))


def test_process_share_bounds_cover_every_example_once():
    from vtadl_jax import multihost

    for n in (0, 1, 5, 7, 64):
        for count in (1, 2, 3, 8):
            bounds = [multihost.share_bounds(n, i, count) for i in range(count)]
            assert bounds[0][0] == 0 and bounds[-1][1] == n
            assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))  # contiguous
            sizes = [stop - start for start, stop in bounds]
            assert max(sizes) - min(sizes) <= 1
    for bad in ((5, 2, 2), (5, -1, 2), (5, 0, 0), (-1, 0, 1)):
        with pytest.raises(ValueError):
            multihost.share_bounds(*bad)


def test_source_share_is_a_view():
    from vtadl_jax import multihost

    class Source:
        name, split = "numbers", "train"

        def __len__(self):
            return 10

        def __getitem__(self, i):
            return {"image": i}

    part = multihost.share(Source(), 1, 3)  # [3, 6)
    assert len(part) == 3 and [part[i]["image"] for i in range(3)] == [3, 4, 5]
    assert (part.name, part.split) == ("numbers", "train")
    with pytest.raises(IndexError):
        part[3]
    with pytest.raises(ValueError):
        multihost.SourceShare(Source(), 4, 11)
    whole = multihost.share(Source())  # one process: everything
    assert len(whole) == 10


def test_multihost_helpers_in_one_process():
    from vtadl_jax import multihost

    assert jax.process_count() == 1
    calls = []
    assert multihost.process_0_first(lambda: calls.append(1) or "built", "data_train") == "built"
    assert calls == [1]  # run once, here
    multihost.barrier("anything")  # returns at once
    with pytest.raises(KeyError):  # an error of process 0's step is its own
        multihost.process_0_first(lambda: {}["x"], "data_test")
