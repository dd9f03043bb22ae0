"""VT-ADL end to end: train from a config, evaluate a work directory, predict files.

Work directory layout:
    run.json           method + full config (written when training starts)
    config.json        the training loop's copy of the config
    config_history/    configs replaced by a resume with changed settings (resume.py)
    checkpoints/       orbax: latest few + best (params, batch_stats, opt_state, rng)
    metrics.jsonl      loss components per step
    eval/              metrics.json, overlays.png, roc.png
"""

from __future__ import annotations

import os
import time
from typing import Sequence

import jax
import ml_collections
import numpy as np

from vtadl_jax import calibration, multihost, records
from vtadl_jax.config_checks import (check_model_and_data, check_training_data,
                                     check_vtadl_config)
from vtadl_jax.methods import vtadl_scoring
from vtadl_jax.pipelines import common, inference, resume as resume_lib
from vtadl_jax.train import loop

METHOD = "vtadl"


def train_from_config(config: ml_collections.ConfigDict, workdir: str, *,
                      resume: bool = False, allow_config_change: bool = False):
    """Train on the normal images of `config.data` (split "train").

    Every check (config fields, resume settings, the data against the model, a
    writable `workdir`) runs before anything is written; a workdir without checkpoints
    (empty, or the records of a run that failed before its first save) never blocks a
    fresh run. `resume` refuses a changed config unless `allow_config_change`
    (see pipelines/resume.py). Multi-process (`distributed=True` or
    `JAX_COORDINATOR_ADDRESS`): every process trains; process 0 alone writes the run's
    records (run.json, config_history/, train_summary.json), as it alone writes
    metrics.jsonl and config.json in the loop.
    """
    # First: joining the other processes must precede anything that starts JAX's
    # backend (the config checks ask for the device count).
    multihost.maybe_initialize_distributed(config)
    check_vtadl_config(config)
    is_main = jax.process_index() == 0
    resume_lib.check_method(workdir, METHOD)
    has_checkpoints = bool(resume_lib.checkpoint_steps(workdir))
    if not resume and has_checkpoints:
        raise FileExistsError(
            f"{workdir} already holds checkpoints: pass --resume to continue that run, or "
            "choose another --workdir (nothing was overwritten)")
    config.resume = bool(resume)
    replaced = resume_lib.check_resume_config(workdir, config, allow_config_change) \
        if resume and has_checkpoints else None
    source = common.make_source(config.data, "train")
    check_training_data(config, source)
    records.ensure_writable(workdir, "work directory")

    def record_run():  # once the resume point is restored: a failed resume changes nothing
        if not is_main:
            return
        if replaced is not None:
            print(f"config changed on resume; previous one kept in "
                  f"{resume_lib.archive_config(workdir, *replaced)}")
        common.write_run(workdir, METHOD, config)

    start = time.perf_counter()
    state, summary = loop.train(config, workdir, source, before_write=record_run)
    summary["train_seconds"] = time.perf_counter() - start
    if is_main:
        calibration.discard(workdir)  # thresholds of the model before this training
        records.write_json_atomic(summary, os.path.join(workdir, "train_summary.json"))
        print(f"trained {summary['step']} steps in {summary['train_seconds']:.0f}s -> {workdir}")
    return state, summary


def scoring_options(config: ml_collections.ConfigDict) -> dict:
    """`vtadl_scoring.ScoringConfig` fields from a training config (`config.scoring`)."""
    lo, hi = loop.RANGES[config.get("input_range", "[-1,1]")]
    options = {"score_form": config.get("score_form", "default"), "ssim_max_val": hi - lo,
               "k_chunk": config.loss.get("k_chunk", None)}
    options.update(dict(config.get("scoring", {}) or {}))
    return options


