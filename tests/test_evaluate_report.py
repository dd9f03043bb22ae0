"""evaluate.py (metrics of a detector's outputs, atomic JSON) and report.py (PNGs, tables).

References: scikit-learn's roc_auc_score / average_precision_score / f1_score on the same
arrays, PIL for the PNGs, the csv module for the tables.
"""
import csv
import json
import os

import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import average_precision_score, f1_score, roc_auc_score

from vtadl_jax import evaluate, records, report


def _outputs(seed=0, n=12, size=16, ties=False):
    """Random maps/scores with anomalous images carrying a rectangular defect mask."""
    rng = np.random.default_rng(seed)
    labels = np.array([0, 1] * (n // 2))
    rng.shuffle(labels)
    masks = np.zeros((n, size, size), np.uint8)
    for i in np.flatnonzero(labels):
        y, x = rng.integers(0, size - 5, 2)
        h, w = rng.integers(2, 6, 2)
        masks[i, y:y + h, x:x + w] = 1
    maps = rng.normal(size=(n, size, size)) + 1.5 * masks
    scores = maps.reshape(n, -1).max(1) + 0.5 * rng.normal(size=n)
    if ties:  # heavy ties, as from quantised maps
        maps, scores = np.round(maps), np.round(scores)
    return maps.astype(np.float32), scores, masks, labels


def _f1_max_reference(scores, labels):
    return max(f1_score(labels, (scores >= t).astype(int)) for t in np.unique(scores))


@pytest.mark.parametrize("ties", [False, True])
def test_evaluate_outputs_matches_sklearn(ties):
    maps, scores, masks, labels = _outputs(seed=1, ties=ties)
    out = evaluate.evaluate_outputs(maps, scores, masks, labels)
    assert out["num_images"] == 12 and out["num_anomalous"] == 6
    np.testing.assert_allclose(out["image_auroc"], roc_auc_score(labels, scores), rtol=0, atol=1e-12)
    np.testing.assert_allclose(out["image_ap"], average_precision_score(labels, scores),
                               rtol=0, atol=1e-12)
    np.testing.assert_allclose(out["image_f1_max"], _f1_max_reference(scores, labels), atol=1e-12)
    pred = scores >= out["image_f1_threshold"]
    np.testing.assert_allclose(f1_score(labels, pred), out["image_f1_max"], atol=1e-12)
    np.testing.assert_allclose(out["pixel_auroc"], roc_auc_score(masks.ravel(), maps.ravel()),
                               rtol=0, atol=1e-9)
    np.testing.assert_allclose(out["pixel_ap"],
                               average_precision_score(masks.ravel(), maps.ravel()),
                               rtol=0, atol=1e-9)
    assert 0.0 <= out["aupro"] <= 1.0 and out["aupro_fpr_limit"] == 0.3
    assert "skipped" not in out
    # Plain Python numbers only: the dict goes straight into JSON.
    assert json.loads(json.dumps(out)) == out
    assert all(type(v) in (int, float) for v in out.values())


def test_evaluate_outputs_perfect_and_inverted_detector():
    _, _, masks, labels = _outputs(seed=2)
    maps = masks.astype(np.float32)
    scores = labels.astype(np.float64)
    out = evaluate.evaluate_outputs(maps, scores, masks, labels)
    for key in ("image_auroc", "image_ap", "image_f1_max", "pixel_auroc", "pixel_ap", "aupro"):
        assert out[key] == pytest.approx(1.0), key
    inv = evaluate.evaluate_outputs(-maps, -scores, masks, labels)
    assert inv["image_auroc"] == pytest.approx(0.0) and inv["pixel_auroc"] == pytest.approx(0.0)
    assert inv["aupro"] < 0.05


def test_masks_in_0_255_are_binarised():
    maps, scores, masks, labels = _outputs(seed=3)
    a = evaluate.evaluate_outputs(maps, scores, masks, labels)
    b = evaluate.evaluate_outputs(maps, scores, masks * 255, labels)
    assert a == b


def test_skipped_single_class_and_missing_masks():
    maps, scores, masks, labels = _outputs(seed=4)
    normal = labels == 0
    out = evaluate.evaluate_outputs(maps[normal], scores[normal], masks[normal], labels[normal])
    assert out["num_images"] == 6 and out["num_anomalous"] == 0
    assert "image" in out["skipped"] and "pixel" in out["skipped"]
    assert not {"image_auroc", "image_ap", "image_f1_max", "pixel_auroc", "aupro"} & set(out)

    out = evaluate.evaluate_outputs(maps, scores, None, labels)  # no masks (MNIST)
    assert "pixel" in out["skipped"] and "image" not in out["skipped"]
    assert out["image_auroc"] == pytest.approx(roc_auc_score(labels, scores))
    assert not {"pixel_auroc", "pixel_ap", "aupro"} & set(out)

    out = evaluate.evaluate_outputs(None, scores, masks, labels)  # no maps
    assert "pixel" in out["skipped"] and "pixel_auroc" not in out

    out = evaluate.evaluate_outputs(None, scores, None, labels)  # image-level only
    assert "skipped" not in out and "image_auroc" in out and "pixel_auroc" not in out

    anomalous = labels == 1
    out = evaluate.evaluate_outputs(maps[anomalous], scores[anomalous], masks[anomalous],
                                    labels[anomalous])
    assert "image" in out["skipped"] and "pixel_auroc" in out  # pixels still have both classes


@pytest.mark.parametrize("change, words", [
    (dict(scores=np.zeros((12, 1))), "scores"),
    (dict(labels=np.zeros(11)), "labels"),
    (dict(masks=np.zeros((12, 16, 8))), "maps and masks"),
    (dict(maps=np.zeros((11, 16, 16)), masks=np.zeros((11, 16, 16))), "maps"),
    (dict(maps=np.zeros((12, 256)), masks=None), "maps"),
    (dict(maps=None, masks=np.zeros((12, 16, 16, 1))), "masks"),
])
def test_shape_errors_name_the_argument(change, words):
    maps, scores, masks, labels = _outputs(seed=5)
    kwargs = dict(maps=maps, scores=scores, masks=masks, labels=labels)
    kwargs.update(change)
    with pytest.raises(ValueError, match=words):
        evaluate.evaluate_outputs(**kwargs)


# --- write_json_atomic ------------------------------------------------------------


def test_write_json_atomic_roundtrip_no_temp_and_mode(tmp_path):
    path = tmp_path / "new" / "sub" / "metrics.json"
    obj = {"b": 1.5, "a": [1, 2], "c": {"x": None}}
    records.write_json_atomic(obj, str(path))
    assert json.loads(path.read_text()) == obj
    assert os.listdir(path.parent) == ["metrics.json"]
    umask = os.umask(0o022)
    os.umask(umask)
    assert (os.stat(path).st_mode & 0o777) == (0o666 & ~umask)  # like open(), not 0600
    records.write_json_atomic({"replaced": True}, str(path))
    assert json.loads(path.read_text()) == {"replaced": True}
    assert os.listdir(path.parent) == ["metrics.json"]


@pytest.mark.parametrize("bad", [
    {"a": 1, "z": object()},  # fails after "a" is already serialised
    {"a": float("nan"), "b": {1, 2}},
    {"x": np.zeros(3)},
])
def test_write_json_atomic_failure_keeps_old_file(tmp_path, bad):
    path = tmp_path / "metrics.json"
    records.write_json_atomic({"old": 1}, str(path))
    before = path.read_bytes()
    with pytest.raises(TypeError):
        records.write_json_atomic(bad, str(path))
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["metrics.json"]


def test_write_json_atomic_failure_without_old_file(tmp_path):
    with pytest.raises(TypeError):
        records.write_json_atomic({"a": object()}, str(tmp_path / "m.json"))
    assert os.listdir(tmp_path) == []


# --- report: PNGs ---------------------------------------------------------------------


def _assert_png(path):
    assert os.path.getsize(path) > 0
    with Image.open(path) as im:
        assert im.format == "PNG"
        im.verify()
    with Image.open(path) as im:
        im.load()
        assert im.size[0] > 10 and im.size[1] > 10
        return im.size


@pytest.mark.parametrize("channels", [3, 1, None])
def test_save_overlays_writes_png(tmp_path, channels):
    rng = np.random.default_rng(0)
    n = 3
    shape = (n, 32, 32) if channels is None else (n, 32, 32, channels)
    images = rng.uniform(-1, 1, shape).astype(np.float32)
    maps = rng.random((n, 32, 32)).astype(np.float32)
    masks = np.zeros((n, 32, 32), np.uint8)
    masks[1, 8:16, 8:16] = 1
    path = tmp_path / "eval" / "overlays.png"
    out = report.save_overlays(str(path), images, maps, masks, titles=["a", "b", "c"])
    assert out == str(path)
    w, h = _assert_png(path)
    # One row per image: the 3-row figure is taller than a 1-row one.
    report.save_overlays(str(tmp_path / "one.png"), images[:1], maps[:1])
    assert h > 2 * _assert_png(tmp_path / "one.png")[1]


def test_save_overlays_constant_map_and_errors(tmp_path):
    images = np.zeros((2, 16, 16, 3), np.float32)  # constant image: no division by zero
    report.save_overlays(str(tmp_path / "c.png"), images, np.ones((2, 16, 16)))
    _assert_png(tmp_path / "c.png")
    with pytest.raises(ValueError, match="maps"):
        report.save_overlays(str(tmp_path / "x.png"), images, np.ones((3, 16, 16)))
    with pytest.raises(ValueError, match="maps"):
        report.save_overlays(str(tmp_path / "x.png"), images, np.ones((2, 16)))
    assert not (tmp_path / "x.png").exists()


def test_save_curve_writes_png(tmp_path):
    x = np.linspace(0, 1, 50)
    path = report.save_curve(str(tmp_path / "d" / "roc.png"),
                             {"a": (x, x ** 0.5), "b": ([1, 2, 4], [3.0, 2.0, 1.0])},
                             xlabel="fpr", ylabel="tpr", title="t", diagonal=True)
    _assert_png(path)
    path = report.save_curve(str(tmp_path / "k.png"), {"cost": ([1, 2, 4, 8], [1, 2, 3, 4])},
                             xlabel="K", ylabel="s", logx=True)
    _assert_png(path)


# --- report: pick_examples ------------------------------------------------------------


def test_pick_examples_highs_lows_and_normal_highs():
    labels = np.array([1, 0, 1, 1, 0, 0, 1, 0, 1, 0, 1, 0])
    scores = np.array([9., 8., 1., 5., 7., 0., 3., 2., 8.5, 6., 4., -1.])
    # anomalous by score: 0 (9), 8 (8.5), 3 (5), 10 (4), 6 (3), 2 (1)
    # normal by score:    1 (8), 4 (7), 9 (6), 7 (2), 5 (0), 11 (-1)
    idx = report.pick_examples(labels, scores, 6)
    assert idx.dtype == np.int64
    assert sorted(idx.tolist()) == sorted([0, 8, 2, 6, 1, 4])
    idx = report.pick_examples(labels, scores, 9)
    assert sorted(idx.tolist()) == sorted([0, 8, 3, 2, 6, 10, 1, 4, 9])
    idx = report.pick_examples(labels, scores, 3)
    assert sorted(idx.tolist()) == [0, 1, 2]  # top anomalous, bottom anomalous, top normal


@pytest.mark.parametrize("count", [0, 1, 2, 5, 6, 7, 20])
@pytest.mark.parametrize("num_anomalous", [0, 1, 2, 5])
def test_pick_examples_unique_and_full(count, num_anomalous):
    n = 8
    rng = np.random.default_rng(count * 10 + num_anomalous)
    labels = np.zeros(n, int)
    labels[rng.permutation(n)[:num_anomalous]] = 1
    scores = rng.normal(size=n)
    idx = report.pick_examples(labels, scores, count)
    assert len(set(idx.tolist())) == len(idx)  # no image twice
    assert len(idx) == min(count, n)  # as many as asked while there are images left
    assert all(0 <= i < n for i in idx)
    if count >= 3 and num_anomalous:
        anomalous = np.flatnonzero(labels == 1)
        assert anomalous[np.argmax(scores[anomalous])] in idx
        assert anomalous[np.argmin(scores[anomalous])] in idx
    if count >= 3 and num_anomalous < n:
        normal = np.flatnonzero(labels == 0)
        assert normal[np.argmax(scores[normal])] in idx


# --- report: tables -------------------------------------------------------------------


def test_markdown_table_format():
    rows = [{"name": "a|b", "auroc": 0.98765, "n": 3, "x": None},
            {"name": "c", "auroc": float("nan"), "n": 4, "x": np.float32(0.5)},
            {"name": "d", "auroc": np.float32(0.1234567), "extra": 1}]
    md = report.markdown_table(rows, ["name", "auroc", "n", "x"])
    lines = md.rstrip("\n").split("\n")
    assert lines[0] == "| name | auroc | n | x |"
    assert lines[1] == "|---|---|---|---|"
    assert lines[2] == "| a\\|b | 0.988 | 3 | - |"
    assert lines[3] == "| c | - | 4 | 0.500 |"
    assert lines[4] == "| d | 0.123 | - | - |"
    assert md.endswith("\n") and len(lines) == 5


def test_write_tables_csv_round_trip(tmp_path):
    rows = [{"category": "bottle", "image_auroc": 0.987654321, "pixel_auroc": 0.5, "n": 83},
            {"category": "carpet, soft", "image_auroc": 1.0, "n": 117, "ignored": "x"},
            {"category": 'say "hi"', "image_auroc": 1 / 3, "pixel_auroc": None, "n": 0}]
    columns = ["category", "image_auroc", "pixel_auroc", "n"]
    md_path, csv_path = report.write_tables(str(tmp_path / "out" / "table"), rows, columns,
                                            title="Results")
    assert md_path == str(tmp_path / "out" / "table.md")
    assert csv_path == str(tmp_path / "out" / "table.csv")
    with open(csv_path, newline="") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == columns
        back = list(reader)
    assert len(back) == 3
    for row, got in zip(rows, back):
        assert got["category"] == row["category"]
        assert float(got["image_auroc"]) == row["image_auroc"]  # full precision in the CSV
        assert int(got["n"]) == row["n"]
        pix = row.get("pixel_auroc")
        assert got["pixel_auroc"] == ("" if pix is None else str(pix))
    md = open(md_path).read()
    assert md.startswith("# Results\n\n")
    assert md == "# Results\n\n" + report.markdown_table(rows, columns)
    body = md.strip().split("\n")[4:]
    assert [line.split(" | ")[0].lstrip("| ") for line in body] == [
        "bottle", "carpet, soft", 'say "hi"']


class _ListSource:
    """A random-access source of preprocessed examples (what `common.make_source` gives)."""

    name, split = "fake", "test"

    def __init__(self, examples):
        self.examples, self.reads = examples, []

    def __len__(self):
        return len(self.examples)

    def __getitem__(self, i):
        self.reads.append(int(i))
        return self.examples[i]


def test_collect_outputs_keeps_no_images_and_report_draws_the_picked_ones(tmp_path, monkeypatch):
    """Scoring keeps maps, not images (memory grows with the maps only); the report reads
    back exactly the images it draws, the ones `pick_examples` chose, from the source."""
    from vtadl_jax.pipelines import common

    rng = np.random.default_rng(0)
    n, h = 7, 8
    labels = np.array([0, 1, 0, 1, 1, 0, 0])
    examples = [{"image": rng.uniform(-1, 1, (h, h, 3)).astype(np.float32),
                 "mask": (np.arange(h * h).reshape(h, h) < 5 * labels[i]).astype(np.uint8),
                 "label": int(labels[i]), "defect": "crack" if labels[i] else "good",
                 "filename": f"{i}.png"} for i in range(n)]
    source = _ListSource(examples)

    def predict(images):  # a score from the image itself: the rows must not get mixed up
        return images[..., 0], images.mean(axis=(1, 2, 3)).astype(np.float64)

    out = common.collect_outputs(predict, source, batch_size=3)
    arrays = [v for v in out.values() if isinstance(v, np.ndarray)]
    assert not any(a.ndim == 4 for a in arrays), "an image stack was kept"
    assert out["maps"].shape == (n, h, h)
    for i in range(n):
        np.testing.assert_array_equal(out["image_at"](i), examples[i]["image"])
        assert out["scores"][i] == pytest.approx(float(examples[i]["image"].mean()), rel=1e-6)

    drawn = {}

    def fake_overlays(path, images, maps, masks=None, **kwargs):
        drawn["images"], drawn["maps"] = images, maps
        return path

    monkeypatch.setattr(report, "save_overlays", fake_overlays)
    source.reads.clear()
    common.write_report(str(tmp_path), out, num_overlays=4)
    idx = report.pick_examples(out["labels"], out["scores"], 4)
    assert sorted(source.reads) == sorted(int(i) for i in idx)
    np.testing.assert_array_equal(drawn["images"], np.stack([examples[i]["image"] for i in idx]))
    np.testing.assert_array_equal(drawn["maps"], out["maps"][idx])
