"""Thresholds on the real MVTec AD bottle: how much does calibrating on normal images
only (what a production line has) lose against F1-max on labelled test images?

    python experiments/calibrate_bottle.py --out experiments/results/calibration_bottle

Model: patch Gaussians on ImageNet EfficientNet-Lite0 (blocks 3+5, offline weights),
experiments/configs/patch_gaussian_mvtec.py:bottle.

Split (nothing used to calibrate is in the figures it is reported with):
- normal calibration set: every 5th train/good image (sorted names: 000, 005, ...,
  42 of 209) is held out of the fit; the model is fitted on the other 167;
- test halves: within each test folder (good, broken_large, broken_small,
  contamination), sorted by name, even positions form half A and odd ones half B.
Modes: "f1_max_test" calibrates on one half (labels and masks) and is reported on the
other, both ways; "normal_fpr" calibrates on the 42 held-out normal images (FPR 0.001,
0.01, 0.05, 0.1) and is reported on each half. The in-sample row (F1-max on the whole test
set, reported on it) is the optimistic figure `evaluate` gives without stored thresholds.

MVTEC_AD_ROOT (or ../shared/data/mvtec_ad beside the repository) must hold bottle/;
without it the runner says so and uses the generated set's "object" category.
"""

from __future__ import annotations

import os
import shutil
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

if __name__ == "__main__":  # first, before jax loads: huge-page malloc (vtadl_jax.hostmem)
    from vtadl_jax.hostmem import reexec_with_hugepage_malloc

    reexec_with_hugepage_malloc()

import numpy as np  # noqa: E402

from experiments import runner  # noqa: E402
from vtadl_jax import calibration  # noqa: E402
from vtadl_jax.configs import apply_overrides, load_config  # noqa: E402
from vtadl_jax.data import make_synthetic_mvtec  # noqa: E402
from vtadl_jax.data.image_files import find_image_files  # noqa: E402
from vtadl_jax.metrics.decisions import confusion, mask_overlap  # noqa: E402
from vtadl_jax.pipelines import inference, patch_gaussian as pipeline  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
HOLDOUT_EVERY = 5
FPRS = (0.001, 0.01, 0.05, 0.1)


def data_root(out: str) -> tuple[str, list[str]]:
    """The category folder (real bottle, else generated "object") and notes."""
    for root in (os.environ.get("MVTEC_AD_ROOT"),
                 os.path.join(os.path.dirname(REPO), "shared", "data", "mvtec_ad")):
        if root and os.path.isdir(os.path.join(root, "bottle")):
            return os.path.join(root, "bottle"), []
    syn = os.path.join(out, "work", "synthetic")
    if not os.path.isdir(syn):
        make_synthetic_mvtec(syn, categories=("object",), seed=0)
    return os.path.join(syn, "object"), [runner.missing_dataset_note(
        "MVTec AD bottle", "MVTEC_AD_ROOT", "mvtec_anomaly_detection")]


def split_folder(category: str, work: str) -> tuple[str, str]:
    """A folder dataset of symlinks: train/good without every HOLDOUT_EVERY-th image
    (those go to holdout/), test/ and ground_truth/ as they are. Returns (root, holdout)."""
    root, holdout = os.path.join(work, "fit_data"), os.path.join(work, "holdout_normal")
    for d in (root, holdout):
        shutil.rmtree(d, ignore_errors=True)
    os.makedirs(os.path.join(root, "train", "good"))
    os.makedirs(holdout)
    train = sorted(os.listdir(os.path.join(category, "train", "good")))
    for i, name in enumerate(train):
        target = holdout if i % HOLDOUT_EVERY == 0 else os.path.join(root, "train", "good")
        os.symlink(os.path.join(category, "train", "good", name), os.path.join(target, name))
    for sub in ("test", "ground_truth"):
        os.symlink(os.path.join(category, sub), os.path.join(root, sub))
    return root, holdout


def halves(defects: np.ndarray, filenames: np.ndarray) -> np.ndarray:
    """0 (half A) or 1 (half B) per test image: alternate within each defect folder by name."""
    half = np.zeros(len(defects), np.int64)
    for defect in np.unique(defects):
        idx = np.flatnonzero(defects == defect)
        idx = idx[np.argsort(filenames[idx], kind="stable")]
        half[idx[1::2]] = 1
    return half


