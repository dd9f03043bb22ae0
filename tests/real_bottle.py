"""The real MVTec AD bottle category for tests: where it is, an independent listing of its
files, and fixed small subsets copied into a temporary folder in the MVTec layout.

The data (CC BY-NC-SA 4.0) is not in the repository. It is looked for in
`$MVTEC_AD_ROOT` (the folder holding `bottle/`), else in `../shared/data/mvtec_ad`
beside the repository root (where CI clones `shared/`). Tests that need it call
`require_bottle()`, which skips them with the reason when it is absent.

    from real_bottle import require_bottle, copy_subset
    root = require_bottle()                                   # skips if absent
    sub = copy_subset(root, tmp_path / "mvtec", num_train=16, per_kind={"good": 3})
    # sub / "bottle" / {train/good, test/<kind>, ground_truth/<kind>} with the chosen files

`list_files` reads the folder with `os` only (no library code), so tests can compare
the library's readers against it.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
CATEGORY = "bottle"
# The published bottle split (MVTec AD, Bergmann et al. CVPR 2019 / IJCV 2021).
NUM_TRAIN, NUM_TEST, NUM_MASKS = 209, 83, 63
DEFECT_COUNTS = {"broken_large": 20, "broken_small": 22, "contamination": 21, "good": 20}


def bottle_root() -> Path | None:
    """The MVTec AD root holding `bottle/`, or None when the data is not here."""
    env = os.environ.get("MVTEC_AD_ROOT")
    candidates = [Path(env)] if env else []
    candidates.append(REPO.parent / "shared" / "data" / "mvtec_ad")
    for root in candidates:
        if (root / CATEGORY / "train" / "good").is_dir():
            return root
    return None


def require_bottle() -> Path:
    """The root, or skip the calling test with the places that were looked in."""
    root = bottle_root()
    if root is None:
        pytest.skip("real MVTec AD bottle not found: set MVTEC_AD_ROOT=<folder holding "
                    f"bottle/> or put it at {REPO.parent / 'shared/data/mvtec_ad/bottle'}")
    return root


def list_files(root: Path | str) -> dict:
    """Independent listing with `os`: {"train": [names], "test": {kind: [names]},
    "masks": {kind: [names]}} (sorted file names, hidden files skipped)."""
    base = Path(root) / CATEGORY

    def names(folder: Path) -> list[str]:
        return sorted(n for n in os.listdir(folder) if not n.startswith("."))

    test = {k: names(base / "test" / k) for k in names(base / "test")}
    masks = {k: names(base / "ground_truth" / k) for k in names(base / "ground_truth")}
    return {"train": names(base / "train" / "good"), "test": test, "masks": masks}


def _spread(items: list[str], count: int) -> list[str]:
    """`count` items evenly spaced over the sorted list (deterministic)."""
    if count >= len(items):
        return list(items)
    step = len(items) / count
    return [items[int(i * step)] for i in range(count)]


def copy_subset(root: Path | str, dest: Path | str, *, num_train: int,
                per_kind: dict[str, int]) -> Path:
    """Copy a FIXED subset of bottle into `dest/bottle` in the MVTec layout.

    Args:
      root: the MVTec AD root holding `bottle/` (from `require_bottle()`).
      dest: a new folder (e.g. under pytest's tmp_path); returned, usable as data.root.
      num_train: training images, evenly spaced over the sorted `train/good` names.
      per_kind: test images per kind, e.g. {"good": 3, "broken_large": 3, ...}, evenly
        spaced over each kind's sorted names; kinds left out are not copied. Each
        defect image's mask is copied with it.
    """
    src, out = Path(root) / CATEGORY, Path(dest) / CATEGORY
    files = list_files(root)
    unknown = sorted(set(per_kind) - set(files["test"]))
    if unknown:
        raise ValueError(f"per_kind: no test kinds {unknown} in {src / 'test'}")
    (out / "train" / "good").mkdir(parents=True)
    for name in _spread(files["train"], num_train):
        shutil.copyfile(src / "train" / "good" / name, out / "train" / "good" / name)
    for kind, count in per_kind.items():
        (out / "test" / kind).mkdir(parents=True)
        if kind != "good":
            (out / "ground_truth" / kind).mkdir(parents=True)
        for name in _spread(files["test"][kind], count):
            shutil.copyfile(src / "test" / kind / name, out / "test" / kind / name)
            if kind != "good":
                mask = f"{Path(name).stem}_mask.png"
                shutil.copyfile(src / "ground_truth" / kind / mask,
                                out / "ground_truth" / kind / mask)
    return Path(dest)
