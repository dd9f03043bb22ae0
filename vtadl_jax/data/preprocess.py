"""Image/mask preprocessing with NumPy and PIL, and the named presets.

A :class:`Preprocessing` maps a raw example (uint8 image (H, W, C), uint8 mask
(H, W) in {0, 1}) to (float32 image (H', W', C'), uint8 mask (H', W') in {0, 1}):

1. channels: ``channels=3`` replicates a grey image, ``channels=1`` converts RGB to
   grey with PIL's ITU-R 601-2 luma; None keeps the stored channels;
2. resize to ``resize`` = (height, width) with PIL bilinear on the uint8 image (the
   torchvision-on-PIL behaviour of the reference code); masks with NEAREST;
3. centre crop to ``crop`` (torchvision's rounding: top = round((H - h) / 2));
4. zero padding by ``pad`` pixels on every side (MNIST 28 -> 32);
5. scaling: "minus_one_one" (x / 127.5 - 1), "zero_one" (x / 255, the VT-ADL
   code's behaviour) or "imagenet" ((x / 255 - mean) / std per channel).

Presets (:func:`preset`); ``size`` overrides for small runs:

- "vtadl_mvtec": resize 550, centre crop 512, [-1, 1]; size=s crops s after resizing
  to round(s * 550 / 512);
- "vtadl_btad": resize 512, [-1, 1]; size=s resizes to s;
- "patch_gaussian": resize 224, ImageNet mean/std; size=s resizes to s;
- "mnist": 28x28 kept, [-1, 1], 1 channel; size > 28 pads with zeros to size
  (size - 28 must be even), size < 28 resizes;
- "none": no geometric change, [-1, 1].
"""
from __future__ import annotations

import dataclasses

import numpy as np
from PIL import Image

