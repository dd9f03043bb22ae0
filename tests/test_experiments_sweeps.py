"""Smoke tests of the scaling/ablation runners (experiments/sweep_k.py,
sweep_patch_gaussian.py, ablate_noise.py) at their smallest settings: outputs exist,
values are finite and in range, and a rerun is served from the cache."""
from __future__ import annotations

import json
import math
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from experiments import ablate_noise, sweep_k, sweep_patch_gaussian  # noqa: E402

# A much smaller VT-ADL than the synthetic config's (32x32 inputs, 4x4 grid): fast compiles.
SMALL = ["--model-overrides", "image_size=32", "dim=16", "depth=1", "num_heads=1",
         "mlp_dim=16", "recon_dim=16", "decoder_width=4", "decoder_num_up=2"]


def _runs(out) -> dict[str, float]:
    d = os.path.join(out, "runs")
    return {f: os.path.getmtime(os.path.join(d, f)) for f in sorted(os.listdir(d))}


def _check_quality(r):
    for m in ("aupro", "pixel_auroc", "image_auroc"):
        assert 0.0 <= r[m] <= 1.0, (m, r[m])
    assert math.isfinite(r["final_loss"])


def test_sweep_k_cost_smoke(tmp_path, capsys):
    out = str(tmp_path)
    # K=4 in chunks of 2: the fused path really scans over chunks
    argv = ["--out", out, "--cost-ks", "4", "--paths", "unchunked", "fused", "--k-chunk", "2",
            "--cost-steps", "1", "--ks", *SMALL]
    res = sweep_k.main(argv)
    rows = res["cost"]
    assert [(r["k"], r["path"], r["k_chunk"]) for r in rows] == [(4, "unchunked", None),
                                                                 (4, "fused", 2)]
    for r in rows:
        assert r["step_s"] > 0 and math.isfinite(r["loss"])
        assert 0 < r["temp_mib"] <= r["memory_mib"] < 1024
    # same model and initialisation: the same loss whichever way the NLL is computed
    assert rows[0]["loss"] == pytest.approx(rows[1]["loss"], rel=1e-3)
    for name in ("cost.md", "cost.csv", "cost_vs_k.png"):
        assert os.path.getsize(os.path.join(out, name)) > 0
    before = _runs(out)
    capsys.readouterr()
    again = sweep_k.main(argv)
    assert _runs(out) == before  # nothing recomputed
    assert capsys.readouterr().out.count("[cached]") == 2
    assert [r["step_s"] for r in again["cost"]] == [r["step_s"] for r in rows]


def test_sweep_k_quality_smoke(tmp_path, capsys):
    out = str(tmp_path)
    argv = ["--out", out, "--cost-ks", "--ks", "1", "4", "--steps", "2", *SMALL]
    res = sweep_k.main(argv)
    assert [r["k"] for r in res["quality"]] == [1, 4]
    for r in res["quality"]:
        _check_quality(r)
        assert r["steps"] == 2
    for name in ("table.md", "table.csv", "quality_vs_k.png"):
        assert os.path.getsize(os.path.join(out, name)) > 0
    with open(os.path.join(out, "table.md")) as f:
        assert "0.937" in f.read()  # the paper's README value is beside the measurements
    before = _runs(out)
    capsys.readouterr()
    sweep_k.main(argv)
    assert _runs(out) == before
    assert capsys.readouterr().out.count("[cached]") == 2


def test_sweep_patch_gaussian_smoke(tmp_path, capsys):
    out = str(tmp_path)
    argv = ["--out", out, "--grids", "2x2", "3x3", "--channels", "8", "16",
            "--num-images", "12", "--batch", "4", "--max-stats-mib", "0.005"]
    rows = sweep_patch_gaussian.main(argv)
    measured = [r for r in rows if "fit_s" in r]
    skipped = [r for r in rows if "fit_s" not in r]
    # 3x3 x 16 channels: 9 * 256 * 4 bytes = 9 KiB > 5 KiB -> skipped, the others run
    assert {(r["grid"], r["channels"]) for r in skipped} == {("3x3", 16)}
    assert "skipped" in skipped[0]["note"]
    for r in measured:
        assert r["finite"] and r["fit_s"] > 0 and r["factor_s"] > 0 and r["score_s"] > 0
        assert r["peak_stage_mib"] > 0
        assert math.isfinite(r["mean_dist2_over_c"]) and r["mean_dist2_over_c"] > 0
    assert os.path.getsize(os.path.join(out, "table.md")) > 0
    assert os.path.getsize(os.path.join(out, "scaling.png")) > 0
    before = _runs(out)
    capsys.readouterr()
    sweep_patch_gaussian.main(argv)
    assert _runs(out) == before
    assert capsys.readouterr().out.count("[cached]") == 3


