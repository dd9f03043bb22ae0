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

Size policy: an image whose header declares more than ``max_image_pixels`` pixels
(default :data:`DEFAULT_MAX_IMAGE_PIXELS` = 8192 x 8192, or the environment variable
``VTADL_MAX_IMAGE_PIXELS``) is refused with :class:`ImageTooLargeError` before any pixel
is decoded, so a decompression bomb (a small file declaring a huge image) costs neither
time nor memory. Every decode failure names the file.
"""
from __future__ import annotations

import contextlib
import glob
import io
import os
import re
import warnings
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image

from vtadl_jax.data.errors import (DatasetError, ImageTooLargeError, InvalidImageError,
                                   InvalidMaskError, MissingDataError)

__all__ = ["IMAGE_EXTENSIONS", "DEFAULT_MAX_IMAGE_PIXELS", "MAX_PIXELS_ENV", "is_image_file",
           "find_image_files", "load_image", "load_mask", "encode_png", "image_size",
           "max_image_pixels"]

IMAGE_EXTENSIONS = (".png", ".bmp", ".jpg", ".jpeg", ".tif", ".tiff")
DEFAULT_MAX_IMAGE_PIXELS = 8192 * 8192  # 64 Mi pixels: 192 MiB as RGB uint8
MAX_PIXELS_ENV = "VTADL_MAX_IMAGE_PIXELS"


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


def max_image_pixels(limit: int | None = None) -> int:
    """The pixel limit in force: ``limit`` if given, else $VTADL_MAX_IMAGE_PIXELS, else
    :data:`DEFAULT_MAX_IMAGE_PIXELS`."""
    source = "max_image_pixels"
    if limit is None:
        env = os.environ.get(MAX_PIXELS_ENV, "").strip()
        if not env:
            return DEFAULT_MAX_IMAGE_PIXELS
        source, limit = MAX_PIXELS_ENV, env
    try:
        value = int(limit)
    except (TypeError, ValueError):
        value = 0
    if value <= 0:
        raise DatasetError(f"{source} must be a positive integer (a number of pixels), "
                           f"got {limit!r}")
    return value


@contextlib.contextmanager
def _open_checked(path: Path, limit: int | None) -> Iterator[Image.Image]:
    """``Image.open`` (header only) of a regular file within the pixel limit."""
    if not path.exists():
        raise MissingDataError(f"Image file not found: {path}")
    if not path.is_file():
        raise InvalidImageError(f"{path} is not a regular file (expected an image file)")
    limit = max_image_pixels(limit)
    too_large = (f"Image file {path} declares {{}} pixels, more than the limit of {limit} "
                 f"(a decompression bomb?); for a genuinely huge image raise the limit with "
                 f"max_image_pixels=<n> or the environment variable {MAX_PIXELS_ENV}=<n>")
    if Image.MAX_IMAGE_PIXELS is not None and limit > Image.MAX_IMAGE_PIXELS:
        Image.MAX_IMAGE_PIXELS = limit  # the caller asked for more: PIL must not refuse first
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # bomb and corrupt-metadata warnings: we raise
            img = Image.open(path)
    except Image.DecompressionBombError as err:  # beyond twice PIL's own limit
        declared = re.search(r"\((\d+) pixels\)", str(err))
        raise ImageTooLargeError(too_large.format(
            declared.group(1) if declared else "more")) from None
    except Exception as err:  # PIL plugins raise many types on malformed headers
        raise InvalidImageError(f"Cannot read image file {path} (expected a readable image "
                                f"file): {type(err).__name__}: {err}") from None
    with img:
        width, height = img.size
        if width * height > limit:
            raise ImageTooLargeError(too_large.format(f"{width} x {height} = {width * height}"))
        if width <= 0 or height <= 0:
            raise InvalidImageError(f"Image file {path} has size {width} x {height} "
                                    "(expected a non-empty image)")
        yield img


def _open_fully(path: Path, limit: int | None = None) -> Image.Image:
    """Open and fully decode ``path``; a truncated, corrupt or too large file raises."""
    with _open_checked(path, limit) as img:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # bomb and corrupt-metadata warnings: we raise
                img.load()  # full decode: truncated files raise OSError here
                return img.copy()
        except Exception as err:  # OSError, SyntaxError, ValueError, struct.error, ...
            raise InvalidImageError(
                f"Cannot decode image file {path} (expected a complete, readable image "
                f"file): {type(err).__name__}: {err}") from None


def image_size(path: str | Path, *, max_image_pixels: int | None = None) -> tuple[int, int]:
    """(height, width) of an image file, read from its header only (limit as load_image)."""
    with _open_checked(Path(path), max_image_pixels) as img:
        width, height = img.size
    return height, width


def load_image(path: str | Path, *, channels: int | None = 3,
               max_image_pixels: int | None = None) -> np.ndarray:
    """Decode an image file completely into a uint8 (H, W, C) array.

    Args:
      path: the file.
      channels: 3 converts to RGB (grey replicated, alpha dropped, palette expanded),
        1 converts to grey ("L"), None keeps grey as 1 channel and everything else RGB.
        16-bit and 32-bit integer grey keep their 8 most significant bits of 0..65535.
      max_image_pixels: refuse images declaring more pixels (width x height) than this,
        before decoding. None: $VTADL_MAX_IMAGE_PIXELS if set, else
        :data:`DEFAULT_MAX_IMAGE_PIXELS` (8192 x 8192).
    Raises:
      MissingDataError: the file does not exist.
      ImageTooLargeError: the image declares more than ``max_image_pixels`` pixels.
      InvalidImageError: the file is unreadable, truncated, empty or in a mode that
        cannot be converted.
    """
    if channels not in (1, 3, None):
        raise ValueError(f"channels must be 1, 3 or None, got {channels!r}")
    path = Path(path)
    img = _open_fully(path, max_image_pixels)
    try:
        if img.mode in ("I;16", "I;16B", "I;16L", "I"):
            # 16-bit grey: keep the 8 most significant bits.
            arr16 = np.asarray(img).astype(np.int64).clip(0, 65535)
            img = Image.fromarray((arr16 >> 8).astype(np.uint8))
        if channels is None:
            channels = 1 if img.mode in ("L", "1", "LA") else 3
        if channels == 3:
            arr = np.asarray(img.convert("RGB"), dtype=np.uint8)
        else:
            arr = np.asarray(img.convert("L"), dtype=np.uint8)[..., None]
    except Exception as err:  # an exotic mode PIL cannot convert
        raise InvalidImageError(f"Cannot convert image file {path} (mode {img.mode}) to "
                                f"{'RGB' if channels == 3 else 'grey'}: {err}") from None
    return np.ascontiguousarray(arr)


def load_mask(path: str | Path, *, expected_size: tuple[int, int] | None = None,
              binarize_threshold: int | None = None,
              max_image_pixels: int | None = None) -> np.ndarray:
    """Decode a ground-truth mask into a uint8 (H, W) array with values in {0, 1}.

    Args:
      path: the mask file (any extension PIL reads).
      expected_size: (height, width) the mask must have (its image's size).
      binarize_threshold: None (default) requires values in {0, 255} or {0, 1};
        an integer t accepts any grey mask and returns ``value > t``.
      max_image_pixels: as :func:`load_image`.
    Raises:
      MissingDataError, ImageTooLargeError, InvalidImageError: as :func:`load_image`.
      InvalidMaskError: wrong size, or non-binary values without a threshold.
    """
    path = Path(path)
    img = _open_fully(path, max_image_pixels)
    try:
        arr = np.asarray(img if img.mode in ("I;16", "I;16B", "I;16L", "I", "F")
                         else img.convert("L"))
    except Exception as err:  # an exotic mode PIL cannot convert
        raise InvalidImageError(f"Cannot convert mask file {path} (mode {img.mode}) to "
                                f"grey: {err}") from None
    if arr.ndim != 2:
        raise InvalidMaskError(f"Mask {path} decodes to shape {arr.shape}; expected a "
                               "single-channel (H, W) image")
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
