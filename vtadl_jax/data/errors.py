"""Errors raised by the data package.

Every error names the offending path and what was expected, and is raised while a
dataset is scanned, verified or built, i.e. before any training step runs.
"""
from __future__ import annotations

__all__ = ["DatasetError", "MissingDataError", "InvalidImageError", "ImageTooLargeError",
           "InvalidMaskError"]


class DatasetError(ValueError):
    """Base class: the data on disk does not match what the reader expects."""


class MissingDataError(DatasetError, FileNotFoundError):
    """A required folder or file is missing, or a required folder is empty."""


class InvalidImageError(DatasetError):
    """An image file cannot be decoded completely (unreadable or truncated)."""


class ImageTooLargeError(InvalidImageError):
    """An image declares more pixels than the limit (a decompression bomb, or a genuinely
    huge image: raise the limit with ``max_image_pixels=`` or VTADL_MAX_IMAGE_PIXELS)."""


class InvalidMaskError(DatasetError):
    """A ground-truth mask has the wrong size or is not binary."""
