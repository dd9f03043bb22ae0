"""Multi-process data parallelism with JAX's own runtime (``jax.distributed``).

Two processes on this machine (coordinator 127.0.0.1, gloo CPU collectives, 4 host
devices each, process ids 0 and 1) train the tiny VT-ADL config for a few steps and fit
streaming patch Gaussians; the test process itself (one process, the 8 host devices of
conftest.py) does the same with the same functions. Losses, parameters and the merged
Gaussian statistics must agree. The two processes run ``tests/multiprocess_worker.py``
with ``sys.executable``; both have a deadline and both are killed if either fails.
"""
from __future__ import annotations

import json
import os
import pathlib
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import multiprocess_worker as worker  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "multiprocess_worker.py"
# Two processes compile and train on a shared 2-core CI machine: ~40 s unloaded.
TIMEOUT_S = 240


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(num_devices: int) -> dict:
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={num_devices}"
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    for key in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        env.pop(key, None)
    return env


def _start(args: list[str], num_devices: int, log: pathlib.Path) -> subprocess.Popen:
    out = open(log, "w")
    return subprocess.Popen([sys.executable, str(WORKER), *args], env=_env(num_devices),
                            stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)


def _wait_all(procs: dict[str, subprocess.Popen], logs: dict[str, pathlib.Path]) -> None:
    """Wait for every process; on a failure or the deadline kill them all and report."""
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while any(p.poll() is None for p in procs.values()):
            failed = [n for n, p in procs.items() if p.returncode not in (None, 0)]
            if failed or time.monotonic() > deadline:
                break
            time.sleep(0.2)
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
                p.wait()
    bad = {n: p.returncode for n, p in procs.items() if p.returncode != 0}
    if bad:
        text = "\n".join(f"--- {n} (exit {bad[n]}):\n{logs[n].read_text()[-3000:]}"
                         for n in bad)
        pytest.fail(f"worker(s) failed or timed out after {TIMEOUT_S} s:\n{text}")


def _outcomes(stem: pathlib.Path) -> tuple[dict, dict]:
    """What processes 0 and 1 recorded (`multiprocess_worker._failing_gather`)."""
    return tuple(json.loads(pathlib.Path(f"{stem}{i}").read_text()) for i in (0, 1))


