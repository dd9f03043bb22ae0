"""The user-error contract of `vtadl_jax.cli.main` (issue 14): exit status 2, one message
naming the config field / file / path and what is expected, no traceback, and nothing
written or changed. Config checks, config arguments, overrides anywhere on the line,
unwritable directories, and that an unexpected error keeps its traceback.

No training here: where a check must let a run through, `loop.train` is replaced by a
stub that records the config it was given (the gate is what is tested).
"""
import errno
import json
import os

import pytest
from file_snapshot import snapshot as _snapshot

from vtadl_jax import cli, records
from vtadl_jax.data import make_synthetic_mvtec
from vtadl_jax.pipelines import patch_gaussian as pg_pipeline
from vtadl_jax.pipelines import vtadl as vtadl_pipeline
from vtadl_jax.train import loop

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "experiments", "configs", "vtadl_tiny.py")
PG = os.path.join(REPO, "experiments", "configs", "patch_gaussian_synthetic.py")


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    base = tmp_path_factory.mktemp("cli_errors")
    make_synthetic_mvtec(base / "syn", categories=("object",), num_train=30, num_test_good=2,
                         num_test_defect=1, image_size=32)
    return str(base / "syn" / "object")


def _train(root, workdir, *extra, config=TINY):
    return ["train", "--config", config, "--workdir", str(workdir), f"data.root={root}",
            "data.backend=direct", *extra]


def _assert_user_error(capsys, rc, *needles):
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "Traceback" not in err
    lines = [ln for ln in err.splitlines() if "error:" in ln]
    assert len(lines) == 1, err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


TRAIN_BAD = [
    # item 6: batch larger than the data / not positive
    ("batch_size=64", "batch_size=64", "30 training images"),
    ("batch_size=-8", "batch_size", ">= 1"),
    ("batch_size=0", "batch_size", ">= 1"),
    ("batch_size=12", "batch_size", "multiple of the 8 devices"),
    # item 7
    ("num_steps=0", "num_steps", ">= 1"),
    ("num_steps=-5", "num_steps", ">= 1"),
    # item 8
    ("checkpoint.every_steps=0", "checkpoint.every_steps", ">= 1"),
    ("checkpoint.keep=0", "checkpoint.keep", ">= 1"),
    ("checkpoint.best_mode=lowest", "checkpoint.best_mode", "'min'"),
    # item 9
    ("data.image_size=30", "data.image_size=30", "(32, 32)"),
    ("data.image_size=0", "data.image_size", ">= 1"),
    # item 10
    ("num_steps=abc", "num_steps: expected an int, got 'abc'"),
    ("num_steps=2.5", "num_steps: expected an int"),
    ("optim.learning_rate=float('inf')", "optim.learning_rate"),
    ("optim.learning_rate=inf", "optim.learning_rate", "finite"),
    ("optim.learning_rate=nan", "optim.learning_rate", "finite"),
    ("optim.learning_rate=1e999", "optim.learning_rate", "finite"),
    ("optim.learning_rate=-1e-3", "optim.learning_rate", "> 0"),
    ("optim.learning_rate=0", "optim.learning_rate", "> 0"),
    ("optim.weight_decay=-1", "optim.weight_decay", ">= 0"),
    ("loss.mse_weight=nan", "loss.mse_weight", "finite"),
    ("loss.ssim_sigma=0", "loss.ssim_sigma", "> 0"),
    ("loss.ssim_form=positive", "loss.ssim_form", "one_minus"),
    ("loss.k_chunk=0", "loss.k_chunk", ">= 1"),
    ("seed=-1", "seed", ">= 0"),
    ("seed=abc", "seed: expected an int, got 'abc'"),
    ("input_range=[0,255]", "input_range", "[-1,1]"),
    ("progress=maybe", "progress", "boolean"),
    # item 12: model fields, names and values
    ("model.overrides.mdn_head=bogus", "model.overrides.mdn_head", "'vtadl_code'"),
    ("model.overrides.projection=capsule", "model.overrides.projection", "'routing'"),
    ("model.overrides.num_components=0", "model.overrides.num_components", ">= 1"),
    ("model.overrides.num_components=abc", "model.overrides.num_components: expected an int"),
    ("model.overrides.noise_std=-0.1", "model.overrides.noise_std", ">= 0"),
    ("model.overrides.noise_std=inf", "model.overrides.noise_std", "finite"),
    ("model.overrides.patch_size=5", "model.overrides.patch_size", "divisor"),
    ("model.overrides.num_heads=3", "model.overrides.num_heads", "divisor of dim"),
    ("model.overrides.decoder=vtadl_code", "decoder 'vtadl_code' needs"),
    ("model.overrides.image_size=abc", "model.overrides.image_size"),
    ("model.overrides.no_such_field=1", "no_such_field", "settable"),
    ("model.overrides.parent=1", "'parent'", "settable"),
    ("model.variant=huge", "model.variant", "'tiny'"),
    ("model.overrides.image_size=48", "data.image_size=32", "(48, 48)"),  # data 32 vs model 48
]


