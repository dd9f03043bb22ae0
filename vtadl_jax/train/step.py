"""The VT-ADL loss and one pure, data-parallel train step.

Loss (Mishra et al. 2021, eq. 9): L = NLL + 5 * MSE(x, x_hat) + 0.5 * SSIM-term, with
SSIM-term = 1 - SSIM (default) or -SSIM (the code; same gradient). SSIM: Gaussian window
11, sigma 1.5, zero "same" padding (pytorch_ssim, as the code); for images smaller
than the window the window side is clamped to the largest odd number <= min(H, W).
NLL per image = sum over patches (the code's reduction; ``nll_reduction="mean"``
averages over patches instead), then averaged over the batch.

Data parallelism: ``train_step`` runs per device inside ``jax.shard_map`` over a mesh
axis named "batch". Each device holds the full (replicated) state and B / n_devices
images; gradients, loss components and BatchNorm statistics (Flax ``BatchNorm`` with
``axis_name="batch"``) are averaged across devices with ``lax.pmean``. The training
noise is drawn per example from fold_in(fold_in(state.rng, step), global example index)
where the global index is axis_index * B_local + local index, so every device draws
different noise and a run on n devices draws exactly the noise of a one-device run of the
same global batch.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Literal

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax import lax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from vtadl_jax.kernels.ssim import ssim
from vtadl_jax.models.mdn import fused_paper_nll, patch_nll
from vtadl_jax.models.precision import at_least_float32, flax_dtype
from vtadl_jax.train.state import TrainState

BATCH_AXIS = "batch"


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """Weights and options of the VT-ADL loss (hashable: a static jit argument)."""

    nll_weight: float = 1.0
    mse_weight: float = 5.0
    ssim_weight: float = 0.5
    ssim_form: Literal["one_minus", "negative"] = "one_minus"
    ssim_max_val: float = 2.0  # data range: 2 for [-1, 1] images, 1 for [0, 1]
    ssim_filter_size: int = 11
    ssim_sigma: float = 1.5
    nll_reduction: Literal["sum", "mean"] = "sum"
    k_chunk: int | None = None
    fused_head: bool = False  # paper head only: mixture_nll_from_head, chunked over K


def ssim_window(filter_size: int, height: int, width: int) -> int:
    """The SSIM window side, clamped to the largest odd number <= min(H, W)."""
    side = min(height, width)
    return filter_size if filter_size <= side else side - (1 - side % 2)


def vtadl_losses(model: nn.Module, params, out: dict, images: jax.Array,
                 cfg: LossConfig) -> dict[str, jax.Array]:
    """Loss components of one (local) batch.

    Args:
      model: the ``VTADL`` module (for its head settings).
      params: its parameters (used by the fused head).
      out: the model output dict for ``images``.
      images: (B, H, W, C) targets.
      cfg: loss settings.

    Returns:
      dict of scalars: loss, nll, mse, ssim, ssim_term.
    """
    # float32 whatever the model's compute dtype (bf16 mixed precision): the mixture
    # likelihood, MSE and SSIM statistics are not computed in bfloat16.
    z, recon = at_least_float32(out["embeddings"]), at_least_float32(out["recon"])
    if cfg.fused_head and model.mdn_head == "paper":
        # Mixed precision: the head's maps multiply in the model's compute dtype, as
        # the unfused head does, but accumulate in float32.
        nll_patch = fused_paper_nll(z, params["mdn"], k_chunk=cfg.k_chunk,
                                    scale_floor=model.scale_floor,
                                    matmul_dtype=flax_dtype(model.dtype))
    else:
        mixture = jax.tree.map(at_least_float32, out["mixture"])
        nll_patch = patch_nll(z, mixture, head=model.mdn_head, k_chunk=cfg.k_chunk)
    if cfg.nll_reduction == "sum":
        nll = jnp.mean(jnp.sum(nll_patch, axis=-1))
    elif cfg.nll_reduction == "mean":
        nll = jnp.mean(nll_patch)
    else:
        raise ValueError(f"nll_reduction must be 'sum' or 'mean', got {cfg.nll_reduction!r}")
    mse = jnp.mean(jnp.square(recon - images))
    fs = ssim_window(cfg.ssim_filter_size, images.shape[1], images.shape[2])
    s = jnp.mean(ssim(images, recon, max_val=cfg.ssim_max_val, filter_size=fs,
                      filter_sigma=cfg.ssim_sigma, padding="same"))
    if cfg.ssim_form == "one_minus":
        ssim_term = 1.0 - s
    elif cfg.ssim_form == "negative":
        ssim_term = -s
    else:
        raise ValueError(f"ssim_form must be 'one_minus' or 'negative', got {cfg.ssim_form!r}")
    loss = cfg.nll_weight * nll + cfg.mse_weight * mse + cfg.ssim_weight * ssim_term
    return {"loss": loss, "nll": nll, "mse": mse, "ssim": s, "ssim_term": ssim_term}


def train_step(state: TrainState, images: jax.Array, *, model: nn.Module,
               tx: optax.GradientTransformation, loss_cfg: LossConfig,
               axis_name: str | None = BATCH_AXIS) -> tuple[TrainState, dict]:
    """One optimiser step on the local shard ``images`` (B_local, H, W, C).

    Pure; call it inside ``shard_map``/``pmap`` with ``axis_name`` bound (or with
    ``axis_name=None`` on one device). The model must have been built with
    ``bn_axis_name=axis_name``. Returns the new state and the device-averaged metrics.
    """
    b_local = images.shape[0]
    shard = lax.axis_index(axis_name) if axis_name is not None else 0
    example_ids = shard * b_local + jnp.arange(b_local)
    noise_key = jax.random.fold_in(state.rng, state.step)

    def loss_fn(params):
        out, updates = model.apply(
            {"params": params, "batch_stats": state.batch_stats}, images, train=True,
            example_ids=example_ids, rngs={"noise": noise_key}, mutable=["batch_stats"])
        losses = vtadl_losses(model, params, out, images, loss_cfg)
        return losses["loss"], (losses, updates["batch_stats"])

    params = state.params
    if axis_name is not None:
        # Mark the replicated parameters as device-varying so that the gradient is the
        # local one (otherwise shard_map's transpose already psums it); pmean below.
        params = lax.pcast(params, axis_name, to="varying")
    grads, (losses, batch_stats) = jax.grad(loss_fn, has_aux=True)(params)
    if axis_name is not None:
        grads = lax.pmean(grads, axis_name)
        losses = lax.pmean(losses, axis_name)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    losses["grad_norm"] = optax.global_norm(grads)
    new_state = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats,
                              opt_state=opt_state)
    return new_state, losses


def make_mesh(devices=None) -> Mesh:
    """A 1-D mesh with axis "batch" over ``devices`` (default: all devices)."""
    devices = list(jax.devices() if devices is None else devices)
    return jax.make_mesh((len(devices),), (BATCH_AXIS,), devices=devices,
                         axis_types=(jax.sharding.AxisType.Auto,))


@functools.lru_cache(maxsize=32)
def make_train_step(model: nn.Module, tx: optax.GradientTransformation,
                    loss_cfg: LossConfig, mesh: Mesh, *, donate: bool = True):
    """Jitted data-parallel step ``(state, images) -> (state, metrics)``.

    ``state`` is replicated over ``mesh`` and ``images`` is the global batch
    (B, H, W, C) sharded along B over the "batch" axis (B divisible by the mesh size).
    ``model`` is rebuilt with ``bn_axis_name="batch"``. Cached on its (hashable)
    arguments so that repeated ``train`` calls in one process compile once.
    """
    model = model.clone(bn_axis_name=BATCH_AXIS)
    step = functools.partial(train_step, model=model, tx=tx, loss_cfg=loss_cfg,
                             axis_name=BATCH_AXIS)
    sharded = jax.shard_map(step, mesh=mesh, in_specs=(P(), P(BATCH_AXIS)),
                            out_specs=(P(), P()))
    return jax.jit(sharded, donate_argnums=(0,) if donate else ())


def replicate(tree, mesh: Mesh):
    """Place a pytree fully replicated on ``mesh``."""
    return jax.device_put(tree, NamedSharding(mesh, P()))


def shard_batch(local_images, mesh: Mesh) -> jax.Array:
    """Global batch array from this process's rows (B_process, H, W, C), split on "batch"."""
    return jax.make_array_from_process_local_data(NamedSharding(mesh, P(BATCH_AXIS)),
                                                  local_images)
