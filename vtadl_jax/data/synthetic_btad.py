"""A small synthetic dataset in the BTAD layout (with BTAD's mixed file formats).

``<root>/<product>/train/ok``, ``test/ok``, ``test/ko`` and ``ground_truth/ko`` with
masks named like their images (same stem, no suffix). File formats follow the real
dataset: product 01 has .bmp images and .png masks, 02 .png and .png, 03 .bmp and
.bmp; product 03 images are 4:3 (width 3/4 of the height), like BTAD's 03 (a centred
crop that keeps the object whole). Images come
from :func:`vtadl_jax.data.synthetic.render_example`.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from vtadl_jax.data.synthetic import KIND_DEFECTS, render_example

__all__ = ["BTAD_EXTENSIONS", "make_synthetic_btad"]

BTAD_EXTENSIONS = {"01": (".bmp", ".png"), "02": (".png", ".png"), "03": (".bmp", ".bmp")}
_KINDS = {"01": "object", "02": "texture", "03": "object"}


def _save(array: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def make_synthetic_btad(root: str | Path, *, products: tuple[str, ...] = ("01", "02", "03"),
                        num_train: int = 8, num_test_good: int = 4, num_test_defect: int = 4,
                        image_size: int = 64, seed: int = 0, overwrite: bool = False) -> Path:
    """Write a BTAD-layout dataset and return ``root``.

    Anomalous test images cycle through the defect types of the product's kind.
    """
    root = Path(root).expanduser()
    for product in products:
        if product not in BTAD_EXTENSIONS:
            raise ValueError(f"Unknown BTAD product {product!r}; expected {tuple(BTAD_EXTENSIONS)}")
        base = root / product
        if base.exists():
            if not overwrite:
                raise FileExistsError(f"{base} exists; pass overwrite=True to replace it")
            shutil.rmtree(base)
        image_ext, mask_ext = BTAD_EXTENSIONS[product]
        width = image_size * 3 // 4 if product == "03" else image_size
        kind = _KINDS[product]
        left = (image_size - width) // 2  # centred crop keeps the whole object disc

        def render(split: str, i: int, defect: str | None = None):
            _, image, mask = render_example(seed, kind, split, i + 1000 * int(product),
                                            image_size=image_size, defect=defect)
            return image[:, left:left + width], mask[:, left:left + width]

        for i in range(num_train):
            _save(render("train", i)[0], base / "train" / "ok" / f"{i:04d}{image_ext}")
        for i in range(num_test_good):
            _save(render("test", i)[0], base / "test" / "ok" / f"{i:04d}{image_ext}")
        for i in range(num_test_defect):
            defect = KIND_DEFECTS[kind][i % len(KIND_DEFECTS[kind])]
            image, mask = render("test", i, defect)
            stem = f"{num_test_good + i:04d}"
            _save(image, base / "test" / "ko" / f"{stem}{image_ext}")
            _save(mask.astype(np.uint8) * np.uint8(255),
                  base / "ground_truth" / "ko" / f"{stem}{mask_ext}")
    return root
