"""experiments/device_pack.py: the folder a device lease carries (data part; no registry)."""
import os
import sys

import numpy as np
import pytest
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from experiments import accelerator_run as acc  # noqa: E402
from experiments import device_pack  # noqa: E402


@pytest.mark.skipif(acc.find_mvtec_root(None) is None, reason="real MVTec AD bottle absent")
def test_pack_holds_readable_bottle_mnist_and_the_device_command(tmp_path, capsys):
    from vtadl_jax.data.image_files import load_mask
    from vtadl_jax.data.layouts import scan_mvtec
    from vtadl_jax.data.mnist import find_mnist_files, load_mnist

    out = tmp_path / "pack"
    (out / "old").mkdir(parents=True)  # a previous pack is replaced as a whole
    assert device_pack.main(["--out", str(out), "--no-wheels", "--bottle-size", "40",
                             "--limit", "2"]) == 0
    assert not (out / "old").exists() and not list(tmp_path.glob(".device_pack-*"))
    # The bottle in its MVTec layout, as the data layer reads it: 2 images per folder.
    source = scan_mvtec(acc.find_mvtec_root(None), "bottle")
    packed = scan_mvtec(out / "mvtec_ad", "bottle")
    defects = sorted({r.defect for r in source["test"]})
    assert len(packed["train"]) == 2
    assert sorted({r.defect for r in packed["test"]}) == defects
    assert len(packed["test"]) == 2 * len(defects)
    for rec in packed["train"] + packed["test"]:
        with Image.open(rec.image) as im:
            assert im.format == "JPEG" and im.size == (40, 40) and im.mode == "RGB"
        if rec.label:  # the mask of every defect image, resized, still binary and not empty
            mask = load_mask(rec.mask)
            assert mask.shape == (40, 40) and set(np.unique(mask)) <= {0, 1} and mask.any()
    # Same pixels as resizing the source image (up to JPEG's rounding at quality 95).
    src = next(r for r in source["train"] if r.filename == packed["train"][0].filename
               .replace(".jpg", ".png"))
    with Image.open(src.image) as im:
        expected = np.asarray(im.convert("RGB").resize((40, 40), Image.Resampling.BILINEAR),
                              np.float64)
    with Image.open(packed["train"][0].image) as im:
        got = np.asarray(im, np.float64)
    assert np.abs(got - expected).mean() < 3.0
    # MNIST as the MNIST stage reads it (--mnist-dir).
    assert len(find_mnist_files(out / "mnist")) == 4
    data = load_mnist(out / "mnist")
    assert data["train"][0].shape == (60000, 28, 28) and data["test"][1].shape == (10000,)
    # The device command: wheels into /tmp/site, the run on the pack's data, files to $OUT.
    script = (out / "run.sh").read_text()
    assert os.access(out / "run.sh", os.X_OK)
    for needle in ("--target /tmp/site", "experiments/accelerator_run.py",
                   "--mnist-dir $PACK/mnist", "--mvtec-root $PACK/mvtec_ad", '"$OUTDIR/"'):
        assert needle in script, needle
    assert "MiB of the device's 64 MiB transfer limit" in capsys.readouterr().out


def test_bad_arguments_exit_2(tmp_path, capsys):
    for args in (["--bottle-size", "4"], ["--jpeg-quality", "0"], ["--limit", "0"]):
        with pytest.raises(SystemExit) as exc:
            device_pack.main(["--out", str(tmp_path / "p"), "--no-wheels", *args])
        assert exc.value.code == 2 and args[0] in capsys.readouterr().err
    assert not (tmp_path / "p").exists()