@pytest.mark.parametrize("override, needles", [(c[0], c[1:]) for c in TRAIN_BAD],
                         ids=[c[0] for c in TRAIN_BAD])
def test_train_bad_value_exit_2_and_nothing_written(root, tmp_path, capsys, stub_train,
                                                    override, needles):
    workdir = tmp_path / "run"
    rc = cli.main(_train(root, workdir, override))
    _assert_user_error(capsys, rc, *needles)
    assert not workdir.exists()  # checked before the workdir is created
    assert stub_train == []


FIT_BAD = [
    ("gaussian.eps=0", "gaussian.eps", "> 0"),
    ("gaussian.eps=nan", "gaussian.eps", "finite"),
    ("gaussian.blur_sigma=-1", "gaussian.blur_sigma", ">= 0"),
    ("gaussian.upsample=cubic", "gaussian.upsample", "'bilinear'"),
    ("gaussian.score_path=fast", "gaussian.score_path", "'whiten'"),
    ("gaussian.channel_subset=-3", "gaussian.channel_subset", ">= 0"),
    ("batch_size=0", "batch_size", ">= 1"),
    ("data.image_size=-64", "data.image_size", ">= 1"),
    ("backbone.name=resnet", "backbone.name", "efficientnet_lite0"),
    ("backbone.stages=()", "backbone.stages", "non-empty"),
    ("seed=x", "seed: expected an int, got 'x'"),
]


@pytest.mark.parametrize("override, needles", [(c[0], c[1:]) for c in FIT_BAD],
                         ids=[c[0] for c in FIT_BAD])
def test_fit_bad_value_exit_2_and_nothing_written(root, tmp_path, capsys, override, needles):
    workdir = tmp_path / "pg"
    rc = cli.main(["fit", "--config", PG + ":object", "--workdir", str(workdir),
                   f"data.root={root}", "data.backend=direct", override])
    _assert_user_error(capsys, rc, *needles)
    assert not workdir.exists()


def test_fit_missing_data_folder_exit_2_and_no_workdir(tmp_path, capsys):
    """A failed fit removes the (still empty) work directory it created."""
    workdir = tmp_path / "pg"
    rc = cli.main(["fit", "--config", PG + ":object", "--workdir", str(workdir),
                   f"data.root={tmp_path / 'no_such_data'}", "data.backend=direct"])
    _assert_user_error(capsys, rc, "no_such_data")
    assert not workdir.exists()
    workdir.mkdir()  # one that existed before stays
    rc = cli.main(["fit", "--config", PG + ":object", "--workdir", str(workdir),
                   f"data.root={tmp_path / 'no_such_data'}", "data.backend=direct"])
    _assert_user_error(capsys, rc, "no_such_data")
    assert workdir.is_dir()


def test_fit_image_size_not_a_backbone_multiple(root, tmp_path, capsys):
    from vtadl_jax.models.backbones.contnet import contnet_tiny

    multiple = contnet_tiny().config.input_multiple
    rc = cli.main(["fit", "--config", PG + ":object", "--workdir", str(tmp_path / "pg"),
                   f"data.root={root}", "backbone.name=contnet_tiny",
                   f"data.image_size={multiple + 8}"])
    _assert_user_error(capsys, rc, "data.image_size", f"multiple of {multiple}")
    assert not (tmp_path / "pg").exists()


