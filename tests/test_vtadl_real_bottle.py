"""VT-ADL end to end on a small fixed subset of the REAL MVTec AD bottle category.

16 training images and 12 test images (3 of each of good, broken_large, broken_small,
contamination), down-sized once to 96 px PNGs in a temporary MVTec-layout folder, then
the library's own path: config experiments/configs/vtadl_bottle.py (the recorded
setting "no_noise", with a smaller model and input), pipelines.vtadl.train_from_config,
evaluate_workdir and make_predict.
Real data must give maps that are larger inside the defect masks than outside and an
image AUROC well above chance; a broken pipeline (maps not aligned with the images,
per-position statistics from the wrong images, labels mixed up, training that does not
train) fails these. Skipped when the data are absent ($MVTEC_AD_ROOT, else
../shared/data/mvtec_ad beside the repository).
"""
import os

import numpy as np
import pytest
from PIL import Image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROOT = os.environ.get("MVTEC_AD_ROOT") or os.path.join(os.path.dirname(REPO), "shared",
                                                      "data", "mvtec_ad")
DEFECTS = ("broken_large", "broken_small", "contamination")
SIDE = 96  # stored size of the subset (the model reads it at 32 px)


def copy_bottle_subset(src: str, dst: str, *, num_train: int = 16, per_type: int = 3,
                       side: int = SIDE) -> str:
    """A fixed subset of <src>/bottle in the MVTec layout under <dst>/bottle, resized to
    side x side (bilinear images, nearest masks). Returns <dst>."""
    def save(path_in: str, path_out: str, resample) -> None:
        os.makedirs(os.path.dirname(path_out), exist_ok=True)
        Image.open(path_in).resize((side, side), resample).save(path_out)

    b_src, b_dst = os.path.join(src, "bottle"), os.path.join(dst, "bottle")
    train = sorted(os.listdir(os.path.join(b_src, "train", "good")))
    for name in train[::len(train) // num_train][:num_train]:  # spread over the set
        save(os.path.join(b_src, "train", "good", name),
             os.path.join(b_dst, "train", "good", name), Image.BILINEAR)
    for defect in ("good",) + DEFECTS:
        names = sorted(os.listdir(os.path.join(b_src, "test", defect)))[:per_type]
        for name in names:
            save(os.path.join(b_src, "test", defect, name),
                 os.path.join(b_dst, "test", defect, name), Image.BILINEAR)
            if defect != "good":
                mask = name.replace(".png", "_mask.png")
                save(os.path.join(b_src, "ground_truth", defect, mask),
                     os.path.join(b_dst, "ground_truth", defect, mask), Image.NEAREST)
    return dst


@pytest.mark.skipif(not os.path.isdir(os.path.join(ROOT, "bottle")),
                    reason=f"real MVTec AD bottle not found under {ROOT}")
def test_vtadl_localises_defects_on_real_bottle(tmp_path):
    from vtadl_jax.configs import load_config
    from vtadl_jax.pipelines import common, vtadl

    data = copy_bottle_subset(ROOT, str(tmp_path / "mvtec"))
    config = load_config(os.path.join(REPO, "experiments", "configs", "vtadl_bottle.py:no_noise"),
                         [f"data.root={data}", "data.image_size=32", "num_steps=150",
                          "checkpoint.every_steps=150", "checkpoint.async_save=False",
                          "progress=False"])
    config.model.overrides = dict(config.model.overrides, image_size=32, patch_size=4,
                                  dim=32, depth=1, num_heads=2, mlp_dim=64, recon_dim=64,
                                  decoder_width=16, decoder_num_up=3)
    workdir = str(tmp_path / "run")
    vtadl.train_from_config(config, workdir)
    result = vtadl.evaluate_workdir(workdir, num_overlays=0)

    test = common.make_source(config.data, "test")
    assert len(test) == 12
    batch = {k: np.stack([test[i][k] for i in range(len(test))]) for k in ("image", "mask")}
    labels = np.array([int(test[i]["label"]) for i in range(len(test))])
    maps, scores = vtadl.make_predict(workdir, config)(batch["image"])
    assert maps.shape == batch["mask"].shape == (12, 32, 32)
    inside_higher = [maps[i][batch["mask"][i] > 0].mean() > maps[i][batch["mask"][i] == 0].mean()
                     for i in np.flatnonzero(labels == 1)]
    # Measured here (seed 0, 2-core CPU, setting "no_noise"): map mean inside > outside
    # the mask for 8 of 9 defect images, pixel AUROC 0.909, image AUROC 0.963, AUPRO 0.544
    # (setting "fixed": 9/9, 0.910, 1.000, 0.600). The bounds leave headroom (1 image,
    # ~0.13 pixel and ~0.16 image AUROC) for other platforms' rounding; a model that has not
    # learnt (6 steps of "no_noise": 2/9, pixel AUROC 0.38, image AUROC 0.56) or maps not
    # aligned with the masks fail them.
    assert sum(inside_higher) >= 7, inside_higher
    assert result["pixel_auroc"] > 0.78, result
    assert result["image_auroc"] > 0.8, result
    assert scores.shape == (12,) and np.all(np.isfinite(scores)) and np.all(np.isfinite(maps))
    print(f"inside>outside {sum(inside_higher)}/9, pixel AUROC {result['pixel_auroc']:.3f}, "
          f"image AUROC {result['image_auroc']:.3f}, AUPRO {result['aupro']:.3f}")
