"""ConTNet backbone (Yan et al. 2021) and its checkpoint converter (used by Dini & Rahtu 2023).

References independent of the code under test: the parameter count measured on the
authors' PyTorch code (METHODS.md part B), the official key names and tensor shapes read
from the authors' ConTNet.py, and (torch optional) a small PyTorch ConTNet written here
from the paper's description that loads the converted state dict with strict=True.
"""
from __future__ import annotations

import functools
import math
from collections import OrderedDict

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vtadl_jax.convert.contnet import (CheckpointMismatchError, contnet_from_state_dict,
                                       contnet_to_state_dict, detect_contnet_config)
from vtadl_jax.models.backbones.contnet import ConTNet, ConTNetConfig, contnet_b, contnet_tiny

B_PARAMS = 36_043_112          # authors' code, with the 1000-class head (METHODS.md B)
PAPER_PARAMS = 39.6e6          # the ConTNet paper's table
TINY_SIDE = 64                 # contnet_tiny().config.input_multiple


def _random_variables(model: ConTNet, side: int, seed: int = 0) -> dict:
    """Variables with the model's tree and shapes, filled with random values (no init run):
    weights ~ N(0, 0.05^2) (LayerNorm/BN scales around 1), BN variances in [0.5, 1.5];
    position embeddings, bias tables and the MLP's first layer ~ N(0, 0.5^2) so that
    their layout and the GELU's exact form visibly change the outputs."""
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, side, side, 3))))
    rng = np.random.default_rng(seed)

    def fill(path, s):
        names = [p.key for p in path]
        name = names[-1]
        big = name in ("pe_0", "pe_1", "relative_position_bias_table") or "fc1" in names
        a = rng.normal(0.0, 0.5 if big else 0.05, s.shape)
        if name == "scale":
            a += 1.0
        if name == "var":
            a = rng.uniform(0.5, 1.5, s.shape)
        return a.astype(np.float32)

    return jax.tree_util.tree_map_with_path(fill, shapes)


def _count(tree) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


@pytest.fixture(scope="module")
def b_variables():
    model = contnet_b()
    return model, _random_variables(model, 224)


def test_param_count_contnet_b(b_variables):
    model, variables = b_variables
    n = _count(variables["params"])
    print(f"ConTNet-B parameters: {n:,} (authors' code {B_PARAMS:,}; paper {PAPER_PARAMS / 1e6}M)")
    assert n == B_PARAMS
    headless = contnet_b(num_classes=None)
    shapes = jax.eval_shape(lambda: headless.init(jax.random.key(0), jnp.zeros((1, 224, 224, 3))))
    assert _count(shapes["params"]) == B_PARAMS - (1024 * 1000 + 1000)


@pytest.mark.parametrize("side", [224, 448])
def test_stage_shapes_contnet_b(b_variables, side):
    model, variables = b_variables
    out = jax.eval_shape(model.apply, variables, jnp.zeros((2, side, side, 3)))
    g = side // 224
    assert {k: v.shape for k, v in out.items()} == {
        "stage1": (2, 28 * g, 28 * g, 128), "stage2": (2, 14 * g, 14 * g, 256),
        "stage3": (2, 7 * g, 7 * g, 512), "stage4": (2, 7 * g, 7 * g, 1024),
        "logits": (2, 1000)}


