"""VT-ADL model tests: layer semantics vs PyTorch/NumPy, parameter counts, shapes, noise."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vtadl_jax.models.decoder import (VTADL_CODE_LAYERS, TorchConvTranspose,
                                      conv_transpose_size, decoder_output_size)
from vtadl_jax.models.mdn import MixtureDensityHead, fused_paper_nll, patch_nll
from vtadl_jax.models.variants import VARIANTS, get_variant, variant_fields
from vtadl_jax.models.vit import PatchViT, patchify
from vtadl_jax.models.vtadl import CapsuleProjection
from vtadl_jax.train.state import count_params, init_variables

RNGS = {"params": jax.random.PRNGKey(0), "noise": jax.random.PRNGKey(1)}


@pytest.fixture(scope="module")
def tiny_vars():
    """Variables of the "tiny" variant, initialised once for the module."""
    return init_variables(get_variant("tiny"), jax.random.PRNGKey(0), (32, 32, 3))


def _conv_transpose_scatter(x, w, b, s, p):
    """NumPy reference from the definition: y[i*s + a - p] += x[i] w[a]; x NHWC, w (k,k,ci,co)."""
    n, h, wd, _ = x.shape
    k, co = w.shape[0], w.shape[-1]
    full = np.zeros((n, (h - 1) * s + k, (wd - 1) * s + k, co))
    for i in range(h):
        for j in range(wd):
            contrib = np.einsum("nc,abco->nabo", x[:, i, j], w)
            full[:, i * s:i * s + k, j * s:j * s + k, :] += contrib
    out = full[:, p:full.shape[1] - p, p:full.shape[2] - p, :]
    return out + b


@pytest.mark.parametrize("k,s,p", [(3, 2, 1), (9, 3, 1), (7, 5, 1), (9, 2, 0), (6, 1, 0),
                                   (4, 2, 1)])
def test_conv_transpose_matches_scatter_definition(x64, k, s, p):
    x = np.random.default_rng(k * 10 + s).normal(size=(2, 4, 3, 3))
    layer = TorchConvTranspose(5, k, s, p)
    v = layer.init(jax.random.PRNGKey(0), jnp.asarray(x))
    y = np.asarray(layer.apply(v, jnp.asarray(x)))
    ref = _conv_transpose_scatter(x, np.asarray(v["params"]["kernel"]),
                                  np.asarray(v["params"]["bias"]), s, p)
    assert y.shape == ref.shape == (2, conv_transpose_size(4, k, s, p),
                                    conv_transpose_size(3, k, s, p), 5)
    np.testing.assert_allclose(y, ref, rtol=1e-10, atol=1e-12)


def test_conv_transpose_matches_torch():
    torch = pytest.importorskip("torch")
    x = np.random.default_rng(0).normal(size=(2, 5, 5, 4)).astype(np.float32)
    layer = TorchConvTranspose(3, 7, 5, 1)
    v = layer.init(jax.random.PRNGKey(0), jnp.asarray(x))
    t = torch.nn.ConvTranspose2d(4, 3, 7, stride=5, padding=1)
    with torch.no_grad():  # ours (kh, kw, in, out) <- torch (in, out, kh, kw), no flip
        t.weight.copy_(torch.tensor(np.asarray(v["params"]["kernel"]).transpose(2, 3, 0, 1)))
        t.bias.copy_(torch.tensor(np.asarray(v["params"]["bias"])))
        ref = t(torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy().transpose(0, 2, 3, 1)
    np.testing.assert_allclose(np.asarray(layer.apply(v, jnp.asarray(x))), ref, atol=1e-5)


def test_code_decoder_spatial_sizes():
    sizes, size = [], 8
    for _, k, s, p in VTADL_CODE_LAYERS:
        size = conv_transpose_size(size, k, s, p)
        sizes.append(size)
    assert sizes == [15, 49, 245, 497, 502, 512]
    assert decoder_output_size(VTADL_CODE_LAYERS, 8) == 512


def test_patchify_order():
    x = np.arange(2 * 4 * 6 * 3, dtype=np.float32).reshape(2, 4, 6, 3)
    p = np.asarray(patchify(jnp.asarray(x), 2))
    assert p.shape == (2, 6, 12)
    # patch (row 1, col 2) -> index 1 * 3 + 2; flattened (p1, p2, c)
    np.testing.assert_array_equal(p[1, 5], x[1, 2:4, 4:6, :].reshape(-1))


def _torch_encoder(torch, params, images, heads, scale_model):
    """Independent PyTorch forward of the VT-ADL encoder from our parameters."""
    T = lambda a: torch.tensor(np.asarray(a, np.float64))  # noqa: E731
    f = torch.nn.functional
    b, h, w, c = images.shape
    x = T(np.asarray(patchify(jnp.asarray(images), 4)))
    pe = params["patch_embedding"]
    x = x @ T(pe["kernel"]) + T(pe["bias"])
    x = torch.cat([T(params["cls_token"]).expand(b, 1, -1), x], 1) + T(params["pos_embedding"])
    d = x.shape[-1]
    for i in range(len([k for k in params if k.startswith("block")])):
        blk = params[f"block{i}"]
        ln = lambda t, q: f.layer_norm(t, (d,), T(q["scale"]), T(q["bias"]), 1e-5)  # noqa: E731
        y = ln(x, blk["norm1"])
        q, k, v = (y @ T(blk["attn"]["to_qkv"]["kernel"])).chunk(3, dim=-1)
        q, k, v = (t.reshape(b, -1, heads, d // heads).transpose(1, 2) for t in (q, k, v))
        scale = d ** -0.5 if scale_model else (d // heads) ** -0.5
        a = torch.softmax(q @ k.transpose(-1, -2) * scale, -1) @ v
        a = a.transpose(1, 2).reshape(b, -1, d)
        x = x + a @ T(blk["attn"]["to_out"]["kernel"]) + T(blk["attn"]["to_out"]["bias"])
        y = ln(x, blk["norm2"])
        m = blk["mlp"]
        y = f.gelu(y @ T(m["fc1"]["kernel"]) + T(m["fc1"]["bias"]))  # exact erf GELU
        x = x + y @ T(m["fc2"]["kernel"]) + T(m["fc2"]["bias"])
    return x[:, 1:].numpy()


@pytest.mark.parametrize("attn_scale", ["head", "model"])
def test_encoder_matches_torch_reference(attn_scale):
    torch = pytest.importorskip("torch")
    enc = PatchViT(patch_size=4, dim=16, depth=2, num_heads=4, mlp_dim=24, attn_scale=attn_scale)
    x = np.random.default_rng(1).uniform(-1, 1, (2, 16, 12, 3)).astype(np.float32)
    v = jax.jit(enc.init)(jax.random.PRNGKey(0), jnp.asarray(x))
    z = np.asarray(jax.jit(enc.apply)(v, jnp.asarray(x)))
    assert z.shape == (2, 12, 16)
    ref = _torch_encoder(torch, jax.device_get(v["params"]), x, 4, attn_scale == "model")
    np.testing.assert_allclose(z, ref, rtol=1e-4, atol=1e-4)


def test_paper_variant_counts_and_shapes():
    """Counts implied by METHODS.md (the authors' code), measured without a forward pass."""
    x = jax.ShapeDtypeStruct((2, 512, 512, 3), jnp.float32)
    counts = {}
    for proj in ("routing", "linear"):
        model = get_variant("paper", projection=proj, mdn_head="vtadl_code", num_components=10)
        v = jax.eval_shape(lambda x: model.init(RNGS, x, train=False), x)
        counts[proj] = {k: count_params(t) for k, t in v["params"].items()}
    code = counts["routing"]
    assert code["encoder"] == 18_933_248
    assert code["project"] == 16_777_216
    assert code["dec"] == 142_099
    assert code["encoder"] + code["project"] + code["dec"] == 35_852_563
    assert code["mdn"] == 5_248_000  # code head, K = 10
    assert counts["linear"]["project"] == 32768 * 512 + 512
    assert count_params(v["batch_stats"]) == 2 * (16 + 32 + 32 + 16 + 8)

    model = get_variant("paper")  # paper head, K = 150: logits + means + scales with bias
    v = jax.eval_shape(lambda x: model.init(RNGS, x, train=False), x)
    assert count_params(v["params"]["mdn"]) == (512 * 150 + 150) + 2 * (512 + 1) * 150 * 512
    out = jax.eval_shape(lambda v, x: model.apply(v, x, train=True, rngs=RNGS,
                                                  mutable=["batch_stats"])[0], v, x)
    assert out["embeddings"].shape == (2, 64, 512)
    assert out["recon"].shape == (2, 512, 512, 3)
    assert out["mixture"].means.shape == (2, 64, 150, 512)
    assert out["mixture"].logits.shape == (2, 64, 150)


@pytest.mark.parametrize("name,size", [("mnist", 28), ("mnist", 32), ("tiny", 32)])
def test_small_variants_forward(name, size, tiny_vars):
    model = get_variant(name, image_size=size)
    c = model.channels
    x = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (2, size, size, c)), jnp.float32)
    v = tiny_vars if name == "tiny" else init_variables(model, RNGS["params"], x.shape[1:])
    out, upd = jax.jit(lambda v, x: model.apply(v, x, train=True, rngs=RNGS,
                                                mutable=["batch_stats"]))(v, x)
    n = (size // model.patch_size) ** 2
    assert out["recon"].shape == x.shape
    assert out["embeddings"].shape == (2, n, model.dim)
    assert float(jnp.max(jnp.abs(out["recon"]))) <= 1.0
    assert out["mixture"].scales.min() >= model.scale_floor
    assert jax.tree.structure(upd["batch_stats"]) == jax.tree.structure(v["batch_stats"])


def test_capsule_projection_equals_routing_kernel():
    capsule = pytest.importorskip("vtadl_jax.kernels.capsule")
    z = jax.random.normal(jax.random.PRNGKey(3), (2, 4, 16))
    layer = CapsuleProjection(out_dim=12)
    v = layer.init(jax.random.PRNGKey(0), z.reshape(2, -1))
    w = v["params"]["W"]
    assert w.shape == (8, 12, 8)
    assert abs(float(jnp.std(w)) - 0.01) < 0.003
    u = z.reshape(2, 8, 8)
    votes = capsule.capsule_votes(u, w[:, None])  # (B, n_in, 1, 12)
    ref = capsule.dynamic_routing(votes, iterations=3)[:, 0]
    np.testing.assert_allclose(layer.apply(v, z.reshape(2, -1)), ref, rtol=1e-5, atol=1e-7)


def test_noise_per_example_and_train_only(tiny_vars):
    model, v = get_variant("tiny", noise_std=0.5), tiny_vars
    x = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (4, 32, 32, 3)), jnp.float32)
    clean = jax.jit(lambda x: model.apply(v, x, train=False))(x)["embeddings"]
    run = jax.jit(lambda xs, ids: model.apply(v, xs, train=True, example_ids=ids, rngs=RNGS,
                                              mutable=["batch_stats"])[0]["embeddings"])
    noisy = run(x, jnp.arange(4))
    assert abs(float(jnp.std(noisy - clean)) - 0.5) < 0.05
    # the noise of an example depends on its id only, not on the batch it is in (the
    # encoder itself differs by float32 rounding between batch shapes: ~1e-6)
    np.testing.assert_allclose(run(x[2:], jnp.arange(2, 4)), noisy[2:], atol=1e-4)
    assert float(jnp.max(jnp.abs(run(x[2:], jnp.arange(2)) - noisy[2:]))) > 0.1
    off = get_variant("tiny", noise_std=0.0)
    out = jax.jit(lambda x: off.apply(v, x, train=True, rngs=RNGS,
                                      mutable=["batch_stats"])[0]["embeddings"])(x)
    np.testing.assert_allclose(out, clean, atol=1e-6)


