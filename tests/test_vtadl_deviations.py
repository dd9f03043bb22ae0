"""Named VT-ADL deviations (off by default) that make the paper head work on real images:
density_stop_gradient (model), scale_floor as a variance floor (model) and
nll_normalization="per_position" (scoring). References: autodiff on the loss terms, the
Gaussian constant, and NumPy statistics of the raw scores."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vtadl_jax.methods.vtadl_scoring import (STD_EPS, anomaly_map, position_statistics,
                                             predict)
from vtadl_jax.models.mdn import MixtureDensityHead, patch_nll
from vtadl_jax.models.variants import get_variant
from vtadl_jax.train.state import init_variables
from vtadl_jax.train.step import LossConfig, vtadl_losses

RNGS = {"params": jax.random.PRNGKey(0), "noise": jax.random.PRNGKey(1)}


def _grads(model, variables, images, cfg):
    def loss(params):
        out, _ = model.apply({"params": params, "batch_stats": variables["batch_stats"]},
                             images, train=True, rngs=RNGS, mutable=["batch_stats"])
        return vtadl_losses(model, params, out, images, cfg)["loss"]

    return jax.value_and_grad(loss)(variables["params"])


def _norm(tree) -> float:
    return float(sum(jnp.sum(jnp.abs(x)) for x in jax.tree.leaves(tree)))


def test_density_stop_gradient_trains_head_not_encoder():
    paper = get_variant("tiny")
    stop = get_variant("tiny", density_stop_gradient=True)
    variables = init_variables(paper, jax.random.PRNGKey(0), (32, 32, 3))
    x = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (2, 32, 32, 3)), jnp.float32)
    nll_only = LossConfig(nll_weight=1.0, mse_weight=0.0, ssim_weight=0.0)
    v_paper, g_paper = _grads(paper, variables, x, nll_only)
    v_stop, g_stop = _grads(stop, variables, x, nll_only)
    np.testing.assert_allclose(v_stop, v_paper, rtol=1e-6)  # same forward value
    assert _norm(g_paper["encoder"]) > 0  # the paper's NLL trains the encoder ...
    assert _norm(g_stop["encoder"]) == 0.0  # ... the option's does not
    assert _norm(g_stop["mdn"]) > 0
    np.testing.assert_allclose(_norm(g_stop["mdn"]), _norm(g_paper["mdn"]), rtol=1e-5)
    # the reconstruction terms train the encoder exactly as before
    recon_only = LossConfig(nll_weight=0.0)
    _, r_paper = _grads(paper, variables, x, recon_only)
    _, r_stop = _grads(stop, variables, x, recon_only)
    for a, b in zip(jax.tree.leaves(r_paper["encoder"]), jax.tree.leaves(r_stop["encoder"])):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-8)


def test_scale_floor_one_bounds_the_paper_nll_below():
    """With every std >= 1, -log N(z; mu, diag s^2) >= D/2 log(2 pi) for any mixture."""
    d, k = 6, 3
    z = jax.random.normal(jax.random.PRNGKey(0), (4, 5, d))
    bound = 0.5 * d * math.log(2 * math.pi)
    for floor, below in ((1.0, False), (1e-3, True)):
        head = MixtureDensityHead(k, "paper", scale_floor=floor)
        v = head.init(jax.random.PRNGKey(1), z)
        # a head that predicts mean = z (identity kernel) and scales at the floor: the
        # NLL's degenerate optimum, reachable whatever z is
        p = jax.tree.map(jnp.zeros_like, v["params"])
        p["means"]["kernel"] = jnp.tile(jnp.eye(d), (1, k))
        p["scales"]["bias"] = jnp.full_like(p["scales"]["bias"], -30.0)  # softplus ~ 0
        nll = patch_nll(z, head.apply({"params": p}, z))
        expected = bound + d * math.log(floor + math.log1p(math.exp(-30.0)))
        np.testing.assert_allclose(nll, expected, rtol=1e-5, atol=1e-4)
        assert bool(jnp.all(nll < bound - 1.0)) == below
        if not below:  # any head with the floor, e.g. the initial one, respects the bound
            assert bool(jnp.all(patch_nll(z, head.apply(v, z)) >= bound - 1e-4))


@pytest.fixture(scope="module")
def tiny():
    model = get_variant("tiny")
    variables = init_variables(model, jax.random.PRNGKey(0), (32, 32, 3))
    return model, variables


def test_per_position_normalisation_matches_numpy(tiny):
    model, variables = tiny
    rng = np.random.default_rng(0)
    train = rng.uniform(-1, 1, (7, 32, 32, 3)).astype(np.float32)
    test = rng.uniform(-1, 1, (3, 32, 32, 3)).astype(np.float32)
    raw_train = predict(model, variables, train, batch_size=4)["patch_nll"].astype(np.float64)
    mean, std = position_statistics(model, variables, train, batch_size=4)
    assert mean.shape == std.shape == (4, 4)
    np.testing.assert_allclose(mean, raw_train.mean(0), rtol=1e-5)
    np.testing.assert_allclose(std, raw_train.std(0), rtol=1e-4)

    raw = predict(model, variables, test, batch_size=4)
    out = predict(model, variables, test, batch_size=4, nll_normalization="per_position",
                  position_stats=(mean, std))
    ref = (raw["patch_nll"] - mean) / (std + STD_EPS)
    np.testing.assert_allclose(out["patch_nll"], ref, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(out["max_nll"], ref.reshape(3, -1).max(1), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(out["image_score"], raw["mse"] + 1 - raw["ssim"] + out["max_nll"],
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out["anomaly_map"],
                               anomaly_map(jnp.asarray(ref, jnp.float32), (32, 32)), atol=1e-4)
    # the training images themselves: zero mean per position
    again = predict(model, variables, train, batch_size=4, nll_normalization="per_position",
                    position_stats=(mean, std))["patch_nll"]
    np.testing.assert_allclose(again.mean(0), 0.0, atol=1e-3)


def test_per_position_normalisation_errors(tiny):
    model, variables = tiny
    x = np.zeros((1, 32, 32, 3), np.float32)
    with pytest.raises(ValueError, match="position_stats"):
        predict(model, variables, x, nll_normalization="per_position")
    with pytest.raises(ValueError, match="nll_normalization"):
        predict(model, variables, x, nll_normalization="global")


def test_bottle_config_settings():
    """experiments/configs/vtadl_bottle.py: "paper" is the paper's behaviour (every
    deviation off), the others differ only by named options."""
    import os

    from vtadl_jax.configs import load_config
    from vtadl_jax.pipelines.vtadl import scoring_options
    from vtadl_jax.train.loop import build_model

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                        "experiments", "configs", "vtadl_bottle.py")
    paper = load_config(path + ":paper")
    model = build_model(paper)
    assert model.mdn_head == "paper" and model.scale_floor == 1e-3
    assert not model.density_stop_gradient and model.noise_std == 0.2
    assert scoring_options(paper).get("nll_normalization", "none") == "none"
    recorded = load_config(path)  # default setting: the paper's model without noise
    assert scoring_options(recorded).get("nll_normalization", "none") == "none"
    assert build_model(recorded) == model.clone(noise_std=0.0)
    fixed = load_config(path + ":fixed")
    assert scoring_options(fixed)["nll_normalization"] == "per_position"
    assert build_model(fixed) == model  # keeps the paper's model
    floor = build_model(load_config(path + ":floor_stopgrad"))
    assert floor.scale_floor == 1.0 and floor.density_stop_gradient
    with pytest.raises(ValueError, match="arg must be one of"):
        load_config(path + ":nope")
