"""What both methods' pipelines share: the work directory, data from a config, and the
evaluation report (metrics JSON with the decision metrics at the stored thresholds,
heatmap overlays, ROC curve). Predicting on files and calibrating: `inference`."""

from __future__ import annotations

import json
import math
import os
from typing import Any, Callable, Iterator, Sequence

import ml_collections
import numpy as np
from tqdm.auto import tqdm

from vtadl_jax import data as data_lib
from vtadl_jax import calibration, evaluate, metrics, multihost, records, report
from vtadl_jax.errors import RunRecordError
from vtadl_jax.metrics.decisions import confusion, mask_overlap

RUN_FILE = "run.json"


def write_run(workdir: str, method: str, config: ml_collections.ConfigDict) -> None:
    """Record the method and its full config in `workdir`/run.json (atomically)."""
    records.write_json_atomic({"method": method, "config": config.to_dict()},
                               os.path.join(workdir, RUN_FILE))


def read_run(workdir: str) -> tuple[str, ml_collections.ConfigDict]:
    path = os.path.join(workdir, RUN_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{path}: no run here; create one with `vtadl-jax train` or `vtadl-jax fit`")
    try:
        with open(path) as f:
            run = json.load(f)
        return run["method"], ml_collections.ConfigDict(run["config"])
    except (ValueError, KeyError, TypeError) as err:
        raise RunRecordError(f"{path}: damaged run record ({type(err).__name__}: {err}); "
                             "expected the JSON written by `vtadl-jax train` or `fit`") from None


def read_method(workdir: str) -> str:
    return read_run(workdir)[0]


def _size(data_cfg: ml_collections.ConfigDict) -> int | None:
    """The preset's size override: `data.image_size` (or its alias `data.size`)."""
    return data_cfg.get("image_size", None) or data_cfg.get("size", None)


def make_source(data_cfg: ml_collections.ConfigDict, split: str):
    """A data source from the `data` section of a config (see experiments/configs/*.py).

    Fields: name ("mvtec_ad/<category>", "btad/<product>", "mnist_one_class/<digit>",
    "folder"), root, preset, image_size (None = the preset's), scale (None = the
    preset's; "zero_one", "minus_one_one", "imagenet"), backend ("tfds" or "direct"),
    data_dir (TFDS directory), max_examples (MNIST subsets for quick runs).

    Multi-process: process 0 opens (and, with the TFDS backend, builds) the source
    first, the others after it (`multihost.process_0_first`), so that the processes
    never build one dataset into a shared data directory at the same time.
    """
    return multihost.process_0_first(lambda: _make_source(data_cfg, split),
                                     f"data_{split}")


def _make_source(data_cfg: ml_collections.ConfigDict, split: str):
    get = lambda key: data_cfg.get(key, None)  # noqa: E731
    kwargs = {}
    if get("scale"):
        kwargs["scale"] = data_cfg.scale
    preprocessing = data_lib.preset(data_cfg.preset, size=_size(data_cfg), **kwargs)
    return data_lib.make_source(
        data_cfg.name, split, root=get("root"), data_dir=get("data_dir"), preset=preprocessing,
        backend=get("backend") or "tfds", max_examples=get("max_examples"))


def load_image_for_inference(path: str, data_cfg: ml_collections.ConfigDict) -> np.ndarray:
    """One image file preprocessed exactly as the config's test images are."""
    get = lambda key: data_cfg.get(key, None)  # noqa: E731
    kwargs = {"scale": data_cfg.scale} if get("scale") else {}
    preprocessing = data_lib.preset(data_cfg.preset, size=_size(data_cfg), **kwargs)
    return preprocessing.image(data_lib.load_image(path))


def iterate_batches(source, batch_size: int, *, desc: str) -> Iterator[dict[str, np.ndarray]]:
    """Every example once, in order, with a progress bar (the last batch may be short)."""
    batches = data_lib.batches(source, batch_size, shuffle=False, drop_remainder=False, epochs=1)
    total = data_lib.num_batches(len(source), batch_size, drop_remainder=False)
    for batch in tqdm(batches, total=total, desc=desc, unit="batch", leave=False):
        valid = batch.pop("valid", None)
        if valid is not None and not valid.all():  # the padded last batch: real rows only
            batch = {k: v[valid] for k, v in batch.items()}
        yield batch


def collect_outputs(predict: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]], source,
                    batch_size: int, *, desc: str = "scoring") -> dict[str, Any]:
    """Run `predict(images) -> (maps (B, H, W), scores (B,))` over a test source.

    Returns maps (at the ground-truth resolution of the source), scores, masks, labels,
    defects and filenames, one row per example in source order, and "image_at": i ->
    the preprocessed image of row i, read again from the source. The images themselves
    are not kept (a 512 x 512 RGB float image is 3x its map), so memory grows with the
    maps only; the report reads back the few it draws.
    """
    out: dict[str, list] = {"maps": [], "scores": [], "masks": [], "labels": [], "defects": [],
                            "filenames": []}
    for batch in iterate_batches(source, batch_size, desc=desc):
        maps, scores = predict(batch["image"])
        out["maps"].append(np.asarray(maps, np.float32))
        out["scores"].append(np.asarray(scores, np.float64))
        out["masks"].append(np.asarray(batch["mask"]))
        out["labels"].append(np.asarray(batch["label"]))
        out["defects"].append(np.asarray(batch.get("defect", [""] * len(scores)), dtype=object))
        out["filenames"].append(np.asarray(batch.get("filename", [""] * len(scores)), dtype=object))
    result: dict[str, Any] = {k: np.concatenate(v) if v else np.zeros((0,), np.float32)
                              for k, v in out.items()}  # empty: a process's empty share
    result["image_at"] = _image_reader(source)
    return result


