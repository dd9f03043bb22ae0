"""EfficientNet-Lite0: conversion of the real ImageNet weights, parity with the PyTorch
reference (efficientnet_lite_pytorch, optional) and ImageNet predictions on photos.

Measured on CPU, float32, 2 random N(0, 1) images of 224x224: max |logit difference| to
the PyTorch reference 3.5e-6 to 4.7e-6 between runs (logits up to ~7); stage features
agree to <= 7e-5 absolute on values up to ~80. Asserted: 1e-3 on logits, features within
rtol 1e-4 + 1e-5 * max|feature|.
"""
from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from vtadl_jax.convert.efficientnet_lite import (
    CheckpointMismatchError, efficientnet_lite_to_flax, find_efficientnet_lite0_weights,
    flax_to_efficientnet_lite, load_efficientnet_lite0,
)
from vtadl_jax.convert.pth import load_pth
from vtadl_jax.models.backbones.efficientnet_lite import EfficientNetLite0, normalize

# ImageNet-1k class indices (standard ILSVRC-2012 ordering) used by the assertions below.
IMAGENET = {"tabby": 281, "tiger cat": 282, "Egyptian cat": 285, "coffee mug": 504,
            "espresso": 967, "cup": 968}
CAT_CLASSES = {IMAGENET["tabby"], IMAGENET["tiger cat"], IMAGENET["Egyptian cat"]}
COFFEE_CLASSES = {IMAGENET["espresso"], IMAGENET["cup"], IMAGENET["coffee mug"]}

# Shapes at 224x224 from the architecture (Tan & Le 2019, Table 1; Lite: fixed stem/head).
SHAPES_224 = {"stem": (112, 112, 32), "block1": (112, 112, 16), "block2": (56, 56, 24),
              "block3": (28, 28, 40), "block4": (14, 14, 80), "block5": (14, 14, 112),
              "block6": (7, 7, 192), "block7": (7, 7, 320), "head": (7, 7, 1280),
              "pooled": (1280,), "logits": (1000,)}
# index of the last block of each stage in the PyTorch ModuleList (repeats 1,2,2,3,3,4,1)
LAST_BLOCK = {"block1": 0, "block2": 2, "block3": 4, "block4": 7, "block5": 10,
              "block6": 14, "block7": 15}


@pytest.fixture(scope="module")
def weights_path():
    try:
        return find_efficientnet_lite0_weights()
    except FileNotFoundError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def lite0(weights_path):
    model, variables = load_efficientnet_lite0(weights_path)
    apply = jax.jit(lambda v, x: model.apply(v, x))
    return model, variables, apply


def test_all_tensors_consumed_and_round_trip(weights_path):
    sd = load_pth(weights_path)
    assert len(sd) == 296
    variables = efficientnet_lite_to_flax(sd)
    flat = traverse_util.flatten_dict(variables)
    n_bn = sum(1 for k in sd if k.endswith("num_batches_tracked"))
    assert n_bn == 49 and len(flat) == 296 - n_bn  # everything else became a variable
    back = flax_to_efficientnet_lite(variables)
    assert set(back) == set(sd)
    for k, v in sd.items():
        np.testing.assert_array_equal(back[k], v if "num_batches" not in k else 0, err_msg=k)
    # layout facts: depthwise OIHW (C,1,k,k) -> HWIO (k,k,1,C); linear (out,in) -> (in,out)
    dw = variables["params"]["blocks_15"]["depthwise_conv"]["kernel"]
    assert dw.shape == (3, 3, 1, 1152)
    torch_dw = sd["_blocks.15._depthwise_conv.weight"]
    np.testing.assert_array_equal(dw[1, 2, 0, 7], torch_dw[7, 0, 1, 2])
    stem = variables["params"]["conv_stem"]["kernel"]
    np.testing.assert_array_equal(stem[0, 1, 2, 5], sd["_conv_stem.weight"][5, 2, 0, 1])
    np.testing.assert_array_equal(variables["params"]["fc"]["kernel"], sd["_fc.weight"].T)
    np.testing.assert_array_equal(variables["batch_stats"]["bn1"]["var"], sd["_bn1.running_var"])


def test_mismatch_lists_every_problem(weights_path):
    sd = dict(load_pth(weights_path))
    del sd["_blocks.3._bn0.running_mean"], sd["_fc.bias"]
    sd["_extra.weight"] = np.zeros(3, np.float32)
    sd["_conv_head.weight"] = np.zeros((1280, 320, 3, 3), np.float32)
    with pytest.raises(CheckpointMismatchError) as err:
        efficientnet_lite_to_flax(sd, source="demo.pth")
    msg = str(err.value)
    for needle in ("demo.pth", "missing (2)", "_blocks.3._bn0.running_mean", "_fc.bias",
                   "unexpected (1)", "_extra.weight", "mis-shaped (1)",
                   "_conv_head.weight: got (1280, 320, 3, 3), expected (1280, 320, 1, 1)"):
        assert needle in msg, (needle, msg)


