"""Dini & Rahtu (VISAPP 2023) Tables 2 and 3: patch Gaussians, image and pixel AUROC
per MVTec AD category.

    MVTEC_AD_ROOT=/data/mvtec_anomaly_detection CONTNET_B_WEIGHTS=/data/contnet_b.pth \
        python experiments/reproduce_pg_mvtec.py --out experiments/results/pg_mvtec

Without MVTEC_AD_ROOT the runner says so and runs the same pipeline on the generated
MVTec-layout set (categories "texture" and "object"); without CONTNET_B_WEIGHTS it uses
ImageNet EfficientNet-Lite0 (the offline backbone) and says so in the table title.
A root holding only some categories runs those and lists the missing ones in the notes
(none present: exit status 2). `--config` runs another config file with the same
get_config(category) contract (e.g. experiments/configs/patch_gaussian_recommended.py).
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

if __name__ == "__main__":  # first, before jax loads: huge-page malloc (vtadl_jax.hostmem)
    from vtadl_jax.hostmem import reexec_with_hugepage_malloc

    reexec_with_hugepage_malloc()

from experiments import runner  # noqa: E402
from experiments.reproduce_pg_mnist import model_fit_seconds  # noqa: E402
from vtadl_jax.configs import apply_overrides, load_config  # noqa: E402
from vtadl_jax.data import make_synthetic_mvtec  # noqa: E402
from vtadl_jax.pipelines import patch_gaussian as pipeline  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
CONFIG = os.path.join(HERE, "configs", "patch_gaussian_mvtec.py")
# Paper means (Tables 2 and 3); per-category values are not restated in METHODS.md.
PAPER_MEAN = {"image_auroc": 0.979, "pixel_auroc": 0.966}


def plan(out: str, categories: list[str] | None, config: str = CONFIG
         ) -> tuple[list[tuple[str, list[str]]], list[str]]:
    """(category, overrides) units and notes, for the real data or the generated set."""
    notes = []
    root = os.environ.get("MVTEC_AD_ROOT")
    weights = os.environ.get("CONTNET_B_WEIGHTS")
    on_contnet = load_config(f"{config}:bottle").backbone.name == "contnet_b"
    backbone = [] if weights or not on_contnet else [
        "backbone.name=efficientnet_lite0", "backbone.stages=('block3','block5')"]
    if backbone:
        notes.append("CONTNET_B_WEIGHTS not set: ConTNet-B weights cannot be downloaded here; "
                     "ran on ImageNet EfficientNet-Lite0 (blocks 3+5) instead.")
    if root:
        cats, missing = runner.mvtec_categories(root, categories)
        return [(c, [f"data.root={root}"] + backbone) for c in cats], notes + missing
    notes.append(runner.missing_dataset_note("MVTec AD", "MVTEC_AD_ROOT", "mvtec_anomaly_detection"))
    syn = os.path.join(out, "synthetic")
    if not os.path.isdir(syn):
        make_synthetic_mvtec(syn, seed=0)
    units = [(c, ["data.name=folder", f"data.root={os.path.join(syn, c)}"] + backbone)
             for c in (categories or ["texture", "object"])]
    return units, notes


def run_category(out: str, category: str, overrides: list[str], config: str = CONFIG) -> dict:
    config = apply_overrides(load_config(f"{config}:{category}"), overrides)
    workdir = os.path.join(out, "work", category)
    pipeline.fit_from_config(config, workdir)
    result = pipeline.evaluate_workdir(workdir, num_overlays=6)
    return {"category": category, "backbone": config.backbone.name,
            "config": config.to_dict(),
            "fit_seconds": model_fit_seconds(workdir),
            **{k: result.get(k) for k in ("image_auroc", "pixel_auroc", "aupro", "pixel_ap",
                                          "num_images", "eval_seconds")}}


def main(argv=None) -> None:
    args = runner.parse_args(__doc__.split("\n")[0], lambda p: (
        p.add_argument("--categories", nargs="+", default=None),
        p.add_argument("--config", default=CONFIG, help="config file (get_config(category))"),
        p.add_argument("overrides", nargs="*", help="config overrides")), argv)
    units, notes = plan(args.out, args.categories, args.config)
    rows = []
    for category, overrides in units:
        r = runner.cached(args.out, category,
                          lambda c=category, o=overrides: run_category(args.out, c, o + args.overrides,
                                                               args.config),
                          fresh=args.fresh)
        rows.append(r)
    cols = ["category", "image_auroc", "pixel_auroc", "aupro", "pixel_ap", "num_images",
            "fit_seconds", "eval_seconds"]
    data = "MVTec AD" if os.environ.get("MVTEC_AD_ROOT") else "generated MVTec-layout set"
    for key, paper_key in (("image_auroc", "Table 2"), ("pixel_auroc", "Table 3")):
        runner.save_bars(os.path.join(args.out, f"{key}_per_category.png"),
                         [r["category"] for r in rows], [float(r[key]) for r in rows],
                         reference=PAPER_MEAN[key],
                         reference_label=f"paper mean {PAPER_MEAN[key]} ({paper_key})",
                         ylabel=key.replace("_", " "),
                         title=f"Patch Gaussians ({rows[0]['backbone'] if rows else '-'}), {data}")
    rows.append(runner.mean_row(rows, "category", "mean (measured)", cols[1:4]))
    rows.append({"category": "mean (paper, ConTNet-B)", **PAPER_MEAN})
    notes.append(f"config: {os.path.relpath(args.config, os.path.dirname(HERE))}; overrides: "
                 f"{' '.join(args.overrides) or '(none)'}")
    notes.append(f"machine: {runner.machine()}")
    notes.append("plots: image_auroc_per_category.png, pixel_auroc_per_category.png; heatmaps: "
                 "work/<category>/eval/overlays.png; ROC: work/<category>/eval/roc.png "
                 "(work/ is not committed)")
    runner.write_report(args.out, "table", rows, cols,
                        title="Patch Gaussians, MVTec AD (Dini & Rahtu Tables 2 and 3)",
                        notes=notes)


if __name__ == "__main__":
    main()
