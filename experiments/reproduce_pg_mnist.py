"""Patch Gaussians on ImageNet EfficientNet-Lite0, MNIST one-class, per digit.

    python experiments/reproduce_pg_mnist.py --out experiments/results/pg_mnist [--digits 0 1]

Neither patch-Gaussian paper reports MNIST; VT-ADL's Table II (mean image AUROC 0.984)
is shown beside for orientation only. Image AUROC only (MNIST has no pixel masks).
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

if __name__ == "__main__":  # first, before jax loads: huge-page malloc (vtadl_jax.hostmem)
    from vtadl_jax.hostmem import reexec_with_hugepage_malloc

    reexec_with_hugepage_malloc()

from experiments import runner  # noqa: E402
from vtadl_jax.configs import apply_overrides, load_config  # noqa: E402
from vtadl_jax.pipelines import patch_gaussian as pipeline  # noqa: E402

CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "patch_gaussian_mnist.py")
VTADL_MEAN_AUROC = 0.984  # VT-ADL Table II (METHODS.md part A), for orientation only


def run_digit(out: str, digit: int, overrides: list[str]) -> dict:
    config = apply_overrides(load_config(f"{CONFIG}:{digit}"), overrides)
    workdir = os.path.join(out, "work", f"digit{digit}")
    model = pipeline.fit_from_config(config, workdir)
    result = pipeline.evaluate_workdir(workdir, num_overlays=0)
    return {"digit": digit, "image_auroc": result["image_auroc"],
            "image_ap": result["image_ap"], "train_images": model.num_images,
            "test_images": result["num_images"],
            "fit_seconds": model_fit_seconds(workdir), "eval_seconds": result["eval_seconds"],
            "config": config.to_dict()}


def model_fit_seconds(workdir: str) -> float:
    import json

    with open(os.path.join(workdir, "model_spec.json")) as f:
        return float(json.load(f)["fit_seconds"])


def main(argv=None) -> None:
    args = runner.parse_args(__doc__.split("\n")[0], lambda p: (
        p.add_argument("--digits", type=int, nargs="+", default=list(range(10))),
        p.add_argument("overrides", nargs="*", help="config overrides, e.g. data.image_size=64")),
        argv)
    rows = []
    for d in args.digits:
        r = runner.cached(args.out, f"digit{d}", lambda d=d: run_digit(args.out, d, args.overrides),
                          fresh=args.fresh)
        rows.append({k: r[k] for k in ("digit", "image_auroc", "image_ap", "train_images",
                                       "test_images", "fit_seconds", "eval_seconds")})
    cols = ["digit", "image_auroc", "image_ap", "train_images", "test_images", "fit_seconds",
            "eval_seconds"]
    runner.save_bars(os.path.join(args.out, "auroc_per_digit.png"),
                     [str(r["digit"]) for r in rows], [float(r["image_auroc"]) for r in rows],
                     reference=VTADL_MEAN_AUROC, reference_label="VT-ADL paper mean 0.984",
                     ylabel="image AUROC",
                     title="Patch Gaussians (EfficientNet-Lite0), MNIST one-class")
    rows.append(runner.mean_row(rows, "digit", "mean", cols[1:]))
    runner.write_report(args.out, "table", rows, cols,
                        title="Patch Gaussians (EfficientNet-Lite0, blocks 3+5), MNIST one-class",
                        notes=[f"machine: {runner.machine()}",
                               "VT-ADL Table II mean image AUROC for orientation: "
                               f"{VTADL_MEAN_AUROC}", "plot: auroc_per_digit.png"])


if __name__ == "__main__":
    main()