def training_position_stats(model, variables, config: ml_collections.ConfigDict,
                            batch_size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """Per-position patch-NLL mean/std over the training split (for
    ``scoring.nll_normalization="per_position"``)."""
    source = common.make_source(config.data, "train")
    images = np.stack([source[i]["image"] for i in range(len(source))]).astype(np.float32)
    images = loop.rescale_images(images, config.data.get("source_range", "[-1,1]"),
                                 config.get("input_range", "[-1,1]"))
    return vtadl_scoring.position_statistics(model, variables, images, batch_size=batch_size,
                                             k_chunk=config.loss.get("k_chunk", None))


def make_predict(workdir: str, config: ml_collections.ConfigDict, batch_size: int = 32,
                 step: int | None = None):
    """images from the data source -> (maps (B, H, W), scores (B,)).

    step: the checkpoint to score (default the latest)."""
    model, variables, _ = loop.load_trained(workdir, step)
    options = scoring_options(config)
    source_range = config.data.get("source_range", "[-1,1]")
    input_range = config.get("input_range", "[-1,1]")
    stats = None
    if options.get("nll_normalization", "none") == "per_position":
        stats = training_position_stats(model, variables, config, batch_size)

    def predict(images: np.ndarray):
        x = loop.rescale_images(np.asarray(images, np.float32), source_range, input_range)
        out = vtadl_scoring.predict(model, variables, x, batch_size=batch_size,
                                    position_stats=stats, **options)
        return out["anomaly_map"], out["image_score"]

    return predict


def score_test_split(workdir: str, overrides: Sequence[str] = ()) -> dict | None:
    """Maps, scores and ground truth of the training config's test split.

    Under a multi-process launch each process scores its share and process 0 gets all
    of it (`common.collect_outputs_all_processes`); the other processes get None.
    """
    from vtadl_jax.configs import apply_overrides

    # First (joining must precede anything that starts JAX's backend): under a
    # multi-process launch (JAX_COORDINATOR_ADDRESS set) each process scores its share.
    multihost.maybe_initialize_distributed({})

    _, config = common.read_run(workdir)
    apply_overrides(config, [o if o.startswith("data.") else "data." + o for o in overrides])
    check_model_and_data(config)  # e.g. a data.image_size override the model cannot take
    records.ensure_writable(os.path.join(workdir, "eval"), "evaluation directory")
    source = common.make_source(config.data, "test")
    batch_size = max(1, int(config.get("eval_batch_size", 32)))
    predict = make_predict(workdir, config, batch_size)
    start = time.perf_counter()
    outputs = common.collect_outputs_all_processes(predict, source, batch_size,
                                                   os.path.join(workdir, "eval"), desc="evaluate")
    if outputs is None:  # another process than 0: its share went to process 0
        return None
    outputs["seconds"] = time.perf_counter() - start
    outputs["title"] = f"VT-ADL ({config.model.variant})"
    outputs["score_form"] = scoring_options(config)["score_form"]
    return outputs


def evaluate_workdir(workdir: str, *, num_overlays: int = 6,
                     overrides: Sequence[str] = ()) -> dict | None:
    """Score the test split of the training config's dataset; write the report."""
    outputs = score_test_split(workdir, overrides)  # None on processes other than 0

    def report() -> dict:
        extra = {"eval_seconds": outputs.pop("seconds"), "method": METHOD,
                 "score_form": outputs.pop("score_form")}
        return common.write_report(workdir, outputs, num_overlays=num_overlays, extra=extra,
                                   title=outputs.pop("title"))

    # Multi-process: process 0 writes the report; the others return None once it has.
    return multihost.process_0_only(report, "evaluate_report")


def scorer(workdir: str) -> inference.Scorer:
    """The trained model as an `inference.Scorer` (maps at the input resolution)."""
    _, config = common.read_run(workdir)
    batch_size = max(1, int(config.get("eval_batch_size", 32)))
    predict = make_predict(workdir, config, batch_size)
    return inference.Scorer(config.data, batch_size, lambda size: predict)


def predict_files(workdir: str, paths: Sequence[str], out_dir: str) -> list[dict]:
    """Scores, labels, masks and heatmaps of image files in `out_dir` (`inference`)."""
    return inference.predict_files(workdir, lambda: scorer(workdir), paths, out_dir)


def calibrate_workdir(workdir: str, **options) -> calibration.Thresholds | None:
    """Store decision thresholds (`inference.calibrate_workdir` options)."""
    return inference.calibrate_workdir(workdir, lambda: scorer(workdir),
                                       lambda: score_test_split(workdir), **options)
