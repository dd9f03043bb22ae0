"""The VT-ADL training loop: ``train(config, workdir, train_source)``.

Mishra et al. 2021 (VT-ADL). One process per host; every process runs this function.
Multi-host: set ``config.distributed = True`` (or export ``JAX_COORDINATOR_ADDRESS``)
and ``jax.distributed.initialize()`` is called first (coordinator, process count and id
from a cluster JAX detects: SLURM, Open MPI, Cloud TPU; or from JAX_COORDINATOR_ADDRESS,
JAX_NUM_PROCESSES and JAX_PROCESS_ID, see ``vtadl_jax.multihost``);
each process then reads its own B / process_count rows of every global batch from the
data layer (``batches`` uses ``jax.process_index()``) and the step is data-parallel over
all devices of all hosts. On one host nothing needs to be set.

Per step: one JSON line in ``<workdir>/metrics.jsonl`` (step, loss, nll, mse, ssim,
ssim_term, grad_norm, images_per_s) and a tqdm bar. A non-finite loss term stops the run
with ``FloatingPointError`` naming the step and the term; the last good checkpoint is
left intact (a non-finite state is never saved; orbax saves are atomic).
``config.resume = True`` restores the latest checkpoint (step, params, batch_stats,
opt_state, rng) and restarts the data stream at that step, so that the result equals an
uninterrupted run.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Any, Callable, Iterator, Mapping

import jax
import ml_collections
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from tqdm.auto import tqdm

from vtadl_jax import records
from vtadl_jax.config_checks import check_vtadl_config
from vtadl_jax.errors import RunRecordError
from vtadl_jax.models.variants import get_variant
from vtadl_jax.models.vtadl import VTADL
from vtadl_jax import multihost
from vtadl_jax.train import checkpoint as ckpt
from vtadl_jax.train.optim import make_optimizer
from vtadl_jax.train.state import TrainState, abstract_train_state, create_train_state
from vtadl_jax.train.step import LossConfig, make_mesh, make_train_step, shard_batch

BatchIteratorFn = Callable[[int], Iterator[Mapping[str, Any]]]
RANGES = {"[-1,1]": (-1.0, 1.0), "[0,1]": (0.0, 1.0)}
CHECKED_TERMS = ("loss", "nll", "mse", "ssim")


def build_model(config: ml_collections.ConfigDict) -> VTADL:
    """The ``VTADL`` module of ``config.model`` (variant name + field overrides)."""
    overrides = dict(config.model.get("overrides", {}) or {})
    return get_variant(config.model.variant, **overrides)


def loss_config(config: ml_collections.ConfigDict) -> LossConfig:
    """``LossConfig`` from ``config.loss``; ssim_max_val None -> the input range's width."""
    fields = dict(config.get("loss", {}) or {})
    if fields.get("ssim_max_val") is None:
        lo, hi = _range(config.get("input_range", "[-1,1]"), "input_range")
        fields["ssim_max_val"] = hi - lo
    return LossConfig(**fields)


def _range(name: str, field: str) -> tuple[float, float]:
    if name not in RANGES:
        raise ValueError(f"config.{field} must be one of {sorted(RANGES)}, got {name!r}")
    return RANGES[name]


def rescale_images(images: np.ndarray, source_range: str, input_range: str) -> np.ndarray:
    """Linear map of pixel values from ``source_range`` to ``input_range``."""
    (a, b), (c, d) = _range(source_range, "data.source_range"), _range(input_range, "input_range")
    if (a, b) == (c, d):
        return images
    return (images - a) * ((d - c) / (b - a)) + c


def default_batch_iterator(config: ml_collections.ConfigDict, source) -> BatchIteratorFn:
    """start_step -> the data layer's endless, seeded, shuffled stream of this process's
    rows of every global batch (``vtadl_jax.data.batches``)."""
    from vtadl_jax.data import batches

    def make(start_step: int):
        return iter(batches(source, config.batch_size, seed=config.seed, shuffle=True,
                            drop_remainder=True, start_step=start_step,
                            process_index=jax.process_index(),
                            process_count=jax.process_count()))

    return make


