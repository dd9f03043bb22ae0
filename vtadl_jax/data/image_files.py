"""Reading and writing image and mask files with PIL, with loud failures.

Conventions used by the whole data package:

- images are returned as ``uint8`` arrays of shape (H, W, C) with C = 3 (RGB) or
  C = 1 (grey); palette, alpha and 16-bit images are converted as documented in
  :func:`load_image`.
- masks are returned as ``uint8`` arrays of shape (H, W) with values in {0, 1}.

Mask policy (:func:`load_mask`): a mask file is accepted as-is only when its pixel
values are all in {0, 255} or all in {0, 1} (the MVTec AD and BTAD conventions).
Any other value (for instance the grey edge of an anti-aliased drawing or JPEG
noise) is an :class:`InvalidMaskError` naming the file, unless the caller passes an
explicit ``binarize_threshold`` t, in which case the mask is ``value > t``.
"""
from __future__ import annotations

import glob
import io
import os
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from vtadl_jax.data.errors import InvalidImageError, InvalidMaskError, MissingDataError

__all__ = ["IMAGE_EXTENSIONS", "is_image_file", "find_image_files", "load_image", "load_mask",
           "encode_png", "image_size"]

IMAGE_EXTENSIONS = (".png", ".bmp", ".jpg", ".jpeg", ".tif", ".tiff")


def is_image_file(path: Path) -> bool:
    """True when ``path`` is a regular file with a known image extension."""
    return path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS


def _images_under(directory: Path) -> list[str]:
    """Image files below ``directory`` (recursively, sorted); other files are skipped."""
    found = []
    for parent, dirs, files in os.walk(directory):
        dirs.sort()
        found += [os.path.join(parent, f) for f in sorted(files)
                  if is_image_file(Path(parent, f))]
    return found


def find_image_files(specs: list[str] | tuple[str, ...], *, what: str = "--images") -> list[str]:
    """Image files named by files, directories (searched recursively for the extensions
    of ``IMAGE_EXTENSIONS``; other files skipped) and glob patterns (``**`` recursive).

    Returns the paths in the order given (each directory's and pattern's sorted), without
    repeats. Raises MissingDataError naming the argument when a path does not exist, a
    directory holds no image file or a pattern matches none, InvalidImageError when a
    file named explicitly has no image extension.
    """
    found: list[str] = []
    for spec in specs:
        path = Path(spec)
        if path.is_dir():
            files = _images_under(path)
            if not files:
                raise MissingDataError(
                    f"{what}: directory {spec} holds no image file (expected files ending in "
                    f"{', '.join(IMAGE_EXTENSIONS)}, searched recursively)")
        elif path.is_file():
            if path.suffix.lower() not in IMAGE_EXTENSIONS:
                raise InvalidImageError(
                    f"{what}: {spec} is not an image file (expected a name ending in "
                    f"{', '.join(IMAGE_EXTENSIONS)})")
            files = [str(path)]
        elif glob.has_magic(spec):
            matched = sorted(glob.glob(spec, recursive=True))
            files = [m for m in matched if is_image_file(Path(m))]
            for m in matched:
                if Path(m).is_dir():
                    files += _images_under(Path(m))
            if not files:
                raise MissingDataError(
                    f"{what}: pattern {spec!r} matches no image file"
                    + (f" ({len(matched)} other paths matched)" if matched else ""))
        else:
            raise MissingDataError(f"{what}: {spec} does not exist (expected an image file, "
                                   "a directory of images or a glob pattern)")
        found += files
    return list(dict.fromkeys(found))


def _open_fully(path: Path) -> Image.Image:
    """Open and fully decode ``path``; a truncated or corrupt file raises."""
    if not path.is_file():
        raise MissingDataError(f"Image file not found: {path}")
    try:
        with Image.open(path) as img:
            img.load()  # full decode: truncated files raise OSError here
            return img.copy()
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as err:
        raise InvalidImageError(
            f"Cannot decode image file {path} (expected a complete, readable image "
            f"file): {err}") from err


def image_size(path: Path) -> tuple[int, int]:
    """(height, width) of an image file, read from its header only."""
    try:
        with Image.open(path) as img:
            width, height = img.size
    except (OSError, UnidentifiedImageError) as err:
        raise InvalidImageError(f"Cannot read image header of {path}: {err}") from err
    return height, width


def load_image(path: str | Path, *, channels: int | None = 3) -> np.ndarray:
    """Decode an image file completely into a uint8 (H, W, C) array.

    Args:
      path: the file.
      channels: 3 converts to RGB (grey replicated, alpha dropped, palette expanded),
        1 converts to grey ("L"), None keeps grey as 1 channel and everything else RGB.
    Raises:
      MissingDataError: the file does not exist.
      InvalidImageError: the file is unreadable or truncated.
    """
    path = Path(path)
    img = _open_fully(path)
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16-bit grey: keep the 8 most significant bits.
        arr16 = np.asarray(img, dtype=np.uint32)
        img = Image.fromarray((arr16 >> 8).clip(0, 255).astype(np.uint8))
    if channels is None:
        channels = 1 if img.mode in ("L", "1", "LA") else 3
    if channels == 3:
        arr = np.asarray(img.convert("RGB"), dtype=np.uint8)
    elif channels == 1:
        arr = np.asarray(img.convert("L"), dtype=np.uint8)[..., None]
    else:
        raise ValueError(f"channels must be 1, 3 or None, got {channels!r}")
    return np.ascontiguousarray(arr)


def load_mask(path: str | Path, *, expected_size: tuple[int, int] | None = None,
              binarize_threshold: int | None = None) -> np.ndarray:
    """Decode a ground-truth mask into a uint8 (H, W) array with values in {0, 1}.

    Args:
      path: the mask file (any extension PIL reads).
      expected_size: (height, width) the mask must have (its image's size).
      binarize_threshold: None (default) requires values in {0, 255} or {0, 1};
        an integer t accepts any grey mask and returns ``value > t``.
    Raises:
      MissingDataError, InvalidImageError: as :func:`load_image`.
      InvalidMaskError: wrong size, or non-binary values without a threshold.
    """
    path = Path(path)
    img = _open_fully(path)
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img)
    else:
        arr = np.asarray(img.convert("L"))
    if expected_size is not None and tuple(arr.shape[:2]) != tuple(expected_size):
        raise InvalidMaskError(
            f"Mask {path} has size (H, W) = {tuple(arr.shape[:2])}, expected "
            f"{tuple(expected_size)} (the size of its image)")
    if binarize_threshold is not None:
        return (arr > binarize_threshold).astype(np.uint8)
    values = np.unique(arr)
    if set(values.tolist()) <= {0, 255}:
        return (arr == 255).astype(np.uint8)
    if set(values.tolist()) <= {0, 1}:
        return arr.astype(np.uint8)
    shown = ", ".join(str(v) for v in values[:8]) + (", ..." if len(values) > 8 else "")
    raise InvalidMaskError(
        f"Mask {path} is not binary: values {{{shown}}}; expected only {{0, 255}} or "
        f"{{0, 1}}. Pass binarize_threshold=<t> to accept grey masks as value > t.")


def encode_png(array: np.ndarray) -> bytes:
    """Losslessly encode a uint8 (H, W), (H, W, 1) or (H, W, 3) array as PNG bytes."""
    arr = np.asarray(array)
    if arr.dtype != np.uint8:
        raise ValueError(f"encode_png expects uint8, got {arr.dtype}")
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[-1] != 3):
        raise ValueError(f"encode_png expects (H, W), (H, W, 1) or (H, W, 3), got {arr.shape}")
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()
