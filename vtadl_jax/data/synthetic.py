"""A small synthetic dataset in the exact MVTec AD layout, for tests and demos.

Two kinds of category:

- "texture": smooth oriented stripes (two sinusoids) with low-frequency noise,
  coloured between two category colours;
- "object": a shaded disc with a concentric ring on a slightly noisy background,
  with a small positional jitter.

Every image also gets a global gain jitter (about +-4 %), so that defects cannot be
found by the mean brightness alone. Defects (each in test/<defect>/ with a 0/255 PNG
mask in ground_truth/<defect>/<stem>_mask.png):

- "scratch": a thin polyline, darker or lighter than its surroundings;
- "stain": an ellipse whose colour is shifted along a luminance-free direction (the
  brightness is unchanged, only the hue);
- "missing" (objects): a notch cut out of the disc, filled with background;
- "hole" (textures): an elliptic patch where the stripes are flattened to their mean.

The mask is the drawn defect region: outside it the defective image equals the clean
image (at least half of its pixels differ inside). Everything is a pure
function of (seed, category, split, defect, index): reruns are byte-identical.
"""
from __future__ import annotations

import shutil
import zlib
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

__all__ = ["KIND_DEFECTS", "category_kind", "render_example", "make_synthetic_mvtec"]

KIND_DEFECTS = {"texture": ("scratch", "stain", "hole"),
                "object": ("scratch", "stain", "missing")}
_MVTEC_TEXTURES = ("carpet", "grid", "leather", "tile", "wood")
_MVTEC_OBJECTS = ("bottle", "cable", "capsule", "hazelnut", "metal_nut", "pill", "screw",
                  "toothbrush", "transistor", "zipper")
_LUMA = np.array([0.299, 0.587, 0.114])


def category_kind(name: str) -> str:
    """"texture"/"object" for a kind name or an MVTec AD category name."""
    if name in KIND_DEFECTS:
        return name
    if name in _MVTEC_TEXTURES:
        return "texture"
    if name in _MVTEC_OBJECTS:
        return "object"
    raise ValueError(f"Unknown synthetic category {name!r}: use 'texture', 'object' or an "
                     f"MVTec AD category name {_MVTEC_TEXTURES + _MVTEC_OBJECTS}")
_SPLITS = {"train": 0, "test": 1}


def _category_id(category: str) -> int:
    return zlib.crc32(category.encode("utf-8"))


def _category_rng(seed: int, category: str) -> np.random.Generator:
    return np.random.default_rng([seed, _category_id(category)])