def test_failed_check_then_corrected_run_is_not_blocked(root, tmp_path, capsys, stub_train):
    """Item 6: a refused run leaves no workdir; an empty or record-only workdir (run.json,
    config.json, an empty checkpoints/) does not block a fresh run."""
    workdir = tmp_path / "run"
    _assert_user_error(capsys, cli.main(_train(root, workdir, "batch_size=64")), "batch_size")
    assert not workdir.exists()
    (workdir / "checkpoints").mkdir(parents=True)
    (workdir / "run.json").write_text(json.dumps({"method": "vtadl", "config": {}}))
    (workdir / "config.json").write_text("{}")
    assert cli.main(_train(root, workdir, "batch_size=8")) == 0
    assert stub_train[-1]["batch_size"] == 8
    with open(workdir / "run.json") as f:
        assert json.load(f)["config"]["batch_size"] == 8
    # A real checkpoint step does block a fresh run (and changes nothing).
    (workdir / "checkpoints" / "10").mkdir()
    before = _snapshot(workdir)
    _assert_user_error(capsys, cli.main(_train(root, workdir)), str(workdir), "--resume")
    assert _snapshot(workdir) == before


def test_model_override_fields_settable_and_typed(root, tmp_path, stub_train):
    """Item 12: fields absent from config.model.overrides are set with their types."""
    workdir = tmp_path / "run"
    assert cli.main(_train(root, workdir, "model.overrides.mdn_head=vtadl_code",
                           "model.overrides.num_components=6", "model.overrides.noise_std=0",
                           "model.overrides.projection=routing",
                           "model.overrides.image_size=32")) == 0
    overrides = stub_train[-1]["model"]["overrides"]
    assert overrides == {"mdn_head": "vtadl_code", "num_components": 6, "noise_std": 0.0,
                         "projection": "routing", "image_size": 32}
    assert type(overrides["num_components"]) is int and type(overrides["noise_std"]) is float


@pytest.mark.parametrize("argv_tail", [
    ["--resume", "num_steps=30"],                      # item 13: after a flag
    ["num_steps=7", "--resume", "num_steps=30"],       # before and after: command-line order
    ["--resume", "seed=0", "--allow-config-change", "num_steps=30"],
])
def test_overrides_anywhere_on_the_line(root, tmp_path, stub_train, argv_tail):
    workdir = tmp_path / "run"
    argv = ["train", "--config", TINY, "--workdir", str(workdir), f"data.root={root}",
            *argv_tail[:-1], "data.backend=direct", argv_tail[-1]]
    assert cli.main(argv) == 0
    assert stub_train[-1]["num_steps"] == 30 and stub_train[-1]["resume"] is True


def test_parse_keeps_order_and_rejects_other_tokens(capsys):
    parser = cli.build_parser()
    args = cli.parse_args(parser, ["train", "--config", "c.py", "a=1", "--workdir", "w",
                                   "b=2", "--resume", "a=3"])
    assert args.overrides == ["a=1", "b=2", "a=3"]
    args = cli.parse_args(parser, ["evaluate", "--workdir", "w", "--overlays", "0", "data.x=1"])
    assert args.overrides == ["data.x=1"] and args.overlays == 0
    for argv in (["train", "--config", "c", "--workdir", "w", "--bogus"],
                 ["predict", "--workdir", "w", "--images", "a.png", "--out", "o", "--x=1"]):
        with pytest.raises(SystemExit) as info:
            cli.parse_args(parser, argv)
        assert info.value.code == 2
        assert "unrecognized arguments" in capsys.readouterr().err


def test_stray_word_is_not_an_override(root, tmp_path, capsys):
    _assert_user_error(capsys, cli.main(_train(root, tmp_path / "w", "stray")),
                       "'stray'", "dotted.key=value")
    assert not (tmp_path / "w").exists()