def _image_reader(source) -> Callable[[int], np.ndarray]:
    """i -> the preprocessed image of example i of ``source``."""
    return lambda i: np.asarray(source[int(i)]["image"])


def collect_outputs_all_processes(predict: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]],
                                  source, batch_size: int, directory: str, *,
                                  desc: str = "scoring") -> dict[str, Any] | None:
    """`collect_outputs` of the whole `source`, shared out among the processes.

    One process: `collect_outputs`. Several (`multihost`): each scores its contiguous
    share and process 0 gets every row in source order (`multihost.gather_to_process_0`,
    the shares passing through `directory`, which all processes must see); the others
    get None. A failure on any process stops process 0 with `PeerProcessError`.
    """
    def local():
        out = collect_outputs(predict, multihost.share(source), batch_size,
                              desc=multihost.progress_label(desc))
        del out["image_at"]  # reads this process's share; process 0 reads the whole source
        return out

    out = multihost.gather_to_process_0(local, directory, "scores")
    if out is not None:
        out["image_at"] = _image_reader(source)
    return out


def _clean(value: Any) -> Any:
    """JSON-safe: NaN (an undefined ratio) -> None."""
    return None if isinstance(value, float) and math.isnan(value) else value


def decision_metrics(outputs: dict[str, np.ndarray],
                     thresholds: calibration.Thresholds) -> dict[str, Any]:
    """Image confusion matrix and pixel IoU / Dice at the stored thresholds."""
    out: dict[str, Any] = {"thresholds": thresholds.to_json()}
    if thresholds.image_threshold is not None:
        for k, v in confusion(outputs["scores"], outputs["labels"],
                              thresholds.image_threshold).items():
            out[f"image_{k}"] = _clean(v)
    masks = outputs["masks"]
    if thresholds.pixel_threshold is not None and masks.ndim == 3 and masks.any():
        for k, v in mask_overlap(outputs["maps"], masks, thresholds.pixel_threshold).items():
            out[f"pixel_{k}"] = _clean(v)
    return out


def thresholds_for_evaluation(workdir: str, outputs: dict[str, np.ndarray]
                              ) -> tuple[calibration.Thresholds | None, str]:
    """The stored thresholds; without any, F1-max on this labelled split (stored)."""
    stored = calibration.load(workdir)
    if stored is not None:
        return stored, "stored"
    labels = outputs["labels"]
    if not 0 < labels.sum() < labels.size:
        return None, "none stored and the test split holds a single class"
    masks = outputs["masks"] if outputs["masks"].ndim == 3 else None
    thresholds = calibration.from_labelled(outputs["scores"], labels, outputs["maps"], masks,
                                           source="evaluate: test split")
    calibration.save(workdir, thresholds)
    print(f"no thresholds stored: F1-max thresholds of the test split written to "
          f"{calibration.path(workdir)} (decision metrics below are in-sample)")
    return thresholds, "calibrated on this split (in-sample)"