def _palette(seed: int, category: str) -> np.ndarray:
    """Two RGB colours about 0.6 apart, fixed per (seed, category)."""
    rng = _category_rng(seed, category)
    first = rng.uniform(0.25, 0.75, size=3)
    direction = rng.normal(size=3)
    second = np.clip(first + 0.6 * direction / np.linalg.norm(direction), 0.05, 0.95)
    return np.stack([first, second])


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Low-frequency noise in about [-1, 1]: a coarse grid up-sampled bicubically."""
    coarse = rng.uniform(-1.0, 1.0, size=(cells, cells)).astype(np.float32)
    up = Image.fromarray(coarse).resize((size, size), Image.Resampling.BICUBIC)
    return np.asarray(up, dtype=np.float64)


def _texture(rng: np.random.Generator, size: int, colours: np.ndarray, seed: int,
             category: str) -> tuple[np.ndarray, np.ndarray]:
    base = _category_rng(seed, category).uniform(0, np.pi, size=2)
    yy, xx = np.mgrid[0:size, 0:size] / size
    value = np.full((size, size), 0.5)
    for k, (amp, freq) in enumerate(((0.22, 6.0), (0.10, 15.0))):
        theta = base[k] + rng.normal(0.0, 0.04)
        f = freq * (1.0 + rng.normal(0.0, 0.03))
        phase = rng.uniform(0, 2 * np.pi)
        value += amp * np.sin(2 * np.pi * f * (xx * np.cos(theta) + yy * np.sin(theta)) + phase)
    value += 0.06 * _smooth_noise(rng, size, 6)
    image = colours[0] + (colours[1] - colours[0]) * value[..., None]
    support = np.zeros((size, size), bool)  # defects are placed away from the border
    margin = int(round(0.12 * size))
    support[margin:size - margin, margin:size - margin] = True
    return image, support


def _distance(size: int, cy: float, cx: float) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size] + 0.5
    return np.hypot(yy - cy, xx - cx)


def _object(rng: np.random.Generator, size: int, colours: np.ndarray
            ) -> tuple[np.ndarray, np.ndarray]:
    cy, cx = size / 2 + rng.uniform(-0.03, 0.03, size=2) * size
    radius = size * 0.3 * (1.0 + rng.normal(0.0, 0.02))
    dist = _distance(size, cy, cx)
    inside = dist <= radius
    background = colours[0] * (1.0 + 0.03 * _smooth_noise(rng, size, 4))[..., None]
    shade = 1.0 - 0.25 * (dist / radius) ** 2
    ring = np.abs(dist - 0.55 * radius) < 0.06 * radius
    body = colours[1] * (shade * np.where(ring, 0.7, 1.0))[..., None]
    return np.where(inside[..., None], body, background), inside


def _draw_mask(size: int, draw_fn) -> np.ndarray:
    canvas = Image.new("L", (size, size), 0)
    draw_fn(ImageDraw.Draw(canvas))
    return np.asarray(canvas) > 0


def _apply_defect(rng: np.random.Generator, image: np.ndarray, support: np.ndarray,
                  defect: str, kind: str, colours: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Return (defective image, changed-pixel mask); retries until the mask is not empty."""
    size = image.shape[0]
    ys, xs = np.nonzero(support)
    scale = size / 128.0
    for _ in range(100):
        i = rng.integers(len(ys))
        cy, cx = float(ys[i]), float(xs[i])
        out = image.copy()
        if defect == "scratch":
            pts = [(cx, cy)]
            angle = rng.uniform(0, 2 * np.pi)
            for _ in range(rng.integers(2, 4)):
                angle += rng.normal(0.0, 0.5)
                step = rng.uniform(8, 16) * max(scale, 0.6)
                pts.append((pts[-1][0] + step * np.cos(angle), pts[-1][1] + step * np.sin(angle)))
            width = max(1, int(round(rng.uniform(1.0, 2.0) * scale)))
            mask = _draw_mask(size, lambda d: d.line(pts, fill=255, width=width))
            mask &= support if kind == "object" else True
            luma = float(image[mask].mean(axis=0) @ _LUMA) if mask.any() else 0.5
            out[mask] = 0.12 if luma > 0.5 else 0.9
        elif defect in ("stain", "hole", "missing"):
            ry, rx = np.maximum(rng.uniform(0.05, 0.1, size=2) * size, 3.0)
            box = (cx - rx, cy - ry, cx + rx, cy + ry)
            region = _draw_mask(size, lambda d: d.ellipse(box, fill=255))
            if defect == "stain":
                mask = region & support
                direction = rng.normal(size=3)
                direction -= _LUMA * (direction @ _LUMA) / (_LUMA @ _LUMA)
                out[mask] += 0.25 * direction / np.linalg.norm(direction)
            elif defect == "hole":
                mask = region.copy()
                out[mask] = image[mask].mean(axis=0)
            else:  # missing: cut the object, show the background colour
                if kind != "object":
                    raise ValueError("the 'missing' defect needs an object category")
                mask = region & support
                out[mask] = colours[0]
        else:
            raise ValueError(f"Unknown defect type {defect!r}; known: {KIND_DEFECTS}")
        out = np.clip(out, 0.0, 1.0)
        changed = np.any(np.abs(out - image) > 2.0 / 255, axis=-1)
        if mask.sum() >= max(12.0, 12 * scale * scale) and changed[mask].mean() >= 0.5:
            return out, mask
    raise RuntimeError(f"Could not place a visible {defect!r} defect")  # pragma: no cover