def test_ablate_noise_smoke(tmp_path, capsys):
    out = str(tmp_path)
    argv = ["--out", out, "--categories", "object", "--k", "2", "--steps", "2", *SMALL]
    rows = ablate_noise.main(argv)
    assert [r["noise_std"] for r in rows] == [0.2, 0.0]
    assert [r["paper"] for r in rows] == [0.897, 0.807]
    for r in rows:
        _check_quality(r)
    with open(os.path.join(out, "table.md")) as f:
        text = f.read()
    assert "0.897" in text and "0.807" in text
    with open(os.path.join(out, "runs", f"object_noise0_k2_s2_seed0_{_tag()}.json")) as f:
        assert json.load(f)["noise_std"] == 0.0
    before = _runs(out)
    capsys.readouterr()
    ablate_noise.main(argv)
    assert _runs(out) == before
    assert capsys.readouterr().out.count("[cached]") == 2


def _tag() -> str:
    extra = sweep_k.parse_overrides(SMALL[1:])
    return "_".join(f"{k}{v}" for k, v in sorted(extra.items()))


def test_bottle_sweep_fit_and_report_on_planted_features(tmp_path):
    """sweep_pg_bottle.run_fit on small cached-feature arrays (no data, no backbone):
    defects planted as shifted features at the masked positions are found, every sigma
    gets a row, and the table and plots are written."""
    import numpy as np

    from experiments import sweep_pg_bottle

    rng = np.random.default_rng(0)
    n_train, n_test, size = 24, 8, 32
    feats = {"train_seconds": 1.0, "test_seconds": 1.0}
    for split, n in (("train", n_train), ("test", n_test)):
        feats[f"{split}_block3"] = rng.normal(size=(n, 4, 4, 5)).astype(np.float32)
        feats[f"{split}_block5"] = rng.normal(size=(n, 2, 2, 3)).astype(np.float32)
        feats[f"{split}_label"] = np.zeros(n, np.int32)
        feats[f"{split}_mask"] = np.zeros((n, size, size), np.uint8)
    for i in range(n_test // 2):  # a defect in one grid cell (8 x 8 pixels) of each
        r, c = i % 4, (i + 1) % 4
        feats["test_block3"][i, r, c] += 6.0
        feats["test_mask"][i, 8 * r:8 * r + 8, 8 * c:8 * c + 8] = 1
        feats["test_label"][i] = 1
    results = sweep_pg_bottle.run_fit(feats, size, ("block3", "block5"), 4, 0.01)
    assert sorted(results) == sorted(sweep_pg_bottle.SIGMAS)
    for sigma, r in results.items():
        assert r["channels"] == 4 and r["blur_sigma"] == sigma and r["grid"] == [4, 4]
        assert r["image_auroc"] == 1.0 and r["pixel_auroc"] > 0.8, (sigma, r)
        assert 0.0 <= r["aupro"] <= 1.0 and r["fit_seconds"] > 1.0
    rows = [{**r, "stages": list(r["stages"])} for r in results.values()]
    sweep_pg_bottle.write_outputs(str(tmp_path), rows, ["s224_b3+b5_call_eps1"])
    with open(tmp_path / "sweep.md") as f:
        text = f.read()
    assert "not run" in text and text.count("block3+block5") == len(rows)
    for png in ("sigma.png", "eps.png", "subset.png"):
        assert os.path.getsize(tmp_path / png) > 0, png
