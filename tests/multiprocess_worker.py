"""One process of the multi-process test (tests/test_multiprocess.py).

    python tests/multiprocess_worker.py --mode {multi,single} --out OUT.npz --workdir DIR
        [--pg-root ROOT --pg-workdir DIR]
        [--coordinator 127.0.0.1:PORT --process-id I --num-processes N]

"multi": one of N processes joined with ``jax.distributed.initialize`` (JAX's own
multi-controller runtime, gloo CPU collectives), 4 host CPU devices each. "single": the
reference, one process with 8 host CPU devices (the test computes it in-process with
the same functions). Both train the tiny VT-ADL config a few
steps with ``vtadl_jax.train.loop.train`` (each process reads its own rows of every
global batch from the data layer) and fit streaming patch Gaussians on the same features
(each process folds its own rows, then the statistics are merged across processes).
Process 0 (or the single process) writes losses, parameters and statistics to OUT.npz.
With ``--pg-root`` every process also runs the patch-Gaussian pipeline's
``fit_from_config`` on that generated MVTec-layout category (each process fits its share
of the images; process 0 writes ``--pg-workdir``).
The device count comes from XLA_FLAGS, set by the caller before JAX starts.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

NUM_STEPS = 3
NUM_IMAGES = 32
GRID, CHANNELS, FEATURE_BATCH = (4, 4), 6, 8


class ArraySource:
    """The smallest random-access source ``vtadl_jax.data.batches`` reads."""

    name, split = "multiprocess-test", "train"

    def __init__(self, images: np.ndarray):
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict:
        return {"image": self.images[i]}


def images() -> np.ndarray:
    """NUM_IMAGES smooth 32x32x3 images in [-1, 1] (the same in every process)."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:32, 0:32] / 31.0
    cy, cx = rng.uniform(0.3, 0.7, (2, NUM_IMAGES, 1, 1))
    disc = ((yy - cy) ** 2 + (xx - cx) ** 2 < 0.04).astype(np.float32)
    col = rng.uniform(-0.6, 0.6, (NUM_IMAGES, 1, 1, 3))
    return np.clip(0.5 * (xx - yy)[None, ..., None] + col + 0.6 * disc[..., None],
                   -1, 1).astype(np.float32)


def features() -> np.ndarray:
    """(N, h, w, C) feature maps with a large common offset (float32-hard statistics)."""
    rng = np.random.default_rng(1)
    return (50.0 + rng.normal(size=(NUM_IMAGES, *GRID, CHANNELS))).astype(np.float32)


def train_tiny(workdir: str) -> tuple[np.ndarray, dict]:
    import json

    from vtadl_jax.configs import load_config
    from vtadl_jax.train.loop import train

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    config = load_config(os.path.join(root, "experiments", "configs", "vtadl_tiny.py"), [])
    config.num_steps = NUM_STEPS
    config.checkpoint.every_steps = NUM_STEPS
    state, _ = train(config, workdir, ArraySource(images()))
    losses = None
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "metrics.jsonl")) as f:
            losses = np.array([json.loads(ln)["loss"] for ln in f if ln.strip()])
    # Replicated state: every process holds a full copy on each of its devices.
    params = jax.tree.map(lambda x: np.asarray(x.addressable_data(0)), state.params)
    return losses, params


def fit_gaussians() -> dict:
    from vtadl_jax.data import batches
    from vtadl_jax.methods import patch_gaussian as pg

    stream = batches(ArraySource(features()), FEATURE_BATCH, shuffle=False, epochs=1,
                     process_index=jax.process_index(), process_count=jax.process_count())
    local, _ = pg.fit_statistics((b["image"] for b in stream), shard_positions=True)
    merged = pg.merge_across_processes(local)
    return {f"stats_{k}": np.asarray(v) for k, v in merged._asdict().items()}


PG_TRAIN_IMAGES, PG_SIZE, PG_BATCH = 7, 64, 2  # 7 over 2 processes: shares of 3 and 4


def pg_config(root: str, data_dir: str):
    """The TFDS backend into `data_dir` (shared by the processes: process 0 builds it)."""
    from vtadl_jax.configs import load_config

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = os.path.join(repo, "experiments", "configs", "patch_gaussian_synthetic.py")
    return load_config(path + ":object", [f"data.root={root}", "data.backend=tfds",
                                          f"data.data_dir={data_dir}",
                                          f"data.image_size={PG_SIZE}",
                                          f"batch_size={PG_BATCH}",
                                          "gaussian.channel_subset=4"])


def fit_pipeline(root: str, workdir: str) -> None:
    """Fit into `workdir` (TFDS data in `workdir`.tfds); then a fit on a missing folder,
    whose error (process 0: the data's; the others: process 0's, passed on) is written
    to `workdir`.error<process index>."""
    from vtadl_jax.pipelines import patch_gaussian as pgp

    pgp.fit_from_config(pg_config(root, workdir + ".tfds"), workdir)
    try:
        pgp.fit_from_config(pg_config(root + ".missing", workdir + ".tfds"),
                            workdir + ".never")
        outcome = "no error"
    except Exception as err:  # noqa: BLE001 - recorded for the test to check
        outcome = f"{type(err).__name__}: {err}"
    with open(f"{workdir}.error{jax.process_index()}", "w") as f:
        f.write(outcome)
    evaluate_pipeline(root, workdir)


