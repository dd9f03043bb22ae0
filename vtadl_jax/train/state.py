"""Train state of VT-ADL: a plain pytree of arrays, so it checkpoints as is.

The Flax module and the optax transformation are kept outside the state (they are code
and configuration, not data), so that orbax saves and restores exactly the arrays
below and nothing else.
"""
from __future__ import annotations

import functools
import math
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax


@flax.struct.dataclass
class TrainState:
    """step: () int32, completed optimiser steps; params, batch_stats: Flax collections;
    opt_state: the optax state; rng: (2,) uint32 raw PRNG key (noise keys are derived
    from it by fold_in(rng, step), so a resumed run draws the same noise)."""

    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any
    rng: jax.Array


@functools.partial(jax.jit, static_argnames=("model", "image_shape"))
def init_variables(model: nn.Module, key: jax.Array, image_shape: tuple[int, int, int]):
    """Flax variables {"params", "batch_stats"} of ``model`` for (1, *image_shape) inputs.

    Jitted with the (hashable) module as a static argument, so equal models share one
    compilation (random initialisers compile slowly on CPU).
    """
    return model.init({"params": key, "noise": key},
                      jnp.zeros((1, *image_shape), jnp.float32), train=False)


def _init_state(model: nn.Module, tx: optax.GradientTransformation, key: jax.Array,
                image_shape: tuple[int, int, int]) -> TrainState:
    variables = model.init({"params": jax.random.fold_in(key, 0),
                            "noise": jax.random.fold_in(key, 0)},
                           jnp.zeros((1, *image_shape), jnp.float32), train=False)
    params = variables["params"]
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      batch_stats=variables.get("batch_stats", {}),
                      opt_state=tx.init(params), rng=jax.random.fold_in(key, 1))


@functools.lru_cache(maxsize=16)
def _jitted_init(model: nn.Module, tx: optax.GradientTransformation,
                 image_shape: tuple[int, int, int], sharding):
    """One jitted function: parameters, BatchNorm statistics and optimiser state are
    created on the device(s), placed by ``sharding`` (None: the default device)."""
    init = functools.partial(_init_state, model, tx, image_shape=image_shape)
    return jax.jit(init, out_shardings=sharding)


def create_train_state(model: nn.Module, tx: optax.GradientTransformation, seed: int,
                       image_shape: tuple[int, int, int], sharding=None) -> TrainState:
    """Initialise parameters (from ``seed``) and the optimiser state in one jitted call.

    No large tensor is built eagerly: the whole state (random initialisers, zeros of
    the Adam moments) is produced by a single compiled program, directly with the
    requested ``sharding`` (e.g. ``NamedSharding(mesh, P())`` for a replicated state).

    Args:
      model: a ``VTADL`` module (initialised with ``bn_axis_name=None``).
      tx: optax transformation.
      seed: integer seed; parameters use fold_in(key, 0), training noise fold_in(key, 1).
      image_shape: (H, W, C) of one image.
      sharding: optional ``jax.sharding.Sharding`` of every leaf of the state.
    """
    init = _jitted_init(model.clone(bn_axis_name=None), tx, tuple(image_shape), sharding)
    return init(jax.random.PRNGKey(seed))


def abstract_train_state(model: nn.Module, tx: optax.GradientTransformation,
                         image_shape: tuple[int, int, int], sharding=None) -> TrainState:
    """``ShapeDtypeStruct``s (with ``sharding``) of the train state: a restore target
    obtained by ``jax.eval_shape``, without computing or allocating any array."""
    shapes = jax.eval_shape(lambda: _init_state(model.clone(bn_axis_name=None), tx,
                                                jax.random.PRNGKey(0), tuple(image_shape)))
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
                        shapes)


def count_params(tree: Any) -> int:
    """Number of scalars in a pytree of arrays (or ShapeDtypeStructs)."""
    return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))