def test_contnet_b_official_keys_and_round_trip(b_variables):
    # (numerics are checked on contnet_tiny below: a ConTNet-B forward costs ~20 s on CPU)
    model, variables = b_variables
    sd = contnet_to_state_dict(variables, model.config)
    # shapes read from the authors' ConTNet.py (PyTorch layouts)
    facts = {"layer0.conv.conv.weight": (64, 3, 7, 7),
             "layer1.ConTBlock0.bn.running_var": (64,),
             "layer1.ConTBlock0.ste1.pe.0": (1, 7, 1, 32),
             "layer1.ConTBlock0.ste2.pe.1": (1, 1, 14, 32),
             "layer1.ConTBlock0.ste1.attn.qkv.weight": (192, 64),
             "layer1.ConTBlock0.ste1.attn.qkv.bias": (192,),
             "layer1.ConTBlock0.ste1.mlp.fc1.weight": (256, 64),
             "layer1.ConTBlock0.out_conv.conv.weight": (64, 64, 3, 3),
             "layer1.ConTBlock2.out_conv.conv.weight": (128, 64, 3, 3),
             "layer1.ConTBlock2.downsample.conv.weight": (128, 64, 1, 1),
             "layer3.ConTBlock5.ste2.norm2.weight": (256,),
             "layer4.ConTBlock0.ste2.pe.0": (1, 7, 1, 256),
             "layer4.ConTBlock2.out_conv.conv.weight": (1024, 512, 1, 1),
             "layer4.ConTBlock2.downsample.conv.weight": (1024, 512, 1, 1),
             "fc.weight": (1000, 1024), "fc.bias": (1000,)}
    assert {k: sd[k].shape for k in facts} == facts
    # per block: bn 4 + num_batches_tracked + 2 STE x 14 + out_conv = 34; 16 blocks,
    # 4 shortcut convs, stem, fc weight+bias
    assert len(sd) == 16 * 34 + 4 + 1 + 2
    assert sd["layer2.ConTBlock1.bn.num_batches_tracked"].dtype == np.int64
    config, back = contnet_from_state_dict(sd)
    assert config == model.config
    jax.tree.map(np.testing.assert_array_equal, back, variables)


def test_input_side_must_be_multiple(b_variables):
    model, variables = b_variables
    assert model.config.input_multiple == 224
    with pytest.raises(ValueError, match="height 230 is not a multiple of 224"):
        model.apply(variables, jnp.zeros((1, 230, 224, 3)))
    with pytest.raises(ValueError, match="width 112 is not a multiple of 224"):
        jax.eval_shape(model.apply, variables, jnp.zeros((1, 224, 112, 3)))
    with pytest.raises(ValueError, match=r"\(B, H, W, 3\)"):
        model.apply(variables, jnp.zeros((1, 224, 224, 1)))


# the released code's defaults, and every other option at once (pre-norm is not visible in
# the keys, so it is passed to the converter)
OPTIONS = [dict(), dict(position_embedding="relative", shortcut="avgpool", qkv_bias=False,
                        pre_norm=True, num_classes=None)]
OPTION_IDS = ["absolute-conv-postnorm", "relative-avgpool-noqkvbias-prenorm-headless"]


@functools.lru_cache(maxsize=None)
def _forward(config: ConTNetConfig):
    """One jitted forward per config, shared by the tests (compiling is the slow part)."""
    return jax.jit(ConTNet(config).apply)


@pytest.mark.parametrize("options", OPTIONS, ids=OPTION_IDS)
def test_round_trip_through_pth(tmp_path, options):
    pth = pytest.importorskip("vtadl_jax.convert.pth")
    model = contnet_tiny(**options)
    variables = _random_variables(model, TINY_SIDE, seed=3)
    sd = contnet_to_state_dict(variables, model.config)
    path = tmp_path / "contnet.pth"
    pth.save_pth({"module." + k: v for k, v in sd.items()}, path)
    loaded = pth.load_pth(path)
    assert set(loaded) == set(sd)
    config, back = contnet_from_state_dict(loaded, pre_norm=model.config.pre_norm)
    assert config == model.config
    assert jax.tree.structure(back) == jax.tree.structure(variables)
    jax.tree.map(np.testing.assert_array_equal, back, variables)
    x = np.random.default_rng(4).normal(size=(2, TINY_SIDE, TINY_SIDE, 3)).astype(np.float32)
    a, b = _forward(model.config)(variables, x), _forward(config)(back, x)
    assert set(a) == {"stage1", "stage2", "stage3", "stage4"} | (
        {"logits"} if config.num_classes else set())
    jax.tree.map(np.testing.assert_array_equal, a, b)


