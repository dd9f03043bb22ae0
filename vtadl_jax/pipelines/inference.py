"""Decisions on images, the same for both methods: `predict` on files and `calibrate` a
work directory's thresholds (the decision metrics of `evaluate`: `common`).

A method's pipeline supplies a `Scorer` (its data config, a batch size and a factory of
`predict(images) -> (maps (B, H, W), scores (B,))`); everything else is here.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
from typing import Any, Callable, Iterator, Sequence

import ml_collections
import numpy as np
from tqdm.auto import tqdm

from vtadl_jax import calibration, multihost, records, report
from vtadl_jax.data.image_files import encode_png, find_image_files
from vtadl_jax.pipelines import common

Predict = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]


@dataclasses.dataclass
class Scorer:
    """How a work directory's model scores images (see the module doc)."""

    data: ml_collections.ConfigDict
    batch_size: int
    make_predict: Callable[[tuple[int, int]], Predict]  # out_size (H, W) -> predict
    _cache: dict = dataclasses.field(default_factory=dict)

    def __call__(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        size = tuple(images.shape[1:3])
        if size not in self._cache:
            self._cache[size] = self.make_predict(size)
        maps, scores = self._cache[size](images)
        return np.asarray(maps, np.float32), np.asarray(scores, np.float64)


def image_batches(paths: Sequence[str], data_cfg: ml_collections.ConfigDict, batch_size: int,
                  *, desc: str) -> Iterator[tuple[list[str], np.ndarray]]:
    """(paths, preprocessed images) in batches, with a progress bar; one batch in memory."""
    for start in tqdm(range(0, len(paths), batch_size), desc=desc, unit="batch", leave=False,
                      total=math.ceil(len(paths) / batch_size)):
        chunk = list(paths[start:start + batch_size])
        images = [common.load_image_for_inference(p, data_cfg) for p in chunk]
        shapes = {im.shape for im in images}
        if len(shapes) > 1:
            raise ValueError(f"{chunk[0]} and others: preprocessed images differ in shape "
                             f"{sorted(shapes)}; set data.image_size so all have one size")
        yield chunk, np.stack(images)


def score_files(scorer: Scorer, paths: Sequence[str], *, keep_maps: bool = True,
                desc: str = "scoring") -> tuple[np.ndarray, np.ndarray | None]:
    """(scores, maps or None) of image files (see `find_image_files` for the names)."""
    scores, maps = [], []
    for _, images in image_batches(paths, scorer.data, scorer.batch_size, desc=desc):
        m, s = scorer(images)
        scores.append(s)
        if keep_maps:
            maps.append(m)
    if not scores:  # no file (a process's empty share)
        return np.zeros((0,)), (np.zeros((0, 0, 0), np.float32) if keep_maps else None)
    return np.concatenate(scores), (np.concatenate(maps) if keep_maps else None)


def score_files_all_processes(scorer: Callable[[], Scorer], paths: Sequence[str],
                              directory: str) -> tuple[np.ndarray, np.ndarray] | None:
    """`score_files` (scores and maps) of `paths`, shared out among the processes of a
    multi-process launch: process 0 gets every row in order, the others None (the shares
    pass through `directory`; `multihost.gather_to_process_0`). One process: all here."""
    start, stop = multihost.share_bounds(len(paths))

    def local() -> dict[str, np.ndarray]:
        scores, maps = score_files(scorer(), paths[start:stop],
                                   desc=multihost.progress_label("scoring"))
        return {"scores": scores, "maps": maps}

    out = multihost.gather_to_process_0(local, directory, "normal_scores")
    return None if out is None else (out["scores"], out["maps"])


def calibrate_workdir(workdir: str, scorer: Callable[[], Scorer],
                      test_outputs: Callable[[], dict[str, np.ndarray]], *,
                      normal: Sequence[str] = (), fpr: float | None = None,
                      from_test: bool = False, image_threshold: float | None = None,
                      pixel_threshold: float | None = None) -> calibration.Thresholds | None:
    """Compute (or take) thresholds and store them; see `vtadl_jax.calibration`.

    None on the processes other than 0 of a multi-process calibration (each scores a
    share of the normal images or of the test split; process 0 saves)."""
    user = image_threshold is not None or pixel_threshold is not None
    if sum((bool(normal) and not user, from_test, user)) != 1:
        raise ValueError("calibrate: give exactly one of --normal-dir D --fpr R, --from-test, "
                         "or --image-threshold / --pixel-threshold (optionally with "
                         "--normal-dir D --fpr R for the normalisation scales)")
    if normal and fpr is None:
        raise ValueError("--normal-dir needs --fpr (a false-positive rate in (0, 1), e.g. 0.01)")
    if fpr is not None:
        calibration.check_fpr(fpr)  # before any scoring
        if not normal:
            raise ValueError("--fpr needs --normal-dir (a directory of normal images)")
    # Under a multi-process launch (JAX_COORDINATOR_ADDRESS set) each process scores a
    # share of the images and process 0 alone saves; joining precedes JAX's backend.
    multihost.maybe_initialize_distributed({})
    scored = test = None  # None on the processes other than 0 of a multi-process run
    if normal:
        paths = find_image_files(list(normal), what="--normal-dir")
        scored = score_files_all_processes(scorer, paths, workdir)
    if from_test:
        test = test_outputs()

    def decide_and_save() -> calibration.Thresholds:
        on_normal = None
        if normal:
            on_normal = calibration.from_normal(*scored, fpr, source=list(normal))
            print(f"scored {len(paths)} normal images")
        if from_test:
            thresholds = calibration.from_labelled(
                test["scores"], test["labels"], test["maps"],
                test["masks"] if test["masks"].ndim == 3 else None,
                source="calibrate --from-test: test split")
        elif user:
            thresholds = calibration.from_user(image_threshold, pixel_threshold,
                                               calibration.load(workdir), on_normal)
        else:
            thresholds = on_normal
        calibration.save(workdir, thresholds)
        print(f"{thresholds.mode}: image threshold {thresholds.image_threshold}, pixel "
              f"threshold {thresholds.pixel_threshold} -> {calibration.path(workdir)}")
        return thresholds

    # the others return once process 0 has saved (or stop with its error)
    return multihost.process_0_only(decide_and_save, "calibration_saved")


def _row(path: str, name: str, score: float, amap: np.ndarray,
         t: calibration.Thresholds | None) -> dict[str, Any]:
    row: dict[str, Any] = {"file": path, "name": name, "score": float(score),
                           "score_normalised": None, "label": None, "anomalous_pixels": None}
    if t is not None and t.image_threshold is not None:
        row["label"] = "anomalous" if score >= t.image_threshold else "normal"
        if t.image_scale:
            row["score_normalised"] = float(calibration.normalise(score, t.image_threshold,
                                                                  t.image_scale))
    if t is not None and t.pixel_threshold is not None:
        row["anomalous_pixels"] = float(np.mean(amap >= t.pixel_threshold))
    return row


def _write_image_outputs(out_dir: str, row: dict, image: np.ndarray, amap: np.ndarray,
                         t: calibration.Thresholds | None) -> None:
    stem = os.path.splitext(row["name"])[0]
    predicted = None
    shown, vmin, vmax, map_title = amap, None, None, "anomaly map (raw)"
    if t is not None and t.pixel_threshold is not None:
        predicted = amap >= t.pixel_threshold
        row["mask"] = os.path.join(out_dir, f"{stem}_mask.png")
        with open(row["mask"], "wb") as f:
            f.write(encode_png(predicted.astype(np.uint8) * 255))
        if t.pixel_scale:  # one colour scale for every image: 0.5 = the threshold
            shown = calibration.normalise(amap, t.pixel_threshold, t.pixel_scale)
            vmin, vmax, map_title = 0.0, 1.0, "normalised map (0.5 = threshold)"
    verdict = f"{row['label']}, " if row["label"] else ""
    value = (f"{row['score_normalised']:.2f} (raw {row['score']:.4g})"
             if row["score_normalised"] is not None else f"{row['score']:.4g}")
    row["heatmap"] = report.save_overlays(
        os.path.join(out_dir, f"{stem}_heatmap.png"), image[None], np.asarray(shown)[None],
        titles=[f"{stem}\n{verdict}score {value}"], vmin=vmin, vmax=vmax,
        predicted=None if predicted is None else predicted[None], map_title=map_title)


def predict_files(workdir: str, make_scorer: Callable[[], Scorer], specs: Sequence[str],
                  out_dir: str) -> list[dict[str, Any]] | None:
    """Per image: raw and normalised score, label, mask PNG, heatmap PNG; plus
    predictions.csv, predictions.json and scores.json (name -> raw score) in `out_dir`.
    The image names are checked before the model is loaded.

    Under a multi-process launch (`JAX_COORDINATOR_ADDRESS` set; `multihost`) each
    process scores a contiguous share of the files and writes their PNGs; process 0
    gathers the rows and alone writes the tables (the others return None)."""
    import jax

    multihost.maybe_initialize_distributed({})  # first: before JAX's backend starts
    paths = find_image_files(list(specs))
    thresholds = calibration.load(workdir)
    records.ensure_writable(out_dir, "--out directory")  # before the model loads
    scorer = make_scorer()
    index, count = jax.process_index(), jax.process_count()
    if thresholds is None and index == 0:
        print(f"no thresholds stored in {workdir}: raw scores only, no labels or masks "
              "(set them with `vtadl-jax calibrate`)")
    names = common.unique_names(paths)  # of all the files: the same on every process
    start, stop = multihost.share_bounds(len(paths), index, count)

    def local() -> dict[str, np.ndarray]:
        rows: list[dict[str, Any]] = []
        for chunk, images in image_batches(paths[start:stop], scorer.data, scorer.batch_size,
                                           desc=multihost.progress_label("predict")):
            maps, scores = scorer(images)
            for path, image, amap, score in zip(chunk, images, maps, scores):
                row = _row(path, names[start + len(rows)], score, amap, thresholds)
                _write_image_outputs(out_dir, row, image, amap, thresholds)
                rows.append(row)
        return {"rows": np.asarray([json.dumps(r) for r in rows], dtype=object)}

    gathered = multihost.gather_to_process_0(local, out_dir, "predictions")

    def write_tables() -> list[dict[str, Any]]:
        rows = [json.loads(r) for r in gathered["rows"]]
        columns = ["name", "score", "score_normalised", "label", "anomalous_pixels", "file",
                   "heatmap", "mask"]
        with records.atomic_file(os.path.join(out_dir, "predictions.csv"), "w", suffix=".csv",
                                 newline="") as f:
            writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
            writer.writeheader()
            writer.writerows({c: ("" if r.get(c) is None else r.get(c)) for c in columns}
                             for r in rows)
        summary = {"workdir": os.path.abspath(workdir), "num_images": len(rows),
                   "num_anomalous": sum(r["label"] == "anomalous" for r in rows),
                   "thresholds": thresholds.to_json() if thresholds else None, "images": rows}
        if thresholds is None:
            summary["note"] = ("no thresholds stored: run `vtadl-jax calibrate` for labels "
                               "and masks")
        records.write_json_atomic(summary, os.path.join(out_dir, "predictions.json"))
        records.write_json_atomic({r["name"]: r["score"] for r in rows},
                                  os.path.join(out_dir, "scores.json"))
        _print_rows(rows, out_dir)
        return rows

    # the others return once process 0 has written the tables (or stop with its error)
    return multihost.process_0_only(write_tables, "predictions_written")


def _print_rows(rows: list[dict[str, Any]], out_dir: str, limit: int = 20) -> None:
    for r in rows[:limit]:
        normalised = r["score_normalised"]
        print(f"{r['name']}: score {r['score']:.6g}"
              + (f", normalised {normalised:.3f}" if normalised is not None else "")
              + (f", {r['label']}" if r["label"] else ""))
    if len(rows) > limit:
        print(f"... ({len(rows) - limit} more in predictions.csv)")
    labelled = [r for r in rows if r["label"] is not None]
    counts = (f"{sum(r['label'] == 'anomalous' for r in labelled)} of {len(rows)} images "
              "predicted anomalous; " if labelled else "")
    print(f"{counts}heatmaps, masks, predictions.csv and predictions.json in {out_dir}")