def write_report(workdir: str, outputs: dict[str, np.ndarray], *, num_overlays: int = 6,
                 extra: dict[str, Any] | None = None, title: str = "") -> dict[str, Any]:
    """metrics.json, overlays.png and roc.png in `workdir`/eval; returns the metrics."""
    eval_dir = os.path.join(workdir, "eval")
    has_pixels = outputs["masks"].ndim == 3 and outputs["masks"].any()
    # Maps always go in, so that missing pixel ground truth is listed under "skipped".
    result = evaluate.evaluate_outputs(outputs["maps"], outputs["scores"],
                                       outputs["masks"] if outputs["masks"].ndim == 3 else None,
                                       outputs["labels"])
    if extra:
        result.update(extra)
    thresholds, origin = thresholds_for_evaluation(workdir, outputs)
    result["thresholds_origin"] = origin
    if thresholds is not None:
        result.update(decision_metrics(outputs, thresholds))
    per_defect = {}
    for defect in sorted(set(outputs["defects"].tolist()) - {"good", ""}):
        keep = (outputs["defects"] == defect) | (outputs["labels"] == 0)
        if 0 < outputs["labels"][keep].sum() < keep.sum():
            per_defect[defect] = metrics.auroc(outputs["scores"][keep], outputs["labels"][keep])
    if per_defect:
        result["image_auroc_per_defect"] = per_defect
    metrics_path = os.path.join(eval_dir, "metrics.json")
    records.write_json_atomic(result, metrics_path)
    image_at = outputs.get("image_at")
    if num_overlays and image_at is not None and outputs["scores"].size:
        idx = report.pick_examples(outputs["labels"], outputs["scores"], num_overlays)
        titles = [f"{outputs['defects'][i]} score={outputs['scores'][i]:.3g}" for i in idx]
        pixel_t = thresholds.pixel_threshold if thresholds is not None else None
        images = np.stack([image_at(i) for i in idx])
        report.save_overlays(os.path.join(eval_dir, "overlays.png"), images,
                             outputs["maps"][idx], outputs["masks"][idx], titles=titles,
                             predicted=None if pixel_t is None else outputs["maps"][idx] >= pixel_t)
    if 0 < outputs["labels"].sum() < outputs["labels"].size:
        fpr, tpr = metrics.roc_curve(outputs["scores"], outputs["labels"])[:2]
        curves = {f"image (AUROC {result['image_auroc']:.3f})": (fpr, tpr)}
        if has_pixels:
            pf, pt = metrics.roc_curve(outputs["maps"], outputs["masks"])[:2]
            step = max(1, pf.size // 2000)
            curves[f"pixel (AUROC {result['pixel_auroc']:.3f})"] = (pf[::step], pt[::step])
        report.save_curve(os.path.join(eval_dir, "roc.png"), curves, xlabel="false positive rate",
                          ylabel="true positive rate", title=title or "ROC", diagonal=True)
    result["metrics_path"] = metrics_path
    return result


def unique_names(paths: Sequence[str]) -> list[str]:
    """File base names, made unique where they repeat (MVTec's test/good/000.png and
    test/scratch/000.png): "<parent folder>_<name>", then an index if still needed."""
    base = [os.path.basename(p) for p in paths]
    names = [b if base.count(b) == 1 else
             f"{os.path.basename(os.path.dirname(os.path.abspath(p)))}_{b}"
             for p, b in zip(paths, base)]
    seen: dict[str, int] = {}
    out = []
    for name in names:
        if name in seen or names.count(name) > 1:
            seen[name] = seen.get(name, -1) + 1
            stem, ext = os.path.splitext(name)
            name = f"{stem}_{seen[name]}{ext}"
        out.append(name)
    return out