__all__ = ["Preprocessing", "PRESETS", "preset", "IMAGENET_MEAN", "IMAGENET_STD"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_SCALES = ("minus_one_one", "zero_one", "imagenet")
PRESETS = ("vtadl_mvtec", "vtadl_btad", "patch_gaussian", "mnist", "none")


@dataclasses.dataclass(frozen=True)
class Preprocessing:
    """Deterministic preprocessing of one (image, mask) pair; see the module doc."""

    resize: tuple[int, int] | None = None
    crop: tuple[int, int] | None = None
    pad: int = 0
    scale: str = "minus_one_one"
    channels: int | None = None

    def __post_init__(self) -> None:
        if self.scale not in _SCALES:
            raise ValueError(f"scale must be one of {_SCALES}, got {self.scale!r}")
        if self.channels not in (None, 1, 3):
            raise ValueError(f"channels must be None, 1 or 3, got {self.channels!r}")
        if self.scale == "imagenet" and self.channels == 1:
            raise ValueError("ImageNet normalisation needs 3 channels")
        if self.pad < 0:
            raise ValueError(f"pad must be >= 0, got {self.pad}")

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        """(H', W') produced for an input of (height, width)."""
        h, w = self.resize if self.resize is not None else (height, width)
        if self.crop is not None:
            h, w = self.crop
        return h + 2 * self.pad, w + 2 * self.pad

    def image(self, image: np.ndarray) -> np.ndarray:
        """uint8 (H, W, C) -> float32 (H', W', C')."""
        img = _as_pil(image, self.channels)
        if self.resize is not None and img.size != (self.resize[1], self.resize[0]):
            img = img.resize((self.resize[1], self.resize[0]), Image.Resampling.BILINEAR)
        arr = np.asarray(img, dtype=np.uint8)
        arr = arr[..., None] if arr.ndim == 2 else arr
        arr = _pad(_center_crop(arr, self.crop), self.pad)
        return _scale(arr, self.scale)

    def mask(self, mask: np.ndarray) -> np.ndarray:
        """uint8 (H, W) in {0, 1} -> uint8 (H', W') in {0, 1} (NEAREST, binarised)."""
        arr = (np.asarray(mask) > 0).astype(np.uint8)
        if arr.ndim == 3:
            arr = arr[..., 0]
        if self.resize is not None and arr.shape != tuple(self.resize):
            img = Image.fromarray(arr * np.uint8(255))
            img = img.resize((self.resize[1], self.resize[0]), Image.Resampling.NEAREST)
            arr = (np.asarray(img) > 127).astype(np.uint8)
        return _pad(_center_crop(arr, self.crop), self.pad)

    def __call__(self, image: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self.image(image), self.mask(mask)


def _as_pil(image: np.ndarray, channels: int | None) -> Image.Image:
    arr = np.asarray(image)
    if arr.dtype != np.uint8:
        raise ValueError(f"expected a uint8 image, got {arr.dtype}")
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim == 2:
        img = Image.fromarray(arr)
        return img.convert("RGB") if channels == 3 else img
    if arr.ndim != 3 or arr.shape[-1] != 3:
        raise ValueError(f"expected (H, W), (H, W, 1) or (H, W, 3), got {arr.shape}")
    img = Image.fromarray(arr)
    return img.convert("L") if channels == 1 else img


def _center_crop(arr: np.ndarray, crop: tuple[int, int] | None) -> np.ndarray:
    if crop is None:
        return arr
    h, w = arr.shape[:2]
    ch, cw = crop
    if ch > h or cw > w:
        raise ValueError(f"crop {crop} is larger than the image {(h, w)}")
    top = int(round((h - ch) / 2.0))
    left = int(round((w - cw) / 2.0))
    return arr[top:top + ch, left:left + cw]


def _pad(arr: np.ndarray, pad: int) -> np.ndarray:
    if pad == 0:
        return arr
    widths = [(pad, pad), (pad, pad)] + [(0, 0)] * (arr.ndim - 2)
    return np.pad(arr, widths)


def _scale(arr: np.ndarray, scale: str) -> np.ndarray:
    x = arr.astype(np.float32)
    if scale == "minus_one_one":
        return x / np.float32(127.5) - np.float32(1.0)
    x = x / np.float32(255.0)
    if scale == "zero_one":
        return x
    mean = np.asarray(IMAGENET_MEAN, np.float32)
    std = np.asarray(IMAGENET_STD, np.float32)
    return (x - mean) / std


def _square(size: int | tuple[int, int]) -> tuple[int, int]:
    return (size, size) if isinstance(size, (int, np.integer)) else tuple(size)


def preset(name: str, *, size: int | None = None, scale: str | None = None,
           channels: int | None | str = "default") -> Preprocessing:
    """The named preset (see the module doc), with optional overrides.

    Args:
      name: one of :data:`PRESETS`.
      size: output side for small runs (see the module doc for each preset).
      scale: override the scaling ("minus_one_one", "zero_one", "imagenet").
      channels: override the channel handling (None keeps the stored channels).
    """
    if name == "vtadl_mvtec":
        out = 512 if size is None else int(size)
        cfg = dict(resize=_square(round(out * 550 / 512)), crop=_square(out),
                   scale="minus_one_one", channels=3)
    elif name == "vtadl_btad":
        cfg = dict(resize=_square(512 if size is None else int(size)),
                   scale="minus_one_one", channels=3)
    elif name == "patch_gaussian":
        cfg = dict(resize=_square(224 if size is None else int(size)),
                   scale="imagenet", channels=3)
    elif name == "mnist":
        cfg = dict(scale="minus_one_one", channels=1)
        if size is not None and size > 28:
            if (size - 28) % 2:
                raise ValueError(f"mnist: size - 28 must be even to pad, got size={size}")
            cfg["pad"] = (size - 28) // 2
        elif size is not None and size < 28:
            cfg["resize"] = _square(int(size))
    elif name == "none":
        cfg = dict(scale="minus_one_one", channels=None)
        if size is not None:
            cfg["resize"] = _square(int(size))
    else:
        raise ValueError(f"Unknown preset {name!r}; expected one of {PRESETS}")
    if scale is not None:
        cfg["scale"] = scale
    if channels != "default":
        cfg["channels"] = channels
    return Preprocessing(**cfg)
