"""Patch-Gaussian method end to end: fit from a config, save/load, evaluate, predict.

Work directory layout (everything `evaluate`/`predict` need):
    run.json            method + full config
    model/              orbax checkpoint: mean, chol, whiten (+ backbone variables)
    model_spec.json     PatchGaussianSpec, grid, number of training images, timings
    eval/               metrics.json, overlays.png, roc.png
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from vtadl_jax import calibration, multihost, records
from vtadl_jax.config_checks import check_patch_gaussian_config
from vtadl_jax.kernels import gaussian
from vtadl_jax.methods import patch_gaussian as pg
from vtadl_jax.models.backbones.registry import (Backbone, from_variables, load_backbone,
                                                  module_config_of)
from vtadl_jax.pipelines import common, inference, resume as resume_lib

METHOD = "patch_gaussian"


def spec_from_config(config: ml_collections.ConfigDict, backbone: Backbone) -> pg.PatchGaussianSpec:
    g, b = config.gaussian, config.backbone
    stages = tuple(b.stages)
    channel_indices = None
    if g.channel_subset:
        size = config.data.image_size
        probe = backbone.features(jnp.zeros((1, size, size, 3), jnp.float32))
        total = pg.combine_stages(probe, stages, g.upsample).shape[-1]
        channel_indices = pg.random_channel_subset(total, g.channel_subset, config.seed)
    return pg.PatchGaussianSpec(backbone=b.name, stages=stages, upsample=g.upsample,
                                channel_indices=channel_indices, eps=g.eps,
                                input_size=config.data.image_size, blur_sigma=g.blur_sigma,
                                score_path=g.score_path, seed=config.seed)


def feature_fn(backbone: Backbone, spec: pg.PatchGaussianSpec):
    """Jitted images (B, S, S, 3) in [0, 1] -> combined features (B, h, w, C)."""
    def fn(images):
        return pg.combine_stages(backbone.features(images), spec.stages, spec.upsample,
                                 spec.channel_indices)
    return fn


def _to_rgb01(images: np.ndarray) -> np.ndarray:
    """Data-layer images (scaled to [0, 1] by the config) -> 3-channel float32."""
    images = np.asarray(images, np.float32)
    if images.shape[-1] == 1:
        images = np.repeat(images, 3, axis=-1)
    return images


def local_statistics(config: ml_collections.ConfigDict, backbone: Backbone,
                     spec: pg.PatchGaussianSpec, source, *, index: int = 0, count: int = 1,
                     ) -> tuple[gaussian.PatchStats, tuple[int, int]]:
    """Statistics of process `index`'s contiguous share (of `count`) of `source`.

    An empty share (fewer images than processes) gives zero statistics of the right
    shape, which the cross-process merge ignores.
    """
    features = feature_fn(backbone, spec)
    part = multihost.share(source, index, count)
    if len(part) == 0:
        size = config.data.image_size
        shape = jax.eval_shape(features, jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32))
        _, h, w, c = shape.shape
        return gaussian.init(h * w, c, dtype=jnp.float32), (h, w)
    desc = multihost.progress_label("fit: features", index, count)
    batches = (features(_to_rgb01(b["image"])) for b in
               common.iterate_batches(part, config.batch_size, desc=desc))
    return pg.fit_statistics(batches, shard_positions=config.gaussian.shard_positions)


def fit_from_config(config: ml_collections.ConfigDict,
                    workdir: str) -> pg.PatchGaussianModel | None:
    """Extract features of the normal training images, fit, save to `workdir`.

    Multi-process (`config.distributed=True` or `JAX_COORDINATOR_ADDRESS` set; see
    `vtadl_jax.multihost`): each process reads and fits its own contiguous share of the
    training images, the statistics are merged across processes, and process 0 alone
    finalizes and writes the work directory; the others wait for it and return None.
    """
    # First: joining the other processes must precede anything that starts JAX's backend.
    multihost.maybe_initialize_distributed(config)
    check_patch_gaussian_config(config)
    index, count = jax.process_index(), jax.process_count()
    is_main = index == 0
    resume_lib.check_method(workdir, METHOD)
    existed = os.path.isdir(workdir)
    if is_main:  # before the long work: a read-only place is reported now
        records.ensure_writable(workdir, "work directory")

    try:
        backbone = load_backbone(config.backbone.name, config.backbone.weights or None,
                                 seed=config.seed)
        spec = spec_from_config(config, backbone)
        source = common.make_source(config.data, "train")
        start = time.perf_counter()
        stats, grid = local_statistics(config, backbone, spec, source, index=index,
                                       count=count)
        stats = pg.merge_across_processes(stats)
        # Process 0 finalizes and writes; the others return None once it has written
        # (or stop at once with its error, as PeerProcessError).
        return multihost.process_0_only(
            lambda: _finalize_and_save(config, workdir, stats, grid, spec, backbone, start,
                                       count), "fit_saved")
    except BaseException:
        if is_main and not existed:  # a failed fit leaves no directory it created
            records.remove_if_empty(workdir)
        raise


def _finalize_and_save(config: ml_collections.ConfigDict, workdir: str, stats, grid, spec,
                       backbone: Backbone, start: float,
                       count: int) -> pg.PatchGaussianModel:
    """Process 0's end of a fit (started at ``time.perf_counter()`` = ``start``): the
    model from the merged statistics, saved."""
    model = pg.finalize_model(stats, grid, spec, donate_stats=True)  # stats freed
    jax.block_until_ready(model.whiten)
    fit_seconds = time.perf_counter() - start
    calibration.discard(workdir)  # thresholds of a previous model do not fit this one
    save_model(workdir, model, backbone, extra={"fit_seconds": fit_seconds, "processes": count})
    # Last: a fit that fails earlier leaves a previous run's run.json, model/ and
    # model_spec.json untouched and consistent with each other.
    common.write_run(workdir, METHOD, config)
    print(f"fitted {model.num_images} images, grid {grid}, {model.mean.shape[-1]} channels "
          f"in {fit_seconds:.1f}s" + (f" over {count} processes" if count > 1 else "")
          + f" -> {workdir}")
    return model


def save_model(workdir: str, model: pg.PatchGaussianModel, backbone: Backbone,
               extra: dict | None = None) -> None:
    """Orbax checkpoint of the arrays and the backbone variables, plus a JSON spec.

    The checkpoint is written next to `model/` first and swapped in only when complete,
    so a failed save leaves a previous model in `workdir` loadable.
    """
    workdir = os.path.abspath(workdir)
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, "model")
    staging, retired = os.path.join(workdir, ".model-new"), os.path.join(workdir, ".model-old")
    for leftover in (staging, retired):
        if os.path.exists(leftover):
            shutil.rmtree(leftover)
    # Host copies: orbax will not write a process-local device array in a multi-process
    # run (it expects global arrays), and these are small next to the time to write them.
    tree = jax.tree.map(np.asarray, {"mean": model.mean, "chol": model.chol,
                                     "whiten": model.whiten, "backbone": backbone.variables})
    # Only the calling process writes (in a multi-process fit, process 0 alone saves).
    only_me = ocp.options.MultiprocessingOptions(primary_host=jax.process_index(),
                                                 active_processes={jax.process_index()})
    with ocp.StandardCheckpointer(multiprocessing_options=only_me) as ckptr:
        ckptr.save(staging, tree, force=True)
        ckptr.wait_until_finished()
    meta = {"spec": model.spec.to_json(), "grid": list(model.grid),
            "num_images": model.num_images, "backbone_config": module_config_of(backbone),
            **(extra or {})}
    if os.path.exists(path):
        os.rename(path, retired)
    os.rename(staging, path)
    records.write_json_atomic(meta, os.path.join(workdir, "model_spec.json"))
    if os.path.exists(retired):
        shutil.rmtree(retired)


def load_model(workdir: str) -> tuple[pg.PatchGaussianModel, Backbone]:
    """The fitted model and its frozen backbone from `workdir` (nothing else needed)."""
    meta_path = os.path.join(workdir, "model_spec.json")
    if not os.path.isfile(meta_path):
        raise FileNotFoundError(f"{meta_path}: no fitted patch-Gaussian model; run `vtadl-jax fit`")
    with open(meta_path) as f:
        meta = json.load(f)
    spec = pg.PatchGaussianSpec.from_json(meta["spec"])
    with ocp.StandardCheckpointer() as ckptr:
        tree = ckptr.restore(os.path.abspath(os.path.join(workdir, "model")))
    tree = jax.tree.map(jnp.asarray, tree)  # saved as host arrays (see save_model)
    backbone = from_variables(spec.backbone, tree["backbone"], meta.get("backbone_config"))
    model = pg.PatchGaussianModel(spec=spec, grid=tuple(meta["grid"]), mean=tree["mean"],
                                  chol=tree["chol"], whiten=tree["whiten"],
                                  num_images=meta["num_images"])
    return model, backbone


def make_predict(model: pg.PatchGaussianModel, backbone: Backbone, out_size: tuple[int, int]):
    """images (B, S, S, C) in [0, 1] -> (maps (B, H, W) at out_size, scores (B,))."""
    # The fitted arrays and the backbone variables are arguments of the jitted function,
    # not closed-over values: closed-over arrays are embedded in the program as constants
    # (17 MB of HLO for EfficientNet-Lite0; about 1 GB for ConTNet-B's 1536-channel model).
    arrays = {"mean": model.mean, "chol": model.chol, "whiten": model.whiten,
              "backbone": backbone.variables}

    @jax.jit
    def predict(arrays, images):
        m = dataclasses.replace(model, mean=arrays["mean"], chol=arrays["chol"],
                                whiten=arrays["whiten"])
        b = dataclasses.replace(backbone, variables=arrays["backbone"], _apply=None)
        return pg.anomaly_maps(m, feature_fn(b, model.spec)(images), out_size)

    return lambda images: jax.device_get(predict(arrays, _to_rgb01(images)))


def score_test_split(workdir: str, overrides: Sequence[str] = ()) -> dict | None:
    """Maps, scores and ground truth of the config's test split (`common.collect_outputs`).

    Under a multi-process launch each process scores its share and process 0 gets all
    of it (`common.collect_outputs_all_processes`); the other processes get None.
    """
    from vtadl_jax.configs import apply_overrides

    # First (joining must precede anything that starts JAX's backend): under a
    # multi-process launch (JAX_COORDINATOR_ADDRESS set) each process scores its share.
    multihost.maybe_initialize_distributed({})

    _, config = common.read_run(workdir)
    apply_overrides(config, [o if o.startswith("data.") else "data." + o for o in overrides])
    records.ensure_writable(os.path.join(workdir, "eval"), "evaluation directory")
    model, backbone = load_model(workdir)
    source = common.make_source(config.data, "test")
    size = source[0]["mask"].shape
    start = time.perf_counter()
    outputs = common.collect_outputs_all_processes(make_predict(model, backbone, size), source,
                                                   config.batch_size,
                                                   os.path.join(workdir, "eval"), desc="evaluate")
    if outputs is None:  # another process than 0: its share went to process 0
        return None
    outputs["seconds"] = time.perf_counter() - start
    outputs["title"] = f"patch Gaussians ({model.spec.backbone})"
    return outputs


def evaluate_workdir(workdir: str, *, num_overlays: int = 6,
                     overrides: Sequence[str] = ()) -> dict | None:
    """Score the test split of the config's dataset; write the evaluation report."""
    outputs = score_test_split(workdir, overrides)  # None on processes other than 0

    def report() -> dict:
        extra = {"eval_seconds": outputs.pop("seconds"), "method": METHOD}
        return common.write_report(workdir, outputs, num_overlays=num_overlays, extra=extra,
                                   title=outputs.pop("title"))

    # Multi-process: process 0 writes the report; the others return None once it has.
    return multihost.process_0_only(report, "evaluate_report")


def scorer(workdir: str) -> inference.Scorer:
    """The saved model as an `inference.Scorer` (maps at the images' size)."""
    _, config = common.read_run(workdir)
    model, backbone = load_model(workdir)
    return inference.Scorer(config.data, config.batch_size,
                            lambda size: make_predict(model, backbone, size))


def predict_files(workdir: str, paths: Sequence[str], out_dir: str) -> list[dict]:
    """Scores, labels, masks and heatmaps of image files in `out_dir` (`inference`)."""
    return inference.predict_files(workdir, lambda: scorer(workdir), paths, out_dir)


def calibrate_workdir(workdir: str, **options) -> calibration.Thresholds | None:
    """Store decision thresholds (`inference.calibrate_workdir` options)."""
    return inference.calibrate_workdir(workdir, lambda: scorer(workdir),
                                       lambda: score_test_split(workdir), **options)
