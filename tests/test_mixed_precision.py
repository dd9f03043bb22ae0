"""bfloat16 mixed precision of VT-ADL (model field ``dtype``) on the "tiny" variant.

Tolerance of the loss curves, measured before it was set: 30 steps of the tiny config
(lr 1e-3, batch 8) on the smooth disc images below, seeds 0, 1, 2: the largest
per-step relative difference |L_bf16 - L_f32| / L_f32 was 0.27 %, 0.24 %, 0.34 %
(mean 0.08-0.13 %); already at step 0 (same parameters) it is ~0.2 %, the size of one
bfloat16 rounding (8 significant bits: relative spacing 2^-8 = 0.39 %). The test allows
1 %, about 3x the largest measured value and 2.5 bf16 spacings: it tolerates rounding
but not a bf16 run that diverges from the float32 one. That the bf16 run really is bf16
(not silently float32, which would pass any tolerance) is checked on the HLO.
"""
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tiny_images import smooth_disc_images as _dataset

from vtadl_jax.configs import apply_overrides
from vtadl_jax.models.variants import get_variant
from vtadl_jax.train.config import base_config
from vtadl_jax.train.loop import build_model
from vtadl_jax.train.optim import make_optimizer
from vtadl_jax.train.state import create_train_state, init_variables
from vtadl_jax.train.step import LossConfig, make_mesh, make_train_step, replicate, shard_batch

STEPS = 30
BATCH = 8
LOSS_RTOL = 0.01  # see the module docstring
ROOT = pathlib.Path(__file__).resolve().parents[1]


def _setup(dtype: str, loss: LossConfig = LossConfig(), **fields):
    model, tx = get_variant("tiny", dtype=dtype, **fields), make_optimizer(1e-3, 1e-4)
    mesh = make_mesh(jax.devices()[:1])
    state = replicate(create_train_state(model, tx, 0, (32, 32, 3)), mesh)
    return state, make_train_step(model, tx, loss, mesh), mesh


@pytest.fixture(scope="module")
def runs():
    data = _dataset()
    out = {}
    for dtype in ("float32", "bfloat16"):
        state, step, mesh = _setup(dtype)
        rows = []
        for i in range(STEPS):
            idx = (np.arange(BATCH) + 5 * i) % len(data)
            state, m = step(state, shard_batch(data[idx], mesh))
            rows.append({k: float(v) for k, v in m.items()})
        out[dtype] = (state, rows)
    return out


def test_bf16_loss_curve_tracks_float32(runs):
    f32 = np.array([r["loss"] for r in runs["float32"][1]])
    bf16 = np.array([r["loss"] for r in runs["bfloat16"][1]])
    assert np.isfinite(bf16).all()
    rel = np.abs(bf16 - f32) / np.abs(f32)
    assert rel.max() < LOSS_RTOL, (rel.max(), int(rel.argmax()))
    assert rel[0] > 0  # the two runs differ at all: bf16 rounding is there
    assert bf16[-5:].mean() < 0.8 * bf16[:5].mean()  # and it trains


def test_bf16_keeps_float32_parameters_and_finite_grads(runs):
    state, rows = runs["bfloat16"]
    for tree in (state.params, state.opt_state, state.batch_stats):
        for leaf in jax.tree.leaves(tree):
            if jnp.issubdtype(leaf.dtype, jnp.floating):
                assert leaf.dtype == jnp.float32
                assert np.isfinite(np.asarray(leaf)).all()
    # The global gradient norm is finite iff every gradient entry is.
    assert all(np.isfinite(r["grad_norm"]) and r["grad_norm"] > 0 for r in rows)


def _matmul_operand_types(text: str) -> list[tuple[str, str]]:
    """(op, operand element types) of every dot_general / convolution in StableHLO text."""
    found = []
    for line in text.splitlines():
        op = re.search(r"stablehlo\.(dot_general|convolution)\b", line)
        sig = re.search(r":\s*\((tensor<[^)]*)\)\s*->", line)
        if op and sig:
            types = tuple(sorted(set(re.findall(r"x?(bf16|f32|f16|f64)>", sig.group(1)))))
            found.append((op.group(1), "/".join(types)))
    return found


@pytest.mark.parametrize("fused", [False, True], ids=["head", "fused_head"])
@pytest.mark.parametrize("dtype,element", [("bfloat16", "bf16"), ("float32", "f32")])
def test_compiled_step_matmuls_use_the_compute_dtype(dtype, element, fused):
    """Every matmul and convolution of the train step (forward and backward) takes
    operands of the compute dtype; fails if a cast to bf16 is lost anywhere. Also with
    the paper head's NLL fused into the loss (``fused_head``, chunked over K)."""
    if fused:
        state, step, mesh = _setup(dtype, LossConfig(fused_head=True, k_chunk=2),
                                   mdn_head="paper")
    else:
        state, step, mesh = _setup(dtype)
    x = shard_batch(_dataset(BATCH), mesh)
    ops = _matmul_operand_types(step.lower(state, x).as_text())
    kinds = {op for op, _ in ops}
    assert kinds == {"dot_general", "convolution"}, kinds  # the parser sees both kinds
    assert all(t == element for _, t in ops), [o for o in ops if o[1] != element]


def test_bf16_outputs_are_float32_and_close():
    """Model outputs (embeddings, reconstruction, mixture) are float32 in both dtypes."""
    images = jnp.asarray(_dataset(2))
    variables = init_variables(get_variant("tiny"), jax.random.PRNGKey(0), (32, 32, 3))
    apply = jax.jit(lambda model, v, x: model.apply(v, x, train=False), static_argnums=0)
    outs = {dt: apply(get_variant("tiny", dtype=dt), variables, images)
            for dt in ("float32", "bfloat16")}
    for leaf_a, leaf_b in zip(jax.tree.leaves(outs["float32"]), jax.tree.leaves(outs["bfloat16"])):
        assert leaf_a.dtype == leaf_b.dtype == jnp.float32
    z32, z16 = outs["float32"]["embeddings"], outs["bfloat16"]["embeddings"]
    # Embeddings after 2 transformer blocks in bf16: a few bf16 spacings of their scale.
    assert float(jnp.max(jnp.abs(z16 - z32))) < 0.05 * float(jnp.max(jnp.abs(z32)))


def test_dtype_is_a_config_override_and_checked():
    config = apply_overrides(base_config(), ["model.variant=tiny",
                                             "model.overrides.dtype=bfloat16"])
    assert build_model(config).dtype == "bfloat16"
    assert build_model(base_config()).dtype == "float32"
    with pytest.raises(ValueError, match=r"model\.overrides\.dtype.*float16"):
        get_variant("tiny", dtype="float16")


def test_cli_bad_dtype_exits_2_and_writes_nothing(tmp_path, capsys):
    from vtadl_jax import cli

    workdir = tmp_path / "run"
    rc = cli.main(["train", "--config", str(ROOT / "experiments" / "configs" / "vtadl_tiny.py"), "--workdir",
                   str(workdir), f"data.root={tmp_path}", "model.overrides.dtype=float16"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "model.overrides.dtype" in err and "bfloat16" in err and "Traceback" not in err
    assert not workdir.exists()
