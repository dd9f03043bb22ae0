"""Datasets for anomaly detection: layouts, TFDS builders, preprocessing, pipelines.

Importing this package registers the TFDS builders ``mvtec_ad``, ``btad``,
``mnist_one_class`` and ``folder`` (TensorFlow is not needed).
"""
from vtadl_jax.data.builders import Btad, Folder, FolderConfig, MvtecAd, folder_config
from vtadl_jax.data.errors import (DatasetError, ImageTooLargeError, InvalidImageError,
                                   InvalidMaskError, MissingDataError)
from vtadl_jax.data.image_files import load_image, load_mask
from vtadl_jax.data.layouts import (BTAD_PRODUCTS, MVTEC_CATEGORIES, Record,
                                    mvtec_categories_present, scan_btad, scan_folder,
                                    scan_mvtec, verify_records)
from vtadl_jax.data.mnist import find_mnist_files, load_mnist, read_idx
from vtadl_jax.data.mnist_builder import MnistOneClass, MnistOneClassConfig, mnist_config
from vtadl_jax.data.pipeline import batches, load_arrays, make_source, num_batches
from vtadl_jax.data.preprocess import PRESETS, Preprocessing, preset
from vtadl_jax.data.sources import Source
from vtadl_jax.data.synthetic import make_synthetic_mvtec

__all__ = [
    "Btad", "Folder", "FolderConfig", "MvtecAd", "folder_config",
    "DatasetError", "ImageTooLargeError", "InvalidImageError", "InvalidMaskError",
    "MissingDataError",
    "load_image", "load_mask",
    "BTAD_PRODUCTS", "MVTEC_CATEGORIES", "Record", "scan_btad", "scan_folder", "scan_mvtec",
    "verify_records", "mvtec_categories_present",
    "find_mnist_files", "load_mnist", "read_idx",
    "MnistOneClass", "MnistOneClassConfig", "mnist_config",
    "batches", "load_arrays", "make_source", "num_batches",
    "PRESETS", "Preprocessing", "preset",
    "Source",
    "make_synthetic_mvtec",
]