@pytest.fixture(scope="module")
def tiny_sd():
    model = contnet_tiny()
    return contnet_to_state_dict(_random_variables(model, TINY_SIDE), model.config)


def test_converter_lists_all_bad_keys(tiny_sd):
    sd = dict(tiny_sd)
    del sd["layer2.ConTBlock0.ste1.mlp.fc2.bias"]
    sd["layer1.ConTBlock0.ste1.attn.extra"] = np.zeros(3, np.float32)
    sd["layer3.ConTBlock0.out_conv.conv.weight"] = np.zeros((64, 32, 1, 1), np.float32)
    with pytest.raises(CheckpointMismatchError) as e:
        contnet_from_state_dict(sd, source="bad.pth")
    msg = str(e.value)
    assert "bad.pth" in msg
    assert "missing (1): ['layer2.ConTBlock0.ste1.mlp.fc2.bias']" in msg
    assert "unexpected (1): ['layer1.ConTBlock0.ste1.attn.extra']" in msg
    assert ("layer3.ConTBlock0.out_conv.conv.weight: got (64, 32, 1, 1), expected "
            "(64, 32, 3, 3)") in msg


def test_detection_and_wrappers(tiny_sd):
    wrapped = {"epoch": 3, "model": {"module." + k: v for k, v in tiny_sd.items()}}
    assert detect_contnet_config(wrapped) == contnet_tiny().config
    assert detect_contnet_config({"state_dict": tiny_sd}, pre_norm=True).pre_norm
    rel = contnet_tiny(position_embedding="relative", shortcut="avgpool", heads=(1, 1, 2, 4))
    sd = contnet_to_state_dict(_random_variables(rel, TINY_SIDE), rel.config)
    assert "layer1.ConTBlock1.downsample.conv.conv.weight" in sd        # stride 2: avgpool
    assert "layer4.ConTBlock1.downsample.conv.weight" in sd             # stride 1: plain
    assert sd["layer1.ConTBlock0.ste2.attn.relative_position_bias_table"].shape == (49, 1)
    cfg = detect_contnet_config(sd)
    assert (cfg.position_embedding, cfg.shortcut, cfg.heads) == ("relative", "avgpool",
                                                                 (1, 1, 2, 4))
    assert cfg.windows == ((2, 4), (2, 4), (2, 4), (2, 2)) and cfg.num_classes == 10
    bad_index = dict(sd)
    bad_index["layer2.ConTBlock0.ste1.attn.relative_position_index"] = np.zeros((4, 4), np.int64)
    with pytest.raises(CheckpointMismatchError, match="ste1.attn.relative_position_index"):
        contnet_from_state_dict(bad_index)
    both = dict(tiny_sd, **{"layer1.ConTBlock0.ste1.attn.relative_position_bias_table":
                            np.zeros((9, 1), np.float32)})
    with pytest.raises(CheckpointMismatchError, match="both absolute"):
        detect_contnet_config(both)
    stem_c = {k: v for k, v in tiny_sd.items() if not k.startswith("layer0")}
    stem_c["layer0.conv_bn1.conv.weight"] = np.zeros((4, 3, 3, 3), np.float32)
    with pytest.raises(NotImplementedError, match="tweak_C"):
        detect_contnet_config(stem_c)
    with pytest.raises(ValueError, match="position_embedding"):
        ConTNetConfig(position_embedding="sinusoidal")