def render_example(seed: int, category: str, split: str, index: int, *,
                   image_size: int = 128, defect: str | None = None
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Render one example as (clean uint8 (H, W, 3), image uint8, mask bool (H, W)).

    ``category`` is a kind or MVTec category name (:func:`category_kind`);
    ``defect=None`` gives a normal image (image == clean, empty mask).
    """
    kind = category_kind(category)
    defect_code = 0 if defect is None else 1 + sorted(
        {d for ds in KIND_DEFECTS.values() for d in ds}).index(defect)
    rng = np.random.default_rng([seed, _category_id(category), _SPLITS[split], defect_code,
                                 index])
    colours = _palette(seed, category)
    if kind == "texture":
        image, support = _texture(rng, image_size, colours, seed, category)
    else:
        image, support = _object(rng, image_size, colours)
    gain = 1.0 + rng.uniform(-0.04, 0.04)
    clean = np.clip(image * gain, 0.0, 1.0)
    mask = np.zeros(support.shape, bool)
    defective = clean
    if defect is not None:
        defective, mask = _apply_defect(rng, clean, support, defect, kind, colours * gain)
    to_u8 = lambda a: np.round(a * 255.0).astype(np.uint8)  # noqa: E731
    clean_u8, image_u8 = to_u8(clean), to_u8(defective)
    return clean_u8, image_u8, mask


def _save_png(array: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, format="PNG")


def make_synthetic_mvtec(root: str | Path, *, categories: tuple[str, ...] = ("texture", "object"),
                         num_train: int = 30, num_test_good: int = 10, num_test_defect: int = 5,
                         image_size: int = 128,
                         defect_types: dict[str, tuple[str, ...]] | None = None,
                         seed: int = 0, overwrite: bool = False) -> Path:
    """Write a synthetic dataset in the MVTec AD layout and return ``root``.

    Args:
      root: output directory; gets ``<root>/<category>/{train,test,ground_truth}``.
      categories: folder names, each "texture", "object" or an MVTec AD category name
        (e.g. "carpet" is drawn as a texture, "bottle" as an object), so the result can
        also be read as MVTec AD (``mvtec_ad/<category>``).
      num_train: normal training images per category.
      num_test_good: normal test images per category (test/good).
      num_test_defect: test images per defect type.
      image_size: side of the square images.
      defect_types: per kind, the defect types to draw (default :data:`KIND_DEFECTS`).
      seed: everything is a pure function of it.
      overwrite: replace existing category folders (otherwise they must not exist).
    """
    if image_size < 32:
        raise ValueError(f"image_size must be >= 32, got {image_size}")
    if num_train < 1 or num_test_good < 0 or num_test_defect < 0:
        raise ValueError("num_train must be >= 1 and the test counts >= 0")
    root = Path(root).expanduser()
    defects = dict(KIND_DEFECTS, **(defect_types or {}))
    kinds = {name: category_kind(name) for name in categories}
    for name, kind in kinds.items():
        base = root / name
        if base.exists():
            if not overwrite:
                raise FileExistsError(f"{base} exists; pass overwrite=True to replace it")
            shutil.rmtree(base)
        for i in range(num_train):
            _save_png(render_example(seed, name, "train", i, image_size=image_size)[1],
                      base / "train" / "good" / f"{i:03d}.png")
        for i in range(num_test_good):
            _save_png(render_example(seed, name, "test", i, image_size=image_size)[1],
                      base / "test" / "good" / f"{i:03d}.png")
        for defect in defects[kind]:
            for i in range(num_test_defect):
                _, image, mask = render_example(seed, name, "test", i, image_size=image_size,
                                                defect=defect)
                _save_png(image, base / "test" / defect / f"{i:03d}.png")
                _save_png(mask.astype(np.uint8) * np.uint8(255),
                          base / "ground_truth" / defect / f"{i:03d}_mask.png")
    return root