def test_predict_takes_no_overrides(capsys):
    with pytest.raises(SystemExit):
        cli.parse_args(cli.build_parser(), ["predict", "--workdir", "w", "--images", "x.png",
                                            "--out", "o", "--", "a=1"])


@pytest.fixture
def arg_configs(tmp_path):
    needs = tmp_path / "needs_arg.py"
    needs.write_text("import ml_collections\n\ndef get_config(category):\n"
                     "    return ml_collections.ConfigDict({'c': category})\n")
    broken = tmp_path / "broken.py"
    broken.write_text("def get_config(:\n")
    not_dict = tmp_path / "not_dict.py"
    not_dict.write_text("def get_config():\n    return {'a': 1}\n")
    return {"needs": str(needs), "broken": str(broken), "not_dict": str(not_dict)}


def test_config_argument_mismatch(root, tmp_path, capsys, arg_configs):
    """Item 11: a config without a parameter given one, and the reverse."""
    cases = [
        (TINY + ":3", ("vtadl_tiny.py", "takes no argument")),
        (arg_configs["needs"], ("needs_arg.py", "requires an argument", "category")),
        (arg_configs["broken"], ("broken.py", "line 1")),
        (arg_configs["not_dict"], ("not_dict.py", "ConfigDict")),
        (os.path.join(REPO, "experiments", "configs", "vtadl_mnist.py") + ":12",
         ("vtadl_mnist.py:12", "digit")),
        (str(tmp_path / "missing.py"), ("missing.py",)),
    ]
    for spec, needles in cases:
        rc = cli.main(["train", "--config", spec, "--workdir", str(tmp_path / "w")])
        _assert_user_error(capsys, rc, *needles)
        assert not (tmp_path / "w").exists()


def _read_only_probe(monkeypatch, blocked):
    """Simulate a read-only file system under `blocked`: creating a file there raises
    EROFS (tests run as root, where chmod 0o555 does not stop writes). This covers the
    probe and everything that runs before it, not the kernel's own behaviour."""
    real = records.tempfile.mkstemp

    def mkstemp(*args, dir=None, **kwargs):
        if dir is not None and os.path.abspath(dir).startswith(os.path.abspath(blocked)):
            raise OSError(errno.EROFS, "Read-only file system", dir)
        return real(*args, dir=dir, **kwargs)

    monkeypatch.setattr(records.tempfile, "mkstemp", mkstemp)


def _fake_vtadl_run(workdir):
    """A VT-ADL workdir record (no checkpoint: the probe must fail before one is read)."""
    from vtadl_jax.configs import load_config

    config = load_config(TINY)
    os.makedirs(workdir, exist_ok=True)
    records.write_json_atomic({"method": "vtadl", "config": config.to_dict()},
                              os.path.join(workdir, "run.json"))


def test_read_only_workdir_and_outputs(root, tmp_path, capsys, monkeypatch, stub_train):
    """Item 20: new run, --resume, evaluate and predict --out on a read-only location."""
    workdir = tmp_path / "ro"
    _fake_vtadl_run(str(workdir))
    before = _snapshot(workdir)
    _read_only_probe(monkeypatch, str(workdir))
    monkeypatch.setattr(vtadl_pipeline, "make_predict",
                        lambda *a, **k: pytest.fail("scored before checking the output"))
    for argv, what in (
            (_train(root, workdir / "new"), "work directory"),
            (_train(root, workdir, "--resume"), "work directory"),
            (["evaluate", "--workdir", str(workdir)], "evaluation directory"),
            (["predict", "--workdir", str(tmp_path / "ro"), "--images",
              os.path.join(root, "train", "good", "000.png"), "--out",
              str(workdir / "preds")], "--out directory")):
        line = _assert_user_error(capsys, cli.main(argv), what, "not writable",
                                  "Read-only file system")
        assert str(workdir) in line
    assert _snapshot(workdir) == before and stub_train == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_read_only_directory_by_permissions(root, tmp_path, capsys):
    workdir = tmp_path / "ro"
    workdir.mkdir()
    workdir.chmod(0o555)
    try:
        _assert_user_error(capsys, cli.main(_train(root, workdir / "run")), "not writable")
    finally:
        workdir.chmod(0o755)


