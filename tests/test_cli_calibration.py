"""`calibrate`, thresholded `predict` and `evaluate`'s decision metrics through
`vtadl_jax.cli.main`, on a tiny generated set (patch Gaussians on EfficientNet-Lite0;
VT-ADL tiny for 3 steps), and the user errors (exit 2, nothing overwritten).

References: maps and scores recomputed here from the reloaded model in one batch, the
FPR rule and F1-max by direct counting / scikit-learn, PIL for the PNGs.
"""
import csv
import glob
import json
import math
import os
import shutil

import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import precision_recall_curve

from vtadl_jax import cli
from vtadl_jax import data as data_lib
from vtadl_jax.pipelines import patch_gaussian as pgp

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(REPO, "experiments", "configs")
SIZE = 64


def _fit_args(root, workdir):
    return ["fit", "--config", os.path.join(CONFIGS, "patch_gaussian_synthetic.py") + ":object",
            "--workdir", str(workdir), f"data.root={root}", "data.backend=direct",
            f"data.image_size={SIZE}", "batch_size=4"]


def _reference(workdir, files):
    """Scores and maps of `files` from the reloaded model, in one batch."""
    preprocessing = data_lib.preset("patch_gaussian", size=SIZE, scale="zero_one")
    images = np.stack([preprocessing.image(data_lib.load_image(f)) for f in files])
    model, backbone = pgp.load_model(workdir)
    maps, scores = pgp.make_predict(model, backbone, (SIZE, SIZE))(images)
    return np.asarray(maps), np.asarray(scores, np.float64)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    base = tmp_path_factory.mktemp("cli_cal")
    data_lib.make_synthetic_mvtec(base / "syn", categories=("object",), num_train=12,
                                  num_test_good=3, num_test_defect=2, image_size=SIZE)
    root = str(base / "syn" / "object")
    # Normal calibration images: the last 4 of 12 training images, moved out of the fit
    # (8 left: one VT-ADL batch on the 8 test devices).
    train = sorted(glob.glob(os.path.join(root, "train", "good", "*.png")))
    normal_dir = base / "normal" / "nested"
    normal_dir.mkdir(parents=True)
    for f in train[-4:]:
        shutil.move(f, normal_dir / os.path.basename(f))
    (base / "normal" / "notes.txt").write_text("not an image: skipped")
    workdir = str(base / "run")
    assert cli.main(_fit_args(root, workdir)) == 0
    return {"base": base, "root": root, "workdir": workdir, "normal": str(base / "normal"),
            "normal_files": sorted(glob.glob(str(normal_dir / "*.png"))),
            "test_files": sorted(glob.glob(os.path.join(root, "test", "*", "*.png")))}


def _copy(run, tmp_path):
    workdir = tmp_path / "w"
    shutil.copytree(run["workdir"], workdir)
    return str(workdir)


def _thresholds(workdir):
    with open(os.path.join(workdir, "thresholds.json")) as f:
        return json.load(f)


def test_predict_without_thresholds_gives_raw_scores(run, tmp_path, capsys):
    out = tmp_path / "preds"
    assert not os.path.exists(os.path.join(run["workdir"], "thresholds.json"))
    assert cli.main(["predict", "--workdir", run["workdir"], "--images", run["test_files"][0],
                     "--out", str(out)]) == 0
    assert "no thresholds stored" in capsys.readouterr().out
    with open(out / "predictions.json") as f:
        summary = json.load(f)
    assert summary["thresholds"] is None and summary["num_images"] == 1
    row = summary["images"][0]
    assert row["label"] is None and row["score_normalised"] is None
    assert not glob.glob(str(out / "*_mask.png"))
    _, ref = _reference(run["workdir"], run["test_files"][:1])
    assert row["score"] == pytest.approx(float(ref[0]), rel=1e-5)