def _read_log(path: str) -> list[tuple[int, str]]:
    """(step, line) of each record of ``metrics.jsonl``; a torn last line (a crash mid-write) is dropped with
    a warning, a damaged line elsewhere is a ``RunRecordError`` naming file and line."""
    with open(path) as f:
        lines = f.readlines()
    kept = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            if not isinstance(row, dict) or not isinstance(row.get("step"), int):
                raise ValueError("expected a JSON object with an int 'step'")
        except ValueError as err:
            if number == len(lines):
                print(f"vtadl-jax: warning: {path}, line {number}: dropped a torn last line "
                      f"({line[:60]!r}...)", file=sys.stderr, flush=True)
                continue
            raise RunRecordError(f"{path}, line {number}: not a metrics record ({err}); "
                                 "expected one JSON object per line. Repair or remove "
                                 "that line, then resume") from None
        kept.append((row["step"], line if line.endswith("\n") else line + "\n"))
    return kept


def _truncate_log(path: str, last_step: int) -> None:
    """Drop log lines of steps after ``last_step`` (left by a run that died after them)."""
    if not os.path.exists(path):
        return
    if last_step == 0:  # a fresh run: the old log (damaged or not) is not continued
        records.write_text_atomic("", path)
        return
    rows = _read_log(path)
    records.write_text_atomic("".join(line for step, line in rows if step <= last_step), path)


def _check_finite(metrics: Mapping[str, float], step: int, manager) -> None:
    bad = [k for k in CHECKED_TERMS if not math.isfinite(metrics[k])]
    if bad:
        manager.wait_until_finished()
        values = ", ".join(f"{k}={metrics[k]}" for k in CHECKED_TERMS)
        raise FloatingPointError(
            f"non-finite loss term(s) {bad} at step {step} ({values}); training stopped. "
            f"Last good checkpoint: step {manager.latest_step()} in {manager.directory}")


def _compile_then_sync(step_fn, state, images):
    """Multi-process: compile the step on every process, then wait for all of them
    (a coordination-service barrier) before its first run. Processes finish compiling at
    different times, and CPU (gloo) collectives give up when their peers arrive more
    than 30 s apart."""
    compiled = step_fn.lower(state, images).compile()
    multihost.barrier("train_step_compiled", timeout_s=1800)
    return compiled


