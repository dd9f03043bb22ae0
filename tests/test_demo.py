"""The README's demo, in its quick form: both methods end to end on generated data."""
import json
import os

from vtadl_jax.cli import main


def test_quick_demo_runs_both_methods(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--quick"]) == 0
    printed = capsys.readouterr().out
    assert "summary" in printed and str(out) in printed
    for method in ("patch_gaussian", "vtadl"):
        run = out / method / "object" / "eval"
        metrics = json.loads((run / "metrics.json").read_text())
        for key in ("image_auroc", "pixel_auroc", "aupro"):
            assert 0.0 <= metrics[key] <= 1.0, (method, key, metrics[key])
        assert metrics["num_images"] == 4 + 3 * 2  # good + 3 defect types x 2
        assert os.path.getsize(run / "overlays.png") > 0
    rows = (out / "summary.csv").read_text().strip().splitlines()
    assert len(rows) == 1 + 2 and rows[1].startswith("patch Gaussians")
