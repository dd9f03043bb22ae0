"""Smoke tests of the VT-ADL reproduction runners (experiments/reproduce_vtadl_*.py).

Each runner's main() runs end to end with tiny overrides (3 training steps, a tiny
generated dataset or 64 MNIST images, the direct data backend), writes its table
(.md and .csv), rows with metrics in [0, 1], a plot, and a second call is served from
the cached runs/*.json without retraining (the training function is replaced by one
that fails, and the cached files keep their mtimes).
"""
import csv
import os
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from experiments import (reproduce_vtadl_btad, reproduce_vtadl_mnist,  # noqa: E402
                         reproduce_vtadl_mvtec)
from vtadl_jax.data import make_synthetic_mvtec  # noqa: E402
from vtadl_jax.data.synthetic_btad import make_synthetic_btad  # noqa: E402
from vtadl_jax.pipelines import vtadl as pipeline  # noqa: E402
from runner_checks import assert_served_from_cache  # noqa: E402

TINY = ["num_steps=3", "progress=False", "data.backend=direct", "checkpoint.async_save=False"]


def _rows(out):
    with open(os.path.join(out, "table.csv")) as f:
        return list(csv.DictReader(f))


def _check_table(out, label_key, labels, metric_keys, png):
    assert os.path.isfile(os.path.join(out, "table.md"))
    rows = _rows(out)
    measured = {r[label_key]: r for r in rows}
    for label in labels:
        row = measured[label]
        for key in metric_keys:
            value = float(row[key])
            assert 0.0 <= value <= 1.0, (label, key, value)
    assert any(r[label_key].startswith("mean (paper") for r in rows)
    assert os.path.getsize(os.path.join(out, png)) < 300_000


def _served_from_cache(monkeypatch, main, argv, out):
    assert_served_from_cache(monkeypatch, main, argv, out, pipeline,
                             ("train_from_config", "evaluate_workdir"))


def test_mnist_runner(tmp_path, monkeypatch):
    out = str(tmp_path / "mnist")
    argv = ["--out", out, *TINY, "data.max_examples=64", "--digits", "1"]
    reproduce_vtadl_mnist.main(argv)
    _check_table(out, "digit", ["1"], ["image_auroc", "image_ap"], "auroc_per_digit.png")
    row = _rows(out)[0]
    assert int(row["steps"]) == 3 and int(row["train_images"]) == 64
    assert int(row["test_images"]) == 64
    paper = [r for r in _rows(out) if r["digit"].startswith("mean (paper")][0]
    assert float(paper["paper_auroc"]) == pytest.approx(0.984)
    _served_from_cache(monkeypatch, reproduce_vtadl_mnist.main, argv, out)


def test_mvtec_runner_falls_back_to_generated_set(tmp_path, monkeypatch):
    monkeypatch.delenv("MVTEC_AD_ROOT", raising=False)
    out = str(tmp_path / "mvtec")
    # A tiny set where the runner expects its generated one (so it is not regenerated).
    make_synthetic_mvtec(os.path.join(out, "synthetic"), categories=("object",), num_train=8,
                         num_test_good=3, num_test_defect=1, image_size=64, seed=0)
    argv = ["--out", out, *TINY, "--categories", "object"]
    reproduce_vtadl_mvtec.main(argv)
    _check_table(out, "category", ["object"], ["aupro", "pixel_auroc", "image_auroc", "pixel_ap"],
                 "pixel_auroc_per_category.png")
    with open(os.path.join(out, "table.md")) as f:
        text = f.read()
    assert "MVTEC_AD_ROOT" in text and "0.807" in text
    _served_from_cache(monkeypatch, reproduce_vtadl_mvtec.main, argv, out)


def test_btad_runner_falls_back_to_generated_set(tmp_path, monkeypatch):
    monkeypatch.delenv("BTAD_ROOT", raising=False)
    out = str(tmp_path / "btad")
    # Product 03: BTAD's .bmp masks and 4:3 images.
    make_synthetic_btad(os.path.join(out, "synthetic"), products=("03",), num_train=8,
                        num_test_good=3, num_test_defect=3, image_size=64, seed=0)
    argv = ["--out", out, *TINY, "--products", "03"]
    reproduce_vtadl_btad.main(argv)
    _check_table(out, "product", ["03"], ["pixel_auroc", "aupro", "pixel_ap", "image_auroc"],
                 "pixel_ap_per_product.png")
    row = {r["product"]: r for r in _rows(out)}["03"]
    assert float(row["paper_pro"]) == pytest.approx(0.86)
    assert float(row["paper_pr_auc"]) == pytest.approx(0.77)
    with open(os.path.join(out, "table.md")) as f:
        assert "BTAD_ROOT" in f.read()
    _served_from_cache(monkeypatch, reproduce_vtadl_btad.main, argv, out)


def test_ablate_bottle_long_steps(capsys):
    """--long-steps takes a default and per-setting step counts; bad values (and unknown
    vtadl_bottle.py settings) exit 2 with the option named, before any data is read."""
    from experiments import ablate_vtadl_bottle as ablate

    assert ablate.long_steps(["1500", "no_noise=3000"]) == (1500, {"no_noise": 3000})
    assert ablate.long_steps(["no_noise=3000"]) == (1500, {"no_noise": 3000})
    for bad in (["x=y"], ["0"], ["paper=-5"]):
        with pytest.raises(SystemExit) as e:
            ablate.main(["--out", "unused", "--long-steps", *bad])
        assert e.value.code == 2
        assert "--long-steps" in capsys.readouterr().err
    for option in ("--base", "--targets", "--long-settings"):
        with pytest.raises(SystemExit) as e:
            ablate.main(["--out", "unused", option, "nope"])
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert option in err and "arg must be one of" in err