def train(config: ml_collections.ConfigDict, workdir: str, train_source=None, *,
          batch_iterator: BatchIteratorFn | None = None,
          eval_fn: Callable[[TrainState], Mapping[str, float]] | None = None,
          before_write: Callable[[], None] | None = None) -> tuple[TrainState, dict]:
    """Train VT-ADL; return (final state, summary dict).

    Args:
      config: see ``experiments/configs/vtadl_tiny.py`` for the fields.
      workdir: output directory (checkpoints/, metrics.jsonl, config.json).
      train_source: a random-access Source of dicts with "image" (H, W, C) float32;
        consumed with ``vtadl_jax.data.batches`` unless ``batch_iterator`` is given.
      batch_iterator: optional ``start_step -> iterator`` of dicts with "image" of this
        process's rows (B / process_count, H, W, C); it must restart the stream at
        ``start_step`` for exact resumption.
      eval_fn: optional ``state -> metrics`` run at every checkpoint; its keys may be
        used as ``config.checkpoint.best_metric``.
      before_write: optional, called once the checkpoint to resume from is restored
        and metrics.jsonl is checked, before config.json is written (the pipeline
        writes its run record there, so a resume that fails changes no record).
    """
    multihost.maybe_initialize_distributed(config)
    check_vtadl_config(config)
    model, tx, loss_cfg = build_model(config), make_optimizer(**config.optim), loss_config(config)
    mesh = make_mesh()
    if config.batch_size % mesh.size:
        raise ValueError(f"config.batch_size={config.batch_size} is not divisible by the "
                         f"{mesh.size} devices")
    image_shape = (*model.image_size, model.channels)
    is_main = jax.process_index() == 0
    os.makedirs(workdir, exist_ok=True)

    c = config.checkpoint
    manager = ckpt.make_manager(os.path.join(workdir, "checkpoints"), keep=c.keep,
                                keep_best=c.keep_best, best_metric=c.best_metric,
                                best_mode=c.best_mode, async_save=c.get("async_save", True))
    replicated = NamedSharding(mesh, P())
    damaged: list[int] = []
    resuming = config.get("resume", True) and manager.latest_step() is not None
    if resuming:  # restored onto abstract shapes: no concrete template state first
        state = abstract_train_state(model, tx, image_shape, replicated)
    else:
        state = create_train_state(model, tx, config.seed, image_shape, sharding=replicated)
    log_path = os.path.join(workdir, "metrics.jsonl")
    try:
        if resuming:
            state, _, damaged = ckpt.restore_newest_intact(manager, state)
        start = int(jax.device_get(state.step))
        if is_main:
            _truncate_log(log_path, start)
    except BaseException:
        manager.close()
        raise
    if before_write is not None:
        before_write()
    if is_main:
        records.write_text_atomic(config.to_json_best_effort(indent=2),
                                  os.path.join(workdir, "config.json"))
        if damaged:  # out of the way (kept), so these steps can be saved again
            ckpt.quarantine(manager, damaged)
    if batch_iterator is None:
        if train_source is None:
            raise ValueError("train: give train_source or batch_iterator")
        batch_iterator = default_batch_iterator(config, train_source)
    stream = batch_iterator(start)
    step_fn = make_train_step(model, tx, loss_cfg, mesh)
    source_range = config.data.get("source_range", "[-1,1]")
    input_range = config.get("input_range", "[-1,1]")

    metrics: dict[str, float] = {}
    since_save: list[float] = []
    bar = tqdm(total=config.num_steps, initial=start, disable=not (is_main and config.get(
        "progress", True)), desc="vtadl", dynamic_ncols=True)
    log = open(log_path, "a") if is_main else None
    try:
        for step in range(start + 1, config.num_steps + 1):
            try:
                batch = next(stream)
            except StopIteration:
                raise RuntimeError(f"the batch stream ended before step {step}") from None
            images = np.asarray(batch["image"], np.float32).reshape(-1, *image_shape)
            images = rescale_images(images, source_range, input_range)
            global_images = shard_batch(images, mesh)
            if step == start + 1 and jax.process_count() > 1:
                step_fn = _compile_then_sync(step_fn, state, global_images)
            t0 = time.perf_counter()
            state, m = step_fn(state, global_images)
            metrics = {k: float(v) for k, v in jax.device_get(m).items()}
            metrics["images_per_s"] = config.batch_size / (time.perf_counter() - t0)
            _check_finite(metrics, step, manager)
            since_save.append(metrics["loss"])
            if log is not None:
                log.write(json.dumps({"step": step, **metrics}) + "\n")
                log.flush()
            bar.update(1)
            bar.set_postfix(loss=f"{metrics['loss']:.4g}", mse=f"{metrics['mse']:.3g}")
            if step % c.every_steps == 0 or step == config.num_steps:
                saved = {"train_loss": float(np.mean(since_save))}
                if eval_fn is not None:
                    saved.update({k: float(v) for k, v in eval_fn(state).items()})
                ckpt.save_state(manager, state, saved, config.to_dict())
                since_save = []
        manager.wait_until_finished()
        summary = {"step": int(jax.device_get(state.step)), "metrics": metrics,
                   "latest_checkpoint": manager.latest_step(), "workdir": workdir}
    finally:
        bar.close()
        if log is not None:
            log.close()
        manager.close()  # waits for a pending async save
    return state, summary


def load_trained(workdir: str, step: int | None = None
                 ) -> tuple[VTADL, dict, ml_collections.ConfigDict]:
    """(model, {"params", "batch_stats"}, config) of a run in ``workdir`` for scoring.

    Reads ``<workdir>/config.json``, rebuilds the model and restores the checkpoint of
    ``step`` (default: the latest) onto the first local device.
    """
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"no config.json in {workdir}")
    with open(path) as f:
        config = ml_collections.ConfigDict(json.load(f))
    model = build_model(config)
    tx = make_optimizer(**config.optim)
    shape = (*model.image_size, model.channels)
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = abstract_train_state(model, tx, shape, device)
    manager = ckpt.make_manager(os.path.join(workdir, "checkpoints"), async_save=False)
    try:
        state = ckpt.restore_state(manager, target, step)
    finally:
        manager.close()
    return model, {"params": state.params, "batch_stats": state.batch_stats}, config

