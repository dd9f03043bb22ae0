"""TFDS builders for MVTec AD, BTAD and generic MVTec-layout folders.

They work without TensorFlow: build with ``file_format="array_record"`` (the default
here) and read with ``builder.as_data_source(split)``. Images are decoded with PIL and
re-encoded as PNG bytes, so the stored data is lossless whatever the source format
(BMP for BTAD). Every example (train and test) has the features

- ``image``: uint8 (H, W, 3), RGB (grey sources replicated to 3 channels);
- ``mask``: uint8 (H, W, 1), 0 or 255 (all zero for normal images);
- ``label``: 0 normal, 1 anomalous;
- ``defect``: the defect-type folder name ("good"/"ok" for normal images);
- ``filename``: the image path relative to the category/product folder.

Examples are stored in sorted file order (``disable_shuffling=True``). The whole
split is verified (layout, complete decodes, mask sizes, binary masks) before the
first example is written; see :mod:`vtadl_jax.data.layouts`.
"""
from __future__ import annotations

import dataclasses
import hashlib
import inspect
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from etils import epath

from vtadl_jax.data.errors import MissingDataError
from vtadl_jax.data.image_files import encode_png, load_image, load_mask
from vtadl_jax.data.layouts import (BTAD_PRODUCTS, MVTEC_CATEGORIES, Record, scan_btad,
                                    scan_folder, scan_mvtec, verify_records)

__all__ = ["anomaly_features", "LocalCodePath", "AnomalyBuilder", "MvtecAd", "Btad", "Folder",
           "FolderConfig", "folder_config"]

_VERSION = tfds.core.Version("1.0.0")


def anomaly_features(channels: int = 3) -> tfds.features.FeaturesDict:
    """The feature dictionary shared by all anomaly-detection builders."""
    return tfds.features.FeaturesDict({
        "image": tfds.features.Image(shape=(None, None, channels), encoding_format="png"),
        "mask": tfds.features.Image(shape=(None, None, 1), encoding_format="png"),
        "label": tfds.features.ClassLabel(names=["normal", "anomalous"]),
        "defect": tfds.features.Text(),
        "filename": tfds.features.Text(),
    })


def record_example(rec: Record, binarize_threshold: int | None) -> dict[str, Any]:
    """Encode one :class:`Record` as a TFDS example dictionary."""
    image = load_image(rec.image, channels=3)
    if rec.mask is None:
        mask = np.zeros(image.shape[:2], np.uint8)
    else:
        mask = load_mask(rec.mask, expected_size=image.shape[:2],
                         binarize_threshold=binarize_threshold)
    return {"image": encode_png(image), "mask": encode_png(mask * np.uint8(255)),
            "label": rec.label, "defect": rec.defect, "filename": rec.filename}


class LocalCodePath:
    """Mixin: resolve a builder's ``code_path`` from its source file.

    TFDS's default resolution goes through ``importlib_resources`` for packages that
    are not plain directories (e.g. editable installs), which is not installed here.
    """

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path | None:
        try:
            return epath.Path(inspect.getfile(cls))
        except (TypeError, OSError):
            return None


