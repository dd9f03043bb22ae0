"""experiments/benchmark.py --report: benchmarks.md rebuilt from stored JSONs, nothing run;
one table per kind of row, each with its own columns."""
import importlib
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_report_mode_one_table_per_row_kind(tmp_path, monkeypatch):
    benchmark = importlib.import_module("experiments.benchmark")
    (tmp_path / "mixture_gaussian.json").write_text(json.dumps([
        {"table": "mixture", "K": 64, "ms": 1.5},
        {"table": "mixture", "K": 128, "ms": 2.5},
        {"table": "mahalanobis", "impl": "solve", "ms": 0.5}]))
    (tmp_path / "metrics.json").write_text(json.dumps([{"metric": "auroc", "ours_s": 0.1}]))
    (tmp_path / "machine.json").write_text(json.dumps({"platform": "stored-machine"}))
    monkeypatch.setattr(importlib, "import_module", lambda *a: (_ for _ in ()).throw(
        AssertionError("--report must not import (run) a suite")))
    benchmark.main(["--out", str(tmp_path), "--report"])
    md = (tmp_path / "benchmarks.md").read_text()
    assert "stored-machine" in md and "| - |" not in md
    assert "### mixture\n\n| K | ms |\n" in md
    assert "### mahalanobis\n\n| impl | ms |\n" in md
    assert "| metric | ours_s |" in md and "train_step" not in md
