"""Patch Gaussians end to end on real images: `fit_from_config` + `evaluate_workdir` (what
`vtadl-jax fit` / `evaluate` run) on a fixed subset of the real MVTec AD bottle (16
training images, 12 test images: 3 of each defect type and 3 good), 128 px,
EfficientNet-Lite0 blocks 3 + 5. Skipped when the data is absent (tests/real_bottle.py).

What real data must satisfy and a broken pipeline would not: the anomaly map is higher
inside the ground-truth defect than outside it on most defect images (a map that is
flipped, shifted, mis-resized or unrelated to the image fails), and the image AUROC on
the subset clears a margin below the value measured here.
"""
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from real_bottle import copy_subset, require_bottle  # noqa: E402
from vtadl_jax import metrics  # noqa: E402
from vtadl_jax.configs import apply_overrides, load_config  # noqa: E402
from vtadl_jax.pipelines import common  # noqa: E402
from vtadl_jax.pipelines import patch_gaussian as pipeline  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, "experiments", "configs", "patch_gaussian_mvtec.py")
PER_KIND = {"good": 3, "broken_large": 3, "broken_small": 3, "contamination": 3}
# Measured on this subset (2026-12-03, 2-core CPU, JAX 0.10.2): image AUROC 0.963 (26 of
# the 27 good/defect pairs ranked right), pixel AUROC 0.978, defect images with
# mean(map | defect) > mean(map | rest): 9 of 9. The bounds leave headroom for numerics.
MIN_IMAGE_AUROC = 0.85
MIN_PIXEL_AUROC = 0.90
MIN_DEFECTS_HOTTER_INSIDE = 7  # of 9


def test_fit_and_evaluate_on_real_bottle_subset(tmp_path):
    root = copy_subset(require_bottle(), tmp_path / "mvtec", num_train=16, per_kind=PER_KIND)
    config = apply_overrides(load_config(f"{CONFIG}:bottle"), [
        f"data.root={root}", "data.backend=direct", "data.image_size=128", "batch_size=16",
        "backbone.name=efficientnet_lite0", "backbone.stages=('block3','block5')"])
    workdir = str(tmp_path / "run")
    model = pipeline.fit_from_config(config, workdir)
    assert model.num_images == 16 and tuple(model.grid) == (16, 16)
    result = pipeline.evaluate_workdir(workdir)
    assert result["num_images"] == 12 and result["num_anomalous"] == 9
    assert os.path.getsize(os.path.join(workdir, "eval", "overlays.png")) > 0

    # The maps themselves, from the saved model (as `vtadl-jax predict` would load it).
    model, backbone = pipeline.load_model(workdir)
    source = common.make_source(config.data, "test")
    out = common.collect_outputs(pipeline.make_predict(model, backbone, (128, 128)), source,
                                 config.batch_size)
    np.testing.assert_allclose(metrics.auroc(out["scores"], out["labels"]),
                               result["image_auroc"], atol=1e-12)
    hotter = [float(m[k > 0].mean()) > float(m[k == 0].mean())
              for m, k, y in zip(out["maps"], out["masks"], out["labels"]) if y == 1]
    print(f"image AUROC {result['image_auroc']:.3f}, pixel AUROC {result['pixel_auroc']:.3f}, "
          f"defects hotter inside {sum(hotter)}/{len(hotter)}")
    assert len(hotter) == 9
    assert sum(hotter) >= MIN_DEFECTS_HOTTER_INSIDE
    assert result["image_auroc"] >= MIN_IMAGE_AUROC
    assert result["pixel_auroc"] >= MIN_PIXEL_AUROC