def test_two_processes_equal_one_process(tmp_path):
    from vtadl_jax import data as data_lib

    data_lib.make_synthetic_mvtec(tmp_path / "syn", categories=("object",),
                                  num_train=worker.PG_TRAIN_IMAGES, num_test_good=2,
                                  num_test_defect=1, image_size=worker.PG_SIZE)
    pg_root = str(tmp_path / "syn" / "object")
    port = _free_port()
    procs, logs = {}, {}
    for pid in (0, 1):
        name = f"process{pid}"
        logs[name] = tmp_path / f"{name}.log"
        procs[name] = _start(["--mode", "multi", "--out", str(tmp_path / "multi.npz"),
                              "--workdir", str(tmp_path / "multi"),
                              "--pg-root", pg_root, "--pg-workdir", str(tmp_path / "pg_multi"),
                              "--coordinator", f"127.0.0.1:{port}", "--process-id", str(pid),
                              "--num-processes", "2"], 4, logs[name])
    try:  # the one-process reference, here, while the two workers run
        import jax

        assert jax.device_count() == 8 and jax.process_count() == 1
        single = worker.results(*worker.train_tiny(str(tmp_path / "single")),
                                worker.fit_gaussians())
        worker.fit_pipeline(pg_root, str(tmp_path / "pg_single"))
    finally:
        _wait_all(procs, logs)
    multi = np.load(tmp_path / "multi.npz")
    assert int(multi["process_count"]) == 2 and int(single["process_count"]) == 1
    assert int(multi["device_count"]) == int(single["device_count"]) == 8
    assert sorted(multi.files) == sorted(single)
    assert len(single["losses"]) == 3 and np.all(np.isfinite(single["losses"]))
    np.testing.assert_allclose(multi["losses"], single["losses"], rtol=1e-5)
    params = [k for k in single if k.startswith("param/")]
    assert len(params) > 10
    # Biases in front of BatchNorm have a zero true gradient, so Adam (lr 1e-3) turns
    # rounding noise (the reduction order differs across processes) into steps of up to
    # lr: 1e-4 allows that, not a wrong split of the batch (every parameter off by ~lr).
    for key in params:
        np.testing.assert_allclose(multi[key], single[key], rtol=1e-4, atol=1e-4, err_msg=key)
    assert float(multi["stats_count"]) == float(single["stats_count"]) == 32
    np.testing.assert_allclose(multi["stats_mean"], single["stats_mean"], rtol=1e-6)
    np.testing.assert_allclose(multi["stats_m2"], single["stats_m2"], rtol=1e-4, atol=1e-3)

    # `vtadl-jax fit` over 2 processes: each fitted its share (3 and 4 of the 7 images),
    # process 0 alone wrote the work directory; the model equals the one-process fit.
    from vtadl_jax.pipelines import patch_gaussian as pgp

    one, _ = pgp.load_model(str(tmp_path / "pg_single"))
    two, _ = pgp.load_model(str(tmp_path / "pg_multi"))
    assert one.num_images == two.num_images == worker.PG_TRAIN_IMAGES
    assert one.grid == two.grid and one.spec == two.spec
    np.testing.assert_allclose(np.asarray(two.mean), np.asarray(one.mean), rtol=1e-5, atol=1e-5)
    # 4 channels (config gaussian.channel_subset) from 7 images: a well-conditioned
    # covariance, so the factors themselves are compared.
    assert one.mean.shape[-1] == 4
    np.testing.assert_allclose(np.asarray(two.chol), np.asarray(one.chol), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(two.whiten), np.asarray(one.whiten),
                               rtol=1e-4, atol=1e-5)
    spec = json.loads((tmp_path / "pg_multi" / "model_spec.json").read_text())
    assert spec["processes"] == 2
    assert sorted(p.name for p in (tmp_path / "pg_multi").iterdir()) == sorted(
        p.name for p in (tmp_path / "pg_single").iterdir())
    assert "fit: features (process 1/2)" in logs["process1"].read_text()
    # Both processes read one TFDS directory that process 0 alone built.
    assert (tmp_path / "pg_multi.tfds").is_dir()
    # A data error on process 0 reaches process 1 at once (not after a timeout).
    assert (tmp_path / "pg_multi.error0").read_text().startswith("MissingDataError")
    err1 = (tmp_path / "pg_multi.error1").read_text()
    assert err1.startswith("PeerProcessError") and "MissingDataError" in err1
    assert not (tmp_path / "pg_multi.never").exists()

    # `vtadl-jax evaluate` over 2 processes: each scored its share of the 5 test images,
    # process 0 got every row in order and alone wrote the report; equal to one process.
    one = np.load(tmp_path / "pg_single.scores.npz")
    two = np.load(tmp_path / "pg_multi.scores.npz")
    assert len(one["scores"]) == 5 and list(two["filenames"]) == list(one["filenames"])
    np.testing.assert_array_equal(two["labels"], one["labels"])
    np.testing.assert_allclose(two["scores"], one["scores"], rtol=1e-5)
    np.testing.assert_allclose(two["maps"], one["maps"], rtol=1e-5, atol=1e-5)
    m1 = json.loads((tmp_path / "pg_single.eval0").read_text())["result"]
    m2 = json.loads((tmp_path / "pg_multi.eval0").read_text())["result"]
    e1 = json.loads((tmp_path / "pg_multi.eval1").read_text())
    # process 1 gets None, and only once process 0 has written the report (a predict
    # right after, on process 1, used to miss the thresholds the report stores)
    assert e1 == {"result": None, "report_written": True}
    for key in ("num_images", "num_anomalous", "image_auroc", "pixel_auroc", "aupro"):
        assert m2[key] == pytest.approx(m1[key], rel=1e-6), key
    assert sorted(p.name for p in (tmp_path / "pg_multi" / "eval").iterdir()) == sorted(
        p.name for p in (tmp_path / "pg_single" / "eval").iterdir())  # no share left behind
    assert "evaluate (process 1/2)" in logs["process1"].read_text()
    # `vtadl-jax predict` over 2 processes: each wrote its files' PNGs, process 0 the tables.
    assert json.loads((tmp_path / "pg_multi.pred1").read_text()) is None
    assert json.loads((tmp_path / "pg_multi.pred0").read_text()) == 5
    p1 = json.loads((tmp_path / "pg_single.pred" / "predictions.json").read_text())["images"]
    p2 = json.loads((tmp_path / "pg_multi.pred" / "predictions.json").read_text())["images"]
    assert [r["name"] for r in p2] == [r["name"] for r in p1] and len(p1) == 5
    np.testing.assert_allclose([r["score"] for r in p2], [r["score"] for r in p1], rtol=1e-5)
    assert sorted(p.name for p in (tmp_path / "pg_multi.pred").iterdir()) == sorted(
        p.name for p in (tmp_path / "pg_single.pred").iterdir())  # every PNG, no share file
    # `vtadl-jax calibrate --normal-dir` over 2 processes: the one-process thresholds.
    assert json.loads((tmp_path / "pg_multi.calib1").read_text()) is None
    c1 = json.loads((tmp_path / "pg_single" / "thresholds.json").read_text())
    c2 = json.loads((tmp_path / "pg_multi" / "thresholds.json").read_text())
    assert json.loads((tmp_path / "pg_multi.calib0").read_text())["mode"] == c2["mode"]
    assert c1["mode"] == c2["mode"]
    for key in ("image_threshold", "pixel_threshold", "image_scale", "pixel_scale"):
        assert c1[key] is not None and c2[key] == pytest.approx(c1[key], rel=1e-5), key
    assert not list((tmp_path / "pg_multi").glob(".normal_scores*"))
    # A failed share (process 1's) stops process 0 at once with process 1's error.
    g0, g1 = _outcomes(tmp_path / "pg_multi.gather")
    assert g1["outcome"].startswith("ValueError")
    assert g0["outcome"].startswith("PeerProcessError") and "share is broken" in g0["outcome"]
    assert g0["seconds"] < 60
    assert not list((tmp_path / "pg_multi.gather").glob("*.npz"))
    # A failed share on process 0 stops process 1, which wrote its share after that
    # failure and deletes it: nothing is left behind.
    h0, h1 = _outcomes(tmp_path / "pg_multi.gather0fails")
    assert h0["outcome"].startswith("ValueError")
    assert h1["outcome"].startswith("PeerProcessError") and "process 0's share" in h1["outcome"]
    assert h1["seconds"] < 60
    assert (tmp_path / "pg_multi.gather").is_dir()
    assert not list((tmp_path / "pg_multi.gather").iterdir())