def score_everything(out: str, fresh: bool) -> tuple[dict, list[str]]:
    """Fit on the reduced train set; maps and scores of the test set and held-out normals
    (cached in <out>/work/scores.npz)."""
    work = os.path.join(out, "work")
    cache = os.path.join(work, "scores.npz")
    category, notes = data_root(out)
    if os.path.isfile(cache) and not fresh:
        print(f"[cached] {cache}")
        return dict(np.load(cache, allow_pickle=True)), notes
    root, holdout = split_folder(os.path.abspath(category), work)
    config = apply_overrides(
        load_config(os.path.join(HERE, "configs", "patch_gaussian_mvtec.py") + ":bottle"),
        ["data.name=folder", f"data.root={root}", "data.backend=direct",
         "backbone.name=efficientnet_lite0", "backbone.stages=('block3','block5')"])
    workdir = os.path.join(work, "model")
    pipeline.fit_from_config(config, workdir)
    test = pipeline.score_test_split(workdir)
    normal_scores, normal_maps = inference.score_files(
        pipeline.scorer(workdir), find_image_files([holdout], what="held-out normal images"))
    arrays = {"maps": test["maps"], "scores": test["scores"], "masks": test["masks"],
              "labels": test["labels"], "defects": test["defects"].astype(str),
              "filenames": test["filenames"].astype(str), "normal_scores": normal_scores,
              "normal_maps": normal_maps, "category": np.asarray(category)}
    np.savez(cache, **arrays)
    return arrays, notes


def report_row(t: calibration.Thresholds, a: dict, keep: np.ndarray, **label) -> dict:
    img = confusion(a["scores"][keep], a["labels"][keep], t.image_threshold)
    pix = mask_overlap(a["maps"][keep], a["masks"][keep], t.pixel_threshold)
    return {**label, "image_threshold": t.image_threshold, "pixel_threshold": t.pixel_threshold,
            "image_scale": t.image_scale, "pixel_scale": t.pixel_scale,
            **{k: img[k] for k in ("tp", "fp", "tn", "fn", "precision", "recall", "f1", "fpr")},
            "pixel_iou": pix["iou"], "pixel_dice": pix["dice"], "pixel_fpr": pix["fpr"],
            "pixel_iou_mean_anomalous": pix["iou_mean_anomalous"],
            "pixel_fpr_good": float(np.mean(a["maps"][keep & (a["labels"] == 0)]
                                            >= t.pixel_threshold)),
            "num_reported": int(keep.sum())}


def evaluate_modes(a: dict) -> list[dict]:
    """Every (mode, calibration set, reported set) row of the table."""
    half = halves(a["defects"], a["filenames"])
    rows = []
    every = np.ones(half.size, bool)
    t = calibration.from_labelled(a["scores"], a["labels"], a["maps"], a["masks"])
    rows.append(report_row(t, a, every, mode="f1_max_test", calibrated_on="all test (in-sample)",
                           reported_on="all test"))
    names = ("test half A", "test half B")
    for fold in (0, 1):
        cal, rep = half == fold, half != fold
        t = calibration.from_labelled(a["scores"][cal], a["labels"][cal], a["maps"][cal],
                                      a["masks"][cal])
        rows.append(report_row(t, a, rep, mode="f1_max_test", calibrated_on=names[fold],
                               reported_on=names[1 - fold]))
    for fpr in FPRS:
        t = calibration.from_normal(a["normal_scores"], a["normal_maps"], fpr)
        for fold in (1, 0):
            rows.append(report_row(t, a, half != fold, mode=f"normal_fpr {fpr:g}",
                                   calibrated_on=f"{a['normal_scores'].size} held-out train/good",
                                   reported_on=names[1 - fold]))
    return rows


def main(argv=None) -> None:
    args = runner.parse_args(__doc__.split("\n")[0], argv=argv)
    arrays, notes = score_everything(args.out, args.fresh)
    result = runner.cached(args.out, "calibration", lambda: {
        "category": str(arrays["category"]), "rows": evaluate_modes(arrays),
        "num_test": int(arrays["labels"].size), "num_normal_holdout":
        int(arrays["normal_scores"].size)}, fresh=args.fresh)
    rows = result["rows"]
    cols = ["mode", "calibrated_on", "reported_on", "image_threshold", "pixel_threshold", "tp",
            "fp", "tn", "fn", "precision", "recall", "f1", "fpr", "pixel_iou", "pixel_dice",
            "pixel_fpr", "pixel_fpr_good"]
    notes = notes + [
        f"data: {result['category']}; model: patch Gaussians, EfficientNet-Lite0 blocks 3+5, "
        f"fitted on train/good without every {HOLDOUT_EVERY}th image "
        f"({result['num_normal_holdout']} held out as the normal calibration set).",
        "test halves: within each test folder, by sorted name, even positions = A, odd = B.",
        "anomalous when score >= threshold; tp/fp/tn/fn count images of the reported half; "
        "pixel_iou / pixel_dice pool every pixel of the reported half; pixel_fpr = share of "
        "normal pixels (mask 0, all images) predicted anomalous; pixel_fpr_good = the same "
        "over the good images only (what the normal_fpr pixel rule targets).",
        "normal_fpr t: smallest t with #{held-out normal scores >= t} <= floor(fpr * n) "
        "(vtadl_jax/calibration.py); the same rule on the held-out images' pixels.",
        f"machine: {runner.machine()}"]
    runner.write_report(args.out, "table", rows, cols,
                        title="Decision thresholds, patch Gaussians, "
                        f"{os.path.basename(result['category'])} ({result['category']})",
                        notes=notes)


if __name__ == "__main__":
    main()