def test_evaluate_stores_f1_thresholds_and_decision_metrics(run, tmp_path):
    workdir = _copy(run, tmp_path)
    assert cli.main(["evaluate", "--workdir", workdir, "--overlays", "2"]) == 0
    t = _thresholds(workdir)
    assert t["mode"] == "f1_max_test"
    with open(os.path.join(workdir, "eval", "metrics.json")) as f:
        m = json.load(f)
    assert m["thresholds"]["image_threshold"] == t["image_threshold"]
    assert m["image_f1_threshold"] == t["image_threshold"]
    maps, scores = _reference(workdir, run["test_files"])
    labels = np.array(["/good/" not in p for p in run["test_files"]])
    pred = scores >= t["image_threshold"]
    assert m["image_tp"] == int(np.sum(pred & labels))
    assert m["image_fp"] == int(np.sum(pred & ~labels))
    assert m["image_tp"] + m["image_fp"] + m["image_tn"] + m["image_fn"] == len(labels)
    for key in ("pixel_iou", "pixel_dice", "image_auroc", "aupro"):
        assert 0.0 <= m[key] <= 1.0, key
    # A second evaluate uses the stored thresholds and does not rewrite them.
    before = open(os.path.join(workdir, "thresholds.json")).read()
    assert cli.main(["evaluate", "--workdir", workdir, "--overlays", "0"]) == 0
    assert open(os.path.join(workdir, "thresholds.json")).read() == before
    with open(os.path.join(workdir, "eval", "metrics.json")) as f:
        assert json.load(f)["thresholds_origin"] == "stored"


def test_calibrate_from_normal_images_fpr_rule(run, tmp_path):
    workdir = _copy(run, tmp_path)
    assert cli.main(["calibrate", "--workdir", workdir, "--normal-dir", run["normal"],
                     "--fpr", "0.3"]) == 0
    t = _thresholds(workdir)
    assert t["mode"] == "normal_fpr" and t["details"]["num_images"] == 4  # notes.txt skipped
    maps, scores = _reference(workdir, run["normal_files"])
    allowed = math.floor(0.3 * 4)  # 1 false positive of 4
    assert int(np.sum(scores >= t["image_threshold"])) == allowed
    assert t["image_threshold"] > np.sort(scores)[4 - allowed - 1]
    assert t["image_threshold"] == pytest.approx(np.sort(scores)[4 - allowed - 1], rel=1e-5)
    assert np.mean(maps >= t["pixel_threshold"]) <= 0.3 + 1e-4
    assert t["image_scale"] == pytest.approx(np.std(scores), rel=1e-4)


def test_calibrate_from_test_matches_sklearn(run, tmp_path):
    workdir = _copy(run, tmp_path)
    assert cli.main(["calibrate", "--workdir", workdir, "--from-test"]) == 0
    t = _thresholds(workdir)
    _, scores = _reference(workdir, run["test_files"])
    labels = np.array(["/good/" not in p for p in run["test_files"]])
    precision, recall, thresholds = precision_recall_curve(labels, scores)
    f1 = 2 * precision[:-1] * recall[:-1] / np.maximum(precision[:-1] + recall[:-1], 1e-12)
    best = thresholds[f1 >= f1.max() - 1e-12].min()
    assert t["mode"] == "f1_max_test"
    assert t["image_threshold"] == pytest.approx(float(best), rel=1e-5)


def test_user_thresholds_drive_labels_masks_and_summary(run, tmp_path, capsys):
    workdir = _copy(run, tmp_path)
    maps, scores = _reference(workdir, run["test_files"])
    image_t = float(np.median(scores))
    pixel_t = float(np.quantile(maps, 0.9))
    assert cli.main(["calibrate", "--workdir", workdir, "--normal-dir", run["normal"],
                     "--fpr", "0.5", "--image-threshold", str(image_t),
                     "--pixel-threshold", str(pixel_t)]) == 0
    t = _thresholds(workdir)
    assert (t["mode"], t["image_threshold"], t["pixel_threshold"]) == ("user", image_t, pixel_t)
    assert t["image_scale"] > 0 and t["pixel_scale"] > 0  # from the normal images
    out = tmp_path / "preds"
    test_dir = os.path.join(run["root"], "test")
    capsys.readouterr()
    assert cli.main(["predict", "--workdir", workdir, "--images", test_dir,
                     "--out", str(out)]) == 0
    assert "predicted anomalous" in capsys.readouterr().out
    with open(out / "predictions.csv") as f:
        rows = {r["file"]: r for r in csv.DictReader(f)}
    assert sorted(rows) == run["test_files"]  # the directory, recursively
    for i, path in enumerate(run["test_files"]):
        r = rows[path]
        if abs(scores[i] - image_t) > 1e-4 * abs(image_t):  # away from float noise
            assert r["label"] == ("anomalous" if scores[i] >= image_t else "normal")
            assert (float(r["score_normalised"]) > 0.5) == (scores[i] >= image_t)
        with Image.open(r["mask"]) as im:
            mask = np.asarray(im)
        assert set(np.unique(mask)) <= {0, 255} and mask.shape == (SIZE, SIZE)
        agree = np.mean((mask == 255) == (maps[i] >= pixel_t))
        assert agree > 0.99
        with Image.open(r["heatmap"]) as im:
            assert im.format == "PNG"
    with open(out / "predictions.json") as f:
        summary = json.load(f)
    assert summary["thresholds"]["mode"] == "user"
    assert summary["num_anomalous"] == sum(r["label"] == "anomalous" for r in rows.values())