def test_code_head_layout_and_clamp():
    head = MixtureDensityHead(3, head="vtadl_code")
    z = jax.random.normal(jax.random.PRNGKey(0), (2, 5, 4))
    v = head.init(jax.random.PRNGKey(1), z)
    p = head.apply(v, z)
    mu_kernel = np.asarray(v["params"]["mu"]["kernel"])  # (D, D*K), output index d*K + k
    x = np.maximum(np.asarray(z), np.finfo(np.float64).eps)
    ref = (x @ mu_kernel).reshape(2, 5, 4, 3).transpose(0, 1, 3, 2)
    np.testing.assert_allclose(p.means, ref, rtol=1e-5, atol=1e-6)
    assert "bias" not in v["params"]["mu"]
    assert p.scales.shape == (2, 5, 3, 4) and float(p.scales.min()) >= 0.0


def test_fused_head_equals_materialised(x64):
    pytest.importorskip("vtadl_jax.kernels.mixture")
    head = MixtureDensityHead(7, head="paper", scale_floor=1e-3)
    z = jax.random.normal(jax.random.PRNGKey(0), (2, 5, 6), jnp.float64)
    v = jax.jit(head.init)(jax.random.PRNGKey(1), z)
    rng = np.random.default_rng(2)  # perturb so that no scale kernel is zero
    v = jax.tree.map(lambda a: a + 0.1 * rng.normal(size=a.shape), v)
    ref = jax.jit(lambda v, z: patch_nll(z, head.apply(v, z), head="paper"))(v, z)
    assert ref.shape == (2, 5)
    got = jax.jit(lambda v, z: fused_paper_nll(z, v["params"], k_chunk=3,
                                               scale_floor=1e-3))(v, z)
    np.testing.assert_allclose(got, ref, rtol=1e-10)
    # and against a direct float64 NumPy mixture NLL
    p = jax.device_get(jax.jit(head.apply)(v, z))
    zz = np.asarray(z)[..., None, :]
    logn = (-0.5 * np.sum(((zz - p.means) / p.scales) ** 2 + 2 * np.log(p.scales), -1)
            - 3 * math.log(2 * math.pi))
    logw = p.logits - np.log(np.sum(np.exp(p.logits), -1, keepdims=True))
    np.testing.assert_allclose(ref, -np.log(np.sum(np.exp(logw + logn), -1)), rtol=1e-10)


def test_variant_table_errors():
    assert set(VARIANTS) == {"paper", "mnist", "tiny"}
    assert variant_fields("vtadl-tiny")["image_size"] == (32, 32)
    with pytest.raises(ValueError, match="unknown VT-ADL variant"):
        get_variant("huge")
    with pytest.raises(ValueError, match="unknown VTADL fields"):
        get_variant("tiny", bogus=1)