def test_stage_shapes_224(lite0):
    model, variables, apply = lite0
    out = apply(variables, jnp.zeros((2, 224, 224, 3)))
    assert {k: tuple(v.shape[1:]) for k, v in out.items()} == SHAPES_224
    assert all(v.shape[0] == 2 for v in out.values())


def _photo(name: str) -> np.ndarray:
    """A scikit-image photo resized (with anti-aliasing) to 224x224, RGB in [0, 1]."""
    data = pytest.importorskip("skimage.data")
    transform = pytest.importorskip("skimage.transform")
    img = getattr(data, name)()
    return transform.resize(img, (224, 224), anti_aliasing=True).astype(np.float32)


@pytest.mark.parametrize("scheme", ["tf_lite", "imagenet"])
@pytest.mark.parametrize("photo, classes", [("chelsea", CAT_CLASSES),
                                            ("coffee", COFFEE_CLASSES)])
def test_imagenet_predictions_on_photos(lite0, photo, classes, scheme):
    model, variables, apply = lite0
    logits = np.asarray(apply(variables, normalize(_photo(photo)[None], scheme))["logits"][0])
    probs = np.asarray(jax.nn.softmax(logits))
    top5 = np.argsort(-probs)[:5]
    print(f"{photo} [{scheme}] top-5: "
          + ", ".join(f"{i} ({probs[i]:.4f})" for i in top5), file=sys.stderr)
    assert top5[0] in classes, top5
    assert len(classes & set(top5.tolist())) >= 2, top5
    assert probs[top5[0]] > 0.5


def test_normalize_schemes():
    x = np.array([[[0.0, 0.5, 1.0]]], np.float32)
    np.testing.assert_allclose(normalize(x), [[[-127 / 128, 0.5 / 128, 1.0]]], rtol=1e-6)
    np.testing.assert_allclose(normalize(x, "imagenet"),
                               [[[-0.485 / 0.229, 0.044 / 0.224, 0.594 / 0.225]]], rtol=1e-5)
    with pytest.raises(ValueError, match="unknown scheme"):
        normalize(x, "caffe")


def test_train_mode_updates_batch_stats():
    model = EfficientNetLite0(num_classes=10)
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 64, 64, 3))
    variables = jax.jit(model.init)(jax.random.PRNGKey(0), x)  # jitted: eager is ~10x slower
    out, updates = jax.jit(lambda v, x, r: model.apply(
        v, x, train=True, mutable=["batch_stats"], rngs={"dropout": r}))(
            variables, x, jax.random.PRNGKey(2))
    assert out["logits"].shape == (2, 10) and out["block7"].shape == (2, 2, 2, 320)
    # stem BatchNorm: running mean moves by (1 - 0.99) * batch mean of the conv output
    conv = jax.lax.conv_general_dilated(
        x, variables["params"]["conv_stem"]["kernel"], (2, 2), "SAME",
        dimension_numbers=("NHWC", "HWIO", "NHWC"))
    expect = 0.99 * variables["batch_stats"]["bn0"]["mean"] + 0.01 * conv.mean(axis=(0, 1, 2))
    np.testing.assert_allclose(updates["batch_stats"]["bn0"]["mean"], expect, rtol=1e-5,
                               atol=1e-6)


# ----------------------------------------------------------------- PyTorch parity --
@pytest.fixture(scope="module")
def torch_reference(weights_path):
    torch = pytest.importorskip("torch")
    ref_pkg = pytest.importorskip("efficientnet_lite_pytorch")
    net = ref_pkg.EfficientNet.from_name("efficientnet-lite0")
    net.load_state_dict(torch.load(weights_path, map_location="cpu", weights_only=True))
    return torch, net.eval()


@pytest.mark.torch
def test_parity_with_pytorch_reference(lite0, torch_reference):
    torch, net = torch_reference
    model, variables, apply = lite0
    x = np.random.default_rng(0).normal(size=(2, 224, 224, 3)).astype(np.float32)
    feats = {}
    hooks = [net._blocks[i].register_forward_hook(
        lambda m, inp, o, name=name: feats.__setitem__(name, o))
        for name, i in LAST_BLOCK.items()]
    xt = torch.from_numpy(x.transpose(0, 3, 1, 2).copy())
    with torch.no_grad():
        ref_logits = net(xt).numpy()
        feats["stem"] = net._swish(net._bn0(net._conv_stem(xt)))
        feats["head"] = net.extract_features(xt)
    for h in hooks:
        h.remove()
    out = apply(variables, jnp.asarray(x))
    err = float(np.abs(np.asarray(out["logits"]) - ref_logits).max())
    print(f"max |logits - torch| = {err:.3g}", file=sys.stderr)
    assert err < 1e-3
    for name, ref in feats.items():
        ref = ref.numpy().transpose(0, 2, 3, 1)
        np.testing.assert_allclose(np.asarray(out[name]), ref, rtol=1e-4,
                                   atol=1e-5 * float(np.abs(ref).max()), err_msg=name)