def test_predict_glob_and_bad_inputs_exit_2(run, tmp_path, capsys):
    out = tmp_path / "preds"
    pattern = os.path.join(run["root"], "test", "good", "*.png")
    assert cli.main(["predict", "--workdir", run["workdir"], "--images", pattern,
                     "--out", str(out)]) == 0
    assert len(glob.glob(str(out / "*_heatmap.png"))) == len(glob.glob(pattern))
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("x")
    cases = [([str(empty)], "holds no image file"),
             ([os.path.join(run["root"], "*.tif")], "matches no image file"),
             ([str(tmp_path / "missing.png")], "does not exist")]
    for images, message in cases:
        capsys.readouterr()
        assert cli.main(["predict", "--workdir", run["workdir"], "--images", *images,
                         "--out", str(tmp_path / "never")]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err
    assert not (tmp_path / "never").exists()


@pytest.mark.parametrize("args,message", [
    (["--normal-dir", "{normal}", "--fpr", "1.5"], "--fpr"),
    (["--normal-dir", "{normal}", "--fpr", "0"], "--fpr"),
    (["--normal-dir", "{normal}"], "--fpr"),
    (["--normal-dir", "{empty}", "--fpr", "0.1"], "holds no image file"),
    (["--from-test", "--normal-dir", "{normal}", "--fpr", "0.1"], "exactly one"),
    ([], "exactly one"),
])
def test_calibrate_bad_inputs_exit_2_and_keep_thresholds(run, tmp_path, capsys, args, message):
    workdir = _copy(run, tmp_path)
    assert cli.main(["calibrate", "--workdir", workdir, "--image-threshold", "1.5",
                     "--pixel-threshold", "2.5"]) == 0
    before = open(os.path.join(workdir, "thresholds.json")).read()
    (tmp_path / "empty").mkdir()
    argv = [a.format(normal=run["normal"], empty=str(tmp_path / "empty")) for a in args]
    capsys.readouterr()
    assert cli.main(["calibrate", "--workdir", workdir, *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert open(os.path.join(workdir, "thresholds.json")).read() == before


def test_refit_discards_thresholds(run, tmp_path):
    workdir = _copy(run, tmp_path)
    assert cli.main(["calibrate", "--workdir", workdir, "--image-threshold", "1"]) == 0
    assert cli.main(_fit_args(run["root"], workdir)) == 0
    assert not os.path.exists(os.path.join(workdir, "thresholds.json"))


def test_vtadl_uses_the_same_mechanism(run, tmp_path):
    workdir = str(tmp_path / "vt")
    assert cli.main(["train", "--config", os.path.join(CONFIGS, "vtadl_tiny.py"), "--workdir",
                     workdir, f"data.root={run['root']}", "data.backend=direct",
                     "num_steps=3", "checkpoint.async_save=False"]) == 0
    assert cli.main(["calibrate", "--workdir", workdir, "--normal-dir", run["normal"],
                     "--fpr", "0.25"]) == 0
    assert _thresholds(workdir)["mode"] == "normal_fpr"
    out = tmp_path / "preds"
    assert cli.main(["predict", "--workdir", workdir, "--images", run["test_files"][0],
                     "--out", str(out)]) == 0
    with open(out / "predictions.json") as f:
        row = json.load(f)["images"][0]
    assert row["label"] in ("normal", "anomalous") and 0 < row["score_normalised"] < 1
    with Image.open(row["mask"]) as im:
        assert im.size == (32, 32)