def evaluate_pipeline(root: str, workdir: str) -> None:
    """Score the test split (every process its share; process 0 saves all rows to
    `workdir`.scores.npz), evaluate (`workdir`.eval<process index>: the metrics, null on
    the others) and predict the test image files into `workdir`.pred (`workdir`.pred<process
    index>: the number of rows returned, null on the others). Several processes: a share
    that fails on process 1 must stop process 0 at once (`workdir`.gather<process index>:
    the outcome), and one that fails on process 0 must stop process 1, which deletes its
    share (`workdir`.gather0fails<process index>)."""
    import json

    from vtadl_jax.pipelines import patch_gaussian as pgp

    out = pgp.score_test_split(workdir)
    if out is not None:
        np.savez(workdir + ".scores.npz", maps=out["maps"], scores=out["scores"],
                 labels=out["labels"], filenames=out["filenames"].astype(str))
    result = pgp.evaluate_workdir(workdir)
    # when evaluate returns on any process, process 0 has written the report
    written = os.path.exists(os.path.join(workdir, "eval", "metrics.json"))
    with open(f"{workdir}.eval{jax.process_index()}", "w") as f:
        json.dump({"result": result, "report_written": written}, f)
    # `vtadl-jax predict` on the test images: every process its share of the files
    rows = pgp.predict_files(workdir, [os.path.join(root, "test")], workdir + ".pred")
    with open(f"{workdir}.pred{jax.process_index()}", "w") as f:
        json.dump(None if rows is None else len(rows), f)
    # `vtadl-jax calibrate --normal-dir` on the training images: shares, process 0 saves
    t = pgp.calibrate_workdir(workdir, normal=[os.path.join(root, "train")], fpr=0.2)
    with open(f"{workdir}.calib{jax.process_index()}", "w") as f:
        json.dump(None if t is None else t.to_json(), f)
    if jax.process_count() == 1:
        return

    os.makedirs(workdir + ".gather", exist_ok=True)
    # process 1 fails first: process 0 must not wait for a timeout
    _failing_gather(workdir, failing=1, name="broken", record="gather")
    # process 1 writes its share after process 0 has failed, then must delete it
    _failing_gather(workdir, failing=0, name="broken0", record="gather0fails")


def _failing_gather(workdir: str, *, failing: int, name: str, record: str) -> None:
    """A gather whose share fails on process ``failing`` (the other one finishes a second
    later); `workdir`.<record><process index>: the outcome and how long it took."""
    import json

    from vtadl_jax import multihost

    def local():
        if jax.process_index() == failing:
            raise ValueError(f"process {failing}'s share is broken")
        time.sleep(1)
        return {"x": np.arange(2)}

    start = time.perf_counter()
    try:
        multihost.gather_to_process_0(local, workdir + ".gather", name, timeout_s=120)
        outcome = "no error"
    except Exception as err:  # noqa: BLE001 - recorded for the test to check
        outcome = f"{type(err).__name__}: {err}"
    with open(f"{workdir}.{record}{jax.process_index()}", "w") as f:
        json.dump({"outcome": outcome, "seconds": time.perf_counter() - start}, f)


def results(losses: np.ndarray, params: dict, stats: dict) -> dict[str, np.ndarray]:
    """One flat dict of arrays (what process 0 saves)."""
    flat = {"param/" + jax.tree_util.keystr(path): leaf
            for path, leaf in jax.tree_util.tree_leaves_with_path(params)}
    return {"losses": losses, "device_count": np.asarray(jax.device_count()),
            "process_count": np.asarray(jax.process_count()), **flat, **stats}


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--mode", choices=["multi", "single"], default="multi")
    p.add_argument("--out", required=True)
    p.add_argument("--workdir", required=True)
    p.add_argument("--pg-root")
    p.add_argument("--pg-workdir")
    p.add_argument("--coordinator")
    p.add_argument("--process-id", type=int, default=0)
    p.add_argument("--num-processes", type=int, default=1)
    args = p.parse_args()
    if args.mode == "multi":  # joined as `vtadl-jax train/fit` join: from the environment
        from vtadl_jax import multihost

        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        os.environ.update(JAX_COORDINATOR_ADDRESS=args.coordinator,
                          JAX_NUM_PROCESSES=str(args.num_processes),
                          JAX_PROCESS_ID=str(args.process_id))
        multihost.maybe_initialize_distributed({})
        assert jax.distributed.is_initialized()
    print(f"process {jax.process_index()}/{jax.process_count()}: "
          f"{jax.local_device_count()} local / {jax.device_count()} devices", flush=True)
    t0 = time.perf_counter()
    losses, params = train_tiny(args.workdir)
    t1 = time.perf_counter()
    stats = fit_gaussians()
    t2 = time.perf_counter()
    if args.pg_root:
        fit_pipeline(args.pg_root, args.pg_workdir)
    print(f"train {t1 - t0:.1f} s, fit {t2 - t1:.1f} s, pipeline fit "
          f"{time.perf_counter() - t2:.1f} s", flush=True)
    if jax.process_index() == 0:
        np.savez(args.out, **results(losses, params, stats))
    if args.mode == "multi":
        jax.distributed.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