class AnomalyBuilder(LocalCodePath, tfds.core.GeneratorBasedBuilder,
                     skip_registration=True):
    """Shared logic: scan + verify a layout, then write its records."""

    VERSION = _VERSION
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    _DESCRIPTION = ""
    _HOMEPAGE = ""

    def __init__(self, *, binarize_threshold: int | None = None,
                 file_format: str = "array_record", **kwargs: Any) -> None:
        """Args: binarize_threshold (see image_files.load_mask), TFDS builder kwargs."""
        self._binarize_threshold = binarize_threshold
        super().__init__(file_format=file_format, **kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(builder=self, description=self._DESCRIPTION,
                                     features=anomaly_features(3), homepage=self._HOMEPAGE,
                                     disable_shuffling=True)

    def _scan(self, dl_manager: tfds.download.DownloadManager) -> dict[str, list[Record]]:
        raise NotImplementedError

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        splits = self._scan(dl_manager)
        for records in splits.values():
            verify_records(records, binarize_threshold=self._binarize_threshold)
        return {name: self._generate_examples(records) for name, records in splits.items()}

    def _generate_examples(self, records: list[Record]) -> Iterator[tuple[str, dict]]:
        for rec in records:
            yield rec.filename, record_example(rec, self._binarize_threshold)


def _manual_root(dl_manager: tfds.download.DownloadManager, name: str, sub: str,
                 alternative: str) -> Path:
    """The manual directory, or its ``alternative`` child when that holds ``sub``."""
    try:
        root = Path(dl_manager.manual_dir)
    except AssertionError as err:  # TFDS signals a missing manual dir this way
        raise MissingDataError(f"{name}: {err}") from err
    if not (root / sub).is_dir() and (root / alternative / sub).is_dir():
        return root / alternative
    return root


class MvtecAd(AnomalyBuilder):
    """MVTec AD, one config per category. Manual download (see instructions)."""

    BUILDER_CONFIGS = [tfds.core.BuilderConfig(name=c, description=f"MVTec AD {c}")
                       for c in MVTEC_CATEGORIES]
    _DESCRIPTION = "MVTec AD: 15 categories of industrial images with pixel-level defects."
    _HOMEPAGE = "https://www.mvtec.com/company/research/datasets/mvtec-ad"
    MANUAL_DOWNLOAD_INSTRUCTIONS = """\
    Download mvtec_anomaly_detection.tar.xz from
    https://www.mvtec.com/company/research/datasets/mvtec-ad (registration required),
    extract it, and pass the extracted folder as the manual directory, e.g.
    `download_config=tfds.download.DownloadConfig(manual_dir="/data/mvtec_ad")`. It must
    contain one folder per category: <manual_dir>/<category>/train/good/*.png,
    test/<defect>/*.png and ground_truth/<defect>/<stem>_mask.png (a child folder named
    mvtec_anomaly_detection/ holding the categories is also accepted).
    """

    def _scan(self, dl_manager):
        category = self.builder_config.name
        root = _manual_root(dl_manager, "MVTec AD", category, "mvtec_anomaly_detection")
        return scan_mvtec(root, category)


class Btad(AnomalyBuilder):
    """BTAD (beanTech Anomaly Detection), configs "01", "02", "03". Manual download."""

    BUILDER_CONFIGS = [tfds.core.BuilderConfig(name=p, description=f"BTAD product {p}")
                       for p in BTAD_PRODUCTS]
    _DESCRIPTION = "BTAD: three industrial products with pixel-level defect masks."
    _HOMEPAGE = "https://github.com/pankajmishra000/VT-ADL"
    MANUAL_DOWNLOAD_INSTRUCTIONS = """\
    Download BTAD (BTech_Dataset_transformed.zip, linked from the VT-ADL repository),
    extract it, and pass the folder that contains 01/, 02/ and 03/ as the manual
    directory (its parent holding BTech_Dataset_transformed/ is also accepted). Each
    product needs train/ok, test/ok, test/ko and ground_truth/ko; a mask has the same
    stem as its image, with any image extension (.png or .bmp).
    """

    def _scan(self, dl_manager):
        product = self.builder_config.name
        root = _manual_root(dl_manager, "BTAD", product, "BTech_Dataset_transformed")
        return scan_btad(root, product)


@dataclasses.dataclass
class FolderConfig(tfds.core.BuilderConfig):
    """Config of :class:`Folder`: the dataset directory and the mask policy."""

    root: str = ""
    require_masks: bool = True


def _fingerprint(root: Path) -> str:
    """Hash of the resolved root and every file's relative name, size and mtime."""
    digest = hashlib.sha256(str(root.resolve()).encode())
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        stat = path.stat()
        digest.update(f"{path.relative_to(root).as_posix()}|{stat.st_size}|"
                      f"{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


def folder_config(root: str | Path, *, require_masks: bool = True) -> FolderConfig:
    """A :class:`FolderConfig` whose name changes whenever the folder's files change,
    so a cached build is never reused for different data."""
    path = Path(root).expanduser()
    if not path.is_dir():
        raise MissingDataError(f"Dataset folder not found: {path}")
    return FolderConfig(name=f"{path.name}_{_fingerprint(path)}"[-64:],
                        root=str(path.resolve()), require_masks=require_masks,
                        description=f"Folder dataset at {path.resolve()}")


class Folder(AnomalyBuilder):
    """A directory in the MVTec layout; build with ``config=folder_config(root)``."""

    _DESCRIPTION = "A generic anomaly-detection folder in the MVTec AD layout."

    def _scan(self, dl_manager):
        config = self.builder_config
        if not isinstance(config, FolderConfig) or not config.root:
            raise MissingDataError("Folder builder needs config=folder_config(<root>)")
        return scan_folder(config.root, require_masks=config.require_masks)
