"""Orbax checkpoints of the VT-ADL train state.

Layout: ``<workdir>/checkpoints/<step>/{state, config}``: ``state`` is the whole
``TrainState`` (step, params, batch_stats, opt_state, rng) saved with
``StandardSave`` and restored exactly with ``StandardRestore`` against the abstract
tree of a freshly initialised state (shardings included); ``config`` is the run's
ConfigDict as JSON. Saves are atomic (orbax writes to a temporary directory and
renames it when complete), so an interrupted or failed run never leaves a partial
checkpoint under a step name. Kept: the latest ``keep`` checkpoints plus the best
``keep_best`` by a metric passed at save time (e.g. the mean training loss since the
previous save, or a validation metric).
"""
from __future__ import annotations

import json
import os
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as ocm

from vtadl_jax.train.state import TrainState


def make_manager(directory: str, *, keep: int = 3, keep_best: int = 1,
                 best_metric: str = "train_loss", best_mode: str = "min",
                 async_save: bool = True) -> ocp.CheckpointManager:
    """A CheckpointManager keeping the last ``keep`` and the best ``keep_best`` steps.

    Args:
      directory: where step directories are written (created if missing).
      keep: number of most recent checkpoints kept (>= 1).
      keep_best: number of best checkpoints kept by ``best_metric`` (0: none).
      best_metric: key of the metrics dict passed to ``save_state``.
      best_mode: "min" (lower is better, e.g. a loss) or "max" (e.g. an AUROC).
      async_save: write in a background thread (``wait_until_finished`` to join).
    """
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    if best_mode not in ("min", "max"):
        raise ValueError(f"best_mode must be 'min' or 'max', got {best_mode!r}")
    policies: list[Any] = [ocm.LatestN(n=keep)]
    if keep_best > 0:
        # BestN keeps the last n after sorting; reverse=True sorts descending (for "min").
        policies.append(ocm.BestN(get_metric_fn=lambda m: m[best_metric],
                                  reverse=best_mode == "min", n=keep_best,
                                  keep_checkpoints_without_metrics=False))
    options = ocp.CheckpointManagerOptions(
        preservation_policy=ocm.AnyPreservationPolicy(policies),
        enable_async_checkpointing=async_save, create=True)
    return ocp.CheckpointManager(os.path.abspath(directory), options=options)


def save_state(manager: ocp.CheckpointManager, state: TrainState,
               metrics: Mapping[str, float] | None = None,
               config: Mapping[str, Any] | None = None) -> bool:
    """Save ``state`` at its own step with optional metrics and JSON config.

    Refuses a state with non-finite parameters (FloatingPointError): a checkpoint is
    only ever written for a good state.
    """
    step = int(jax.device_get(state.step))
    finite = all(bool(jnp.isfinite(x).all()) for x in jax.tree.leaves(state.params))
    if not finite:
        raise FloatingPointError(f"refusing to checkpoint step {step}: non-finite parameters")
    items = {"state": ocp.args.StandardSave(state)}
    if config is not None:
        items["config"] = ocp.args.JsonSave(json.loads(json.dumps(dict(config), default=list)))
    metrics = None if metrics is None else {k: float(v) for k, v in metrics.items()}
    return manager.save(step, args=ocp.args.Composite(**items), metrics=metrics, force=True)


def abstract_like(state: TrainState) -> TrainState:
    """ShapeDtypeStructs (with shardings) of ``state``, the target of a restore."""
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
        state)


def restore_state(manager: ocp.CheckpointManager, target: TrainState,
                  step: int | None = None) -> TrainState:
    """Restore the state saved at ``step`` (default: the latest) onto ``target``'s
    structure, dtypes and shardings (``target`` may be concrete or abstract)."""
    step = manager.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"no checkpoint in {manager.directory}")
    restored = manager.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_like(target))))
    return restored["state"]


def restore_config(manager: ocp.CheckpointManager, step: int | None = None) -> dict:
    """The JSON config saved with ``step`` (default: the latest)."""
    step = manager.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"no checkpoint in {manager.directory}")
    return manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]