def test_train_mode_batch_stats_and_dropout():
    model = contnet_tiny(blocks=(1, 1, 1, 1), dropout=(0.1,) * 4, last_dropout=0.2)
    variables = _random_variables(model, TINY_SIDE, seed=5)
    x = np.random.default_rng(6).normal(size=(2, TINY_SIDE, TINY_SIDE, 3)).astype(np.float32)

    @jax.jit
    def train_forward(variables, key):
        return model.apply(variables, x, train=True, mutable=["batch_stats"],
                           rngs={"dropout": key})

    # "rbg" keys: dropout's random bits compile ~3x faster on CPU than threefry's
    out1, new = train_forward(variables, jax.random.key(0, impl="rbg"))
    out2, _ = train_forward(variables, jax.random.key(1, impl="rbg"))
    assert out1["logits"].shape == (2, 10)
    assert not np.allclose(out1["stage4"], out2["stage4"])         # dropout is active
    old_bn = variables["batch_stats"]["layer1_ConTBlock0"]["bn"]["mean"]
    new_bn = np.asarray(new["batch_stats"]["layer1_ConTBlock0"]["bn"]["mean"])
    assert new_bn.shape == old_bn.shape and not np.allclose(new_bn, old_bn)
    with pytest.raises(Exception, match="dropout"):
        model.apply(variables, x, train=True, mutable=["batch_stats"])


# ----------------------------------------------------------------------------------------
# Optional: a PyTorch ConTNet written here from the paper / METHODS.md description, with
# the official module names, so that load_state_dict(strict=True) checks the key layout.