def test_fit_read_only_workdir(root, tmp_path, capsys, monkeypatch):
    workdir = tmp_path / "pg_ro"
    _read_only_probe(monkeypatch, str(workdir))
    monkeypatch.setattr(pg_pipeline, "load_backbone",
                        lambda *a, **k: pytest.fail("loaded the backbone before the probe"))
    rc = cli.main(["fit", "--config", PG + ":object", "--workdir", str(workdir),
                   f"data.root={root}", "data.backend=direct"])
    _assert_user_error(capsys, rc, str(workdir), "not writable")


def test_other_methods_run_is_not_overwritten(root, tmp_path, capsys, stub_train):
    for method, argv in (
            ("patch_gaussian", _train(root, tmp_path / "w")),
            ("vtadl", ["fit", "--config", PG + ":object", "--workdir", str(tmp_path / "w"),
                       f"data.root={root}", "data.backend=direct"])):
        (tmp_path / "w").mkdir(exist_ok=True)
        (tmp_path / "w" / "run.json").write_text(json.dumps({"method": method, "config": {}}))
        before = _snapshot(tmp_path / "w")
        _assert_user_error(capsys, cli.main(argv), str(tmp_path / "w"), repr(method))
        assert _snapshot(tmp_path / "w") == before


def test_evaluate_data_override_the_model_cannot_take(tmp_path, capsys, monkeypatch):
    _fake_vtadl_run(str(tmp_path))
    monkeypatch.setattr(vtadl_pipeline, "make_predict",
                        lambda *a, **k: pytest.fail("scored a size the model cannot take"))
    for override, needle in (("image_size=30", "data.image_size=30"),
                             ("data.image_size=abc", "data.image_size: expected an int")):
        _assert_user_error(capsys, cli.main(["evaluate", "--workdir", str(tmp_path), override]),
                           needle)
    assert not (tmp_path / "eval").exists()


@pytest.mark.parametrize("argv", [["make-synthetic", "--out", "x", "--seed", "-1"],
                                  ["make-synthetic", "--out", "x", "--image-size", "abc"],
                                  ["evaluate", "--workdir", "w", "--overlays", "-1"]])
def test_flag_values_named(argv, capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    assert info.value.code == 2
    assert f"argument {argv[-2]}" in capsys.readouterr().err


def test_damaged_run_record_is_named(tmp_path, capsys):
    (tmp_path / "run.json").write_text('{"method": "vtadl", "conf')
    _assert_user_error(capsys, cli.main(["evaluate", "--workdir", str(tmp_path)]),
                       str(tmp_path / "run.json"), "damaged run record")


def test_unexpected_error_keeps_its_traceback(root, tmp_path, monkeypatch):
    def crash(*args, **kwargs):
        raise RuntimeError("a bug, not a user error")

    monkeypatch.setattr(loop, "train", crash)
    with pytest.raises(RuntimeError, match="a bug"):
        cli.main(_train(root, tmp_path / "run"))


@pytest.mark.parametrize("pipeline,check,config", [
    (vtadl_pipeline, "check_vtadl_config", TINY),
    (pg_pipeline, "check_patch_gaussian_config", PG + ":object")])
def test_processes_join_before_the_checks_start_jax(pipeline, check, config, tmp_path,
                                                    monkeypatch):
    """`jax.distributed.initialize` must come before anything that starts JAX's backend,
    and the config checks do (they ask for the device count): train and fit join first.
    (Checking first made every multi-process `vtadl-jax train` fail.)"""
    from vtadl_jax.configs import load_config

    order = []

    class Stop(Exception):
        pass

    def fake_check(cfg):
        order.append("check")
        raise Stop

    monkeypatch.setattr(pipeline.multihost, "maybe_initialize_distributed",
                        lambda cfg: order.append("join"))
    monkeypatch.setattr(pipeline, check, fake_check)
    run = getattr(pipeline, "train_from_config", None) or pipeline.fit_from_config
    with pytest.raises(Stop):
        run(load_config(config), str(tmp_path / "run"))
    assert order == ["join", "check"]
