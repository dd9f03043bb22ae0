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

Damaged checkpoints (a truncated data file or ``_METADATA``, e.g. after a disk fault or
a copy cut short): ``restore_state`` without a step warns naming each checkpoint it
cannot read and restores the newest intact one; ``quarantine`` moves damaged ones out
of the way (never deletes them) so that a resumed run can save those steps again.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as ocm

from vtadl_jax.errors import CheckpointError
from vtadl_jax.train.state import TrainState

DAMAGED_DIR = "checkpoints_damaged"  # beside checkpoints/: where quarantine moves steps


def _warn(message: str) -> None:
    print(f"vtadl-jax: warning: {message}", file=sys.stderr, flush=True)


def _summary(err: BaseException) -> str:
    """First line of an error (tensorstore messages run to pages), at most 300 chars."""
    text = (str(err).strip().splitlines() or [type(err).__name__])[0]
    text = text.split(" See full TensorStore details")[0]  # then a repr of a bound method
    return f"{type(err).__name__}: {text[:300]}"


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


def step_path(manager: ocp.CheckpointManager, step: int) -> str:
    return os.path.join(str(manager.directory), str(step))


def _restore(manager: ocp.CheckpointManager, target: TrainState, step: int) -> TrainState:
    restored = manager.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_like(target))))
    return restored["state"]


def restore_newest_intact(manager: ocp.CheckpointManager, target: TrainState
                          ) -> tuple[TrainState, int, list[int]]:
    """(state, its step, the newer steps that could not be restored), newest first.

    Each unreadable checkpoint is named in a warning; ``CheckpointError`` when none can
    be restored (``FileNotFoundError`` when there is none).
    """
    steps = sorted(manager.all_steps(), reverse=True)
    if not steps:
        raise FileNotFoundError(f"no checkpoint in {manager.directory}")
    damaged, errors = [], []
    for step in steps:
        try:
            state = _restore(manager, target, step)
        # orbax/tensorstore raise plain Exception (as well as ValueError, OSError, ...)
        # for a truncated file; the error is reported, not swallowed.
        except Exception as err:  # noqa: BLE001
            damaged.append(step)
            errors.append(_summary(err))
            _warn(f"checkpoint {step_path(manager, step)} (step {step}) cannot be restored "
                  f"({errors[-1]})")
            continue
        if damaged:
            _warn(f"restored step {step} from {step_path(manager, step)}, the newest intact "
                  f"checkpoint (unreadable: steps {damaged})")
        return state, step, damaged
    raise CheckpointError(
        f"{manager.directory}: no checkpoint can be restored (steps {steps} are damaged or "
        f"do not match the config's model/optimiser; first error: {errors[0]}); nothing was "
        "changed. Expected at least one intact checkpoint, or start a fresh --workdir")


def quarantine(manager: ocp.CheckpointManager, steps: list[int]) -> list[str]:
    """Move the checkpoints of ``steps`` to ``<checkpoints>/../checkpoints_damaged/`` (kept
    for inspection, out of orbax's way); return the new paths."""
    root = os.path.join(os.path.dirname(str(manager.directory).rstrip("/")), DAMAGED_DIR)
    os.makedirs(root, exist_ok=True)
    moved = []
    for step in steps:
        dest, n = os.path.join(root, str(step)), 1
        while os.path.exists(dest):
            dest, n = os.path.join(root, f"{step}.{n}"), n + 1
        shutil.move(step_path(manager, step), dest)
        _warn(f"damaged checkpoint of step {step} moved to {dest}")
        moved.append(dest)
    manager.reload()
    return moved


def restore_state(manager: ocp.CheckpointManager, target: TrainState,
                  step: int | None = None) -> TrainState:
    """Restore the state saved at ``step`` onto ``target``'s structure, dtypes and
    shardings (``target`` may be concrete or abstract). Default: the newest intact
    checkpoint (``restore_newest_intact``). A ``step`` that cannot be restored is a
    ``CheckpointError`` naming its path."""
    if step is None:
        return restore_newest_intact(manager, target)[0]
    if step not in manager.all_steps():
        raise FileNotFoundError(f"no checkpoint of step {step} in {manager.directory} "
                                f"(steps: {sorted(manager.all_steps())})")
    try:
        return _restore(manager, target, step)
    except Exception as err:  # noqa: BLE001  (see restore_newest_intact)
        raise CheckpointError(f"{step_path(manager, step)}: checkpoint of step {step} cannot "
                              f"be restored ({_summary(err)})") from err


def restore_config(manager: ocp.CheckpointManager, step: int | None = None) -> dict:
    """The JSON config saved with ``step`` (default: the latest)."""
    step = manager.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"no checkpoint in {manager.directory}")
    return manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]