def _torch_reference(config: ConTNetConfig):
    torch = pytest.importorskip("torch")
    nn, F = torch.nn, torch.nn.functional

    def seq(**mods):
        return nn.Sequential(OrderedDict(mods))

    class Attn(nn.Module):
        def __init__(self, c, heads, win):
            super().__init__()
            self.heads = heads
            self.qkv = nn.Linear(c, 3 * c, bias=config.qkv_bias)
            self.proj = nn.Linear(c, c)
            if config.position_embedding == "relative":
                self.relative_position_bias_table = nn.Parameter(
                    torch.zeros((2 * win - 1) ** 2, heads))
                r = torch.arange(win).repeat_interleave(win)        # token row
                col = torch.arange(win).repeat(win)                 # token column
                idx = ((r[:, None] - r[None] + win - 1) * (2 * win - 1)
                       + (col[:, None] - col[None] + win - 1))
                self.register_buffer("relative_position_index", idx)

        def forward(self, x):
            n, t, c = x.shape
            q, k, v = self.qkv(x).reshape(n, t, 3, self.heads, -1).unbind(2)
            logits = torch.einsum("nqhd,nkhd->nhqk", q, k) / math.sqrt(c // self.heads)
            if hasattr(self, "relative_position_bias_table"):
                bias = self.relative_position_bias_table[self.relative_position_index]
                logits = logits + bias.permute(2, 0, 1)
            y = torch.einsum("nhqk,nkhd->nqhd", logits.softmax(-1), v).reshape(n, t, c)
            return self.proj(y)

    class Ste(nn.Module):
        def __init__(self, c, mlp, heads, win):
            super().__init__()
            self.win = win
            if config.position_embedding == "absolute":
                self.pe = nn.ParameterList([nn.Parameter(torch.zeros(1, win, 1, c // 2)),
                                            nn.Parameter(torch.zeros(1, 1, win, c // 2))])
            self.attn = Attn(c, heads, win)
            self.mlp = seq(fc1=nn.Linear(c, mlp), act=nn.GELU(), fc2=nn.Linear(mlp, c))
            self.norm1, self.norm2 = nn.LayerNorm(c), nn.LayerNorm(c)

        def forward(self, x):
            b, c, h, w = x.shape
            p = self.win
            x = x.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 3, 5, 1).reshape(-1, p, p, c)
            if config.position_embedding == "absolute":
                x = torch.cat([x[..., : c // 2] + self.pe[0], x[..., c // 2:] + self.pe[1]], -1)
            x = x.reshape(-1, p * p, c)
            if config.pre_norm:
                x = x + self.attn(self.norm1(x))
                x = x + self.mlp(self.norm2(x))
            else:
                x = self.norm1(x + self.attn(x))
                x = self.norm2(x + self.mlp(x))
            x = x.reshape(b, h // p, w // p, p, p, c).permute(0, 5, 1, 3, 2, 4)
            return x.reshape(b, c, h, w)

    class Block(nn.Module):
        def __init__(self, cin, cout, mlp, heads, wins, stride, last):
            super().__init__()
            self.bn = nn.BatchNorm2d(cin)
            self.ste1, self.ste2 = (Ste(cin, mlp, heads, w) for w in wins)
            k = 1 if (last and stride == 1) else 3
            self.out_conv = seq(conv=nn.Conv2d(cin, cout, k, stride, k // 2, bias=False))
            self.downsample = None
            if last and config.shortcut == "avgpool" and stride == 2:
                self.downsample = seq(avgpool=nn.AvgPool2d(2, 2),
                                      conv=seq(conv=nn.Conv2d(cin, cout, 1, bias=False)))
            elif last:
                self.downsample = seq(conv=nn.Conv2d(cin, cout, 1, stride, bias=False))

        def forward(self, x):
            a = F.relu(self.bn(x))
            short = x if self.downsample is None else self.downsample(a)
            return self.out_conv(self.ste2(self.ste1(a))) + short

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            c = config.inplanes
            self.layer0 = seq(conv=seq(conv=nn.Conv2d(3, c, 7, 2, 3, bias=False)),
                              maxpool=nn.MaxPool2d(3, 2, 1))
            self.n = len(config.blocks)
            for i in range(self.n):
                width, nb = c * 2 ** i, config.blocks[i]
                stride = 2 if i < self.n - 1 else 1
                self.add_module(f"layer{i + 1}", seq(**{
                    f"ConTBlock{j}": Block(width, 2 * width if j == nb - 1 else width,
                                           config.mlp_dims[i], config.heads[i],
                                           config.windows[i], stride if j == nb - 1 else 1,
                                           j == nb - 1) for j in range(nb)}))
            if config.num_classes:
                self.fc = nn.Linear(2 * c * 2 ** (self.n - 1), config.num_classes)

        def forward(self, x):
            out, x = {}, self.layer0(x)
            for i in range(self.n):
                x = getattr(self, f"layer{i + 1}")(x)
                out[f"stage{i + 1}"] = x.permute(0, 2, 3, 1)
            if config.num_classes:
                out["logits"] = self.fc(x.mean((2, 3)))
            return out

    return torch, Net().eval()


@pytest.mark.torch
@pytest.mark.parametrize("options", OPTIONS, ids=OPTION_IDS)
def test_parity_with_torch_reference(options):
    model = contnet_tiny(**options)
    torch, ref = _torch_reference(model.config)
    variables = _random_variables(model, TINY_SIDE, seed=7)
    sd = contnet_to_state_dict(variables, model.config)
    own = ref.state_dict()   # the reference's own relative indices, before loading ours
    for k in [k for k in own if k.endswith("relative_position_index")]:
        np.testing.assert_array_equal(sd[k], own[k].numpy(), err_msg=k)
    ref.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in sd.items()}, strict=True)
    x = np.random.default_rng(8).normal(size=(2, TINY_SIDE, TINY_SIDE, 3)).astype(np.float32)
    with torch.no_grad():
        want = ref(torch.from_numpy(x).permute(0, 3, 1, 2))
    got = _forward(model.config)(variables, x)
    assert set(got) == set(want)
    for k in want:
        np.testing.assert_allclose(np.asarray(got[k]), want[k].numpy(), rtol=1e-5, atol=2e-5,
                                   err_msg=k)
    # the reference also reads back through the converter
    back_sd = {k: v.numpy() for k, v in ref.state_dict().items()}
    config, back = contnet_from_state_dict(back_sd, pre_norm=model.config.pre_norm)
    assert config == model.config
    jax.tree.map(np.testing.assert_array_equal, back, variables)
