"""Layout readers: list and validate the files of MVTec AD, BTAD and generic folders.

A reader returns, per split, a sorted list of :class:`Record` (image path, mask path
or None, label, defect type, file name relative to the dataset root). Structural
problems are raised while scanning (no pixels read); :func:`verify_records` then
decodes every image and mask fully (truncation, mask size, binary masks). Both run
before any example is written or any training step is taken.

Layouts (folder names are case-sensitive):

- MVTec AD: ``<root>/<category>/train/good/*.png``, ``test/<defect>/*.png``
  (``test/good`` normal), ``ground_truth/<defect>/<stem>_mask.png``.
- BTAD: ``<root>/<01|02|03>/train/ok``, ``test/ok``, ``test/ko``,
  ``ground_truth/ko/<stem>.<any image extension>`` (matched by stem).
- Folder: ``<root>/train/good``, ``test/<kind>`` (``good`` normal),
  ``ground_truth/<kind>/<stem>_mask.<ext>`` or ``<stem>.<ext>``.

Files whose name starts with "." are ignored; any other non-image file inside an
image folder is an error, as is a mask that matches no test image.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

from vtadl_jax.data.errors import DatasetError, MissingDataError
from vtadl_jax.data.image_files import IMAGE_EXTENSIONS, image_size, load_image, load_mask

__all__ = ["MVTEC_CATEGORIES", "BTAD_PRODUCTS", "Record", "scan_mvtec", "scan_btad",
           "scan_folder", "verify_records", "mvtec_categories_present"]

MVTEC_CATEGORIES = ("bottle", "cable", "capsule", "carpet", "grid", "hazelnut",
                    "leather", "metal_nut", "pill", "screw", "tile", "toothbrush",
                    "transistor", "wood", "zipper")
BTAD_PRODUCTS = ("01", "02", "03")


@dataclasses.dataclass(frozen=True)
class Record:
    """One example on disk.

    Attributes:
      image: path of the image file.
      mask: path of the ground-truth mask, None for normal images (all-zero mask).
      label: 0 normal, 1 anomalous.
      defect: the defect-type folder name ("good"/"ok" for normal images).
      filename: image path relative to the dataset root, e.g. "test/crack/000.png".
    """

    image: Path
    mask: Path | None
    label: int
    defect: str
    filename: str


def _require_dir(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise MissingDataError(f"Missing {what}: expected a directory at {path}")
    return path


def _list_images(folder: Path) -> list[Path]:
    """Sorted image files of ``folder``; other visible files or sub-folders raise."""
    images = []
    for entry in sorted(folder.iterdir()):
        if entry.name.startswith("."):
            continue
        if entry.is_file() and entry.suffix.lower() in IMAGE_EXTENSIONS:
            images.append(entry)
        else:
            raise DatasetError(
                f"Unexpected entry {entry} in image folder {folder}: expected only image "
                f"files with extensions {IMAGE_EXTENSIONS}")
    return images


def _subdirs(folder: Path) -> list[Path]:
    """Sorted visible sub-directories; visible plain files raise."""
    dirs = []
    for entry in sorted(folder.iterdir()):
        if entry.name.startswith("."):
            continue
        if not entry.is_dir():
            raise DatasetError(f"Unexpected file {entry}: expected only sub-folders in {folder}")
        dirs.append(entry)
    return dirs


def _train_records(base: Path, normal: str) -> list[Record]:
    train = _require_dir(base / "train", "train split folder")
    extra = [d.name for d in _subdirs(train) if d.name != normal]
    if extra:
        raise DatasetError(f"Unexpected folders {extra} in {train}: training data must "
                           f"contain only normal images in {train / normal}")
    good = _require_dir(train / normal, "folder of normal training images")
    images = _list_images(good)
    if not images:
        raise MissingDataError(f"No training images in {good}: expected at least one "
                               f"image file {IMAGE_EXTENSIONS}")
    return [Record(p, None, 0, normal, p.relative_to(base).as_posix()) for p in images]


def _match_masks(gt_dir: Path, images: list[Path], patterns: tuple[str, ...]) -> list[Path]:
    """For each image the unique mask in ``gt_dir`` named ``pattern.format(stem)``."""
    masks_by_stem: dict[str, list[Path]] = {}
    for mask in _list_images(gt_dir):
        masks_by_stem.setdefault(mask.stem, []).append(mask)
    used: set[str] = set()
    matched = []
    for img in images:
        names = [pat.format(stem=img.stem) for pat in patterns]
        found = [m for n in names for m in masks_by_stem.get(n, [])]
        if not found:
            wanted = " or ".join(f"{n}.<ext>" for n in names)
            raise MissingDataError(f"Missing mask for test image {img}: expected {wanted} "
                                   f"in {gt_dir}")
        if len(found) > 1:
            raise DatasetError(f"Ambiguous masks for test image {img}: "
                               f"{[str(m) for m in found]}")
        used.add(found[0].stem)
        matched.append(found[0])
    orphans = sorted(str(m) for s, ms in masks_by_stem.items() if s not in used for m in ms)
    if orphans:
        raise DatasetError(f"Masks without a test image in {gt_dir}: {orphans[:5]}"
                           f"{' ...' if len(orphans) > 5 else ''}")
    return matched


def _test_records(base: Path, normal: str, patterns: tuple[str, ...],
                  require_masks: bool = True, required_kinds: tuple[str, ...] = ()
                  ) -> list[Record]:
    test = _require_dir(base / "test", "test split folder")
    kinds = _subdirs(test)
    names = [k.name for k in kinds]
    for kind in required_kinds:
        if kind not in names:
            raise MissingDataError(f"Missing test folder {test / kind}")
    if not kinds:
        raise MissingDataError(f"No test folders in {test}: expected test/<kind>/")
    gt_root = base / "ground_truth"
    records: list[Record] = []
    for kind in kinds:
        images = _list_images(kind)
        if not images:
            raise MissingDataError(f"Empty test folder {kind}: expected image files")
        if kind.name == normal:
            records += [Record(p, None, 0, normal, p.relative_to(base).as_posix())
                        for p in images]
            continue
        gt_dir = gt_root / kind.name
        if gt_dir.is_dir():
            masks: list[Path | None] = list(_match_masks(gt_dir, images, patterns))
        elif require_masks:
            raise MissingDataError(f"Missing ground-truth folder {gt_dir} for the test "
                                   f"images in {kind}")
        else:
            masks = [None] * len(images)
        records += [Record(p, m, 1, kind.name, p.relative_to(base).as_posix())
                    for p, m in zip(images, masks)]
    if gt_root.is_dir():
        stray = [d for d in _subdirs(gt_root) if d.name not in names or d.name == normal]
        if stray:
            raise DatasetError(f"Ground-truth folders without anomalous test images: "
                               f"{[str(d) for d in stray]}")
    return records


def scan_mvtec(root: str | Path, category: str) -> dict[str, list[Record]]:
    """List the "train" and "test" records of one MVTec AD category (sorted)."""
    root = _require_dir(Path(root).expanduser(), "MVTec AD root folder")
    if category not in MVTEC_CATEGORIES:
        raise DatasetError(f"Unknown MVTec AD category {category!r}; expected one of "
                           f"{MVTEC_CATEGORIES}")
    base = root / category
    if not base.is_dir():
        present = sorted(d.name for d in root.iterdir() if d.is_dir())
        raise MissingDataError(f"Missing category folder {base} (found: {present}); "
                               f"expected <root>/<category>/train/good, test/, ground_truth/")
    return {"train": _train_records(base, "good"),
            "test": _test_records(base, "good", ("{stem}_mask",),
                                  required_kinds=("good",))}


def mvtec_categories_present(root: str | Path, categories: tuple[str, ...] | list[str]
                             | None = None) -> tuple[list[str], list[str]]:
    """(present, missing) among `categories` (default: all 15) under an MVTec AD root.

    A category is present when ``<root>/<category>/train/good`` is a folder (a root
    holding only some categories, e.g. a partial download, is fine); the
    ``mvtec_anomaly_detection/`` child accepted by the TFDS builder is looked into too.
    Raises MissingDataError when `root` is not a folder or holds none of them, and
    DatasetError for a name that is not an MVTec AD category.
    """
    base = _require_dir(Path(root).expanduser(), "MVTec AD root folder")
    wanted = list(categories) if categories else list(MVTEC_CATEGORIES)
    unknown = [c for c in wanted if c not in MVTEC_CATEGORIES]
    if unknown:
        raise DatasetError(f"Unknown MVTec AD categories {unknown}; expected some of "
                           f"{MVTEC_CATEGORIES}")
    if not any((base / c / "train" / "good").is_dir() for c in wanted) and (
            base / "mvtec_anomaly_detection").is_dir():
        base = base / "mvtec_anomaly_detection"
    present = [c for c in wanted if (base / c / "train" / "good").is_dir()]
    if not present:
        raise MissingDataError(
            f"No MVTec AD category folder in {base}: expected <root>/<category>/train/good "
            f"for at least one of {wanted}")
    return present, [c for c in wanted if c not in present]


def scan_btad(root: str | Path, product: str) -> dict[str, list[Record]]:
    """List the "train" and "test" records of one BTAD product ("01", "02", "03")."""
    root = _require_dir(Path(root).expanduser(), "BTAD root folder")
    if product not in BTAD_PRODUCTS:
        raise DatasetError(f"Unknown BTAD product {product!r}; expected one of {BTAD_PRODUCTS}")
    base = _require_dir(root / product, "BTAD product folder")
    test = _require_dir(base / "test", "test split folder")
    extra = [d.name for d in _subdirs(test) if d.name not in ("ok", "ko")]
    if extra:
        raise DatasetError(f"Unexpected folders {extra} in {test}: expected ok/ and ko/")
    return {"train": _train_records(base, "ok"),
            "test": _test_records(base, "ok", ("{stem}",), required_kinds=("ok", "ko"))}


def scan_folder(root: str | Path, *, require_masks: bool = True) -> dict[str, list[Record]]:
    """List a generic folder in the MVTec layout (``train/good``, ``test/<kind>``).

    Masks may be named ``<stem>_mask.<ext>`` or ``<stem>.<ext>``. With
    ``require_masks=False`` an anomalous kind without a ``ground_truth/<kind>`` folder
    is accepted and its masks are all zero (image-level labels only).
    """
    base = _require_dir(Path(root).expanduser(), "dataset folder")
    return {"train": _train_records(base, "good"),
            "test": _test_records(base, "good", ("{stem}_mask", "{stem}"),
                                  require_masks=require_masks)}


def verify_records(records: list[Record], *, binarize_threshold: int | None = None) -> None:
    """Decode every image and mask fully; raise on truncation, size or value problems."""
    for rec in records:
        load_image(rec.image, channels=None)
        if rec.mask is not None:
            load_mask(rec.mask, expected_size=image_size(rec.image),
                      binarize_threshold=binarize_threshold)
