"""Resume hardening (issue 14, items 2-5): damaged checkpoints fall back to the newest
intact one (orbax's real files, truncated), a torn metrics.jsonl line, and a resume
with a changed config (refused unless --allow-config-change; every config kept).

The checkpoint-level tests save a three-array state (no model); one end-to-end test
trains the tiny model for 3 steps through the CLI and checks that a resume after the
newest checkpoint is damaged equals the uninterrupted run bit for bit.
"""
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from file_snapshot import snapshot as _snapshot

from vtadl_jax import cli
from vtadl_jax.data import make_synthetic_mvtec
from vtadl_jax.errors import CheckpointError, RunRecordError
from vtadl_jax.pipelines import resume as resume_lib
from vtadl_jax.train import checkpoint as ckpt
from vtadl_jax.train import loop
from vtadl_jax.train.state import TrainState

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "experiments", "configs", "vtadl_tiny.py")


def _state(step: int) -> TrainState:
    return TrainState(step=jnp.asarray(step, jnp.int32),
                      params={"w": jnp.arange(4096, dtype=jnp.float32) * step},
                      batch_stats={}, opt_state={"m": jnp.full((64,), float(step))},
                      rng=jax.random.PRNGKey(step))


def _largest_data_file(step_dir):
    """The largest array-data file of a checkpoint (under a `d/` folder of state/)."""
    files = [os.path.join(d, n) for d, _, names in os.walk(os.path.join(step_dir, "state"))
             if os.path.basename(d) == "d" for n in names]
    return max(files, key=os.path.getsize)


def _truncate(path):
    os.truncate(path, os.path.getsize(path) // 2)


DAMAGE = {"data": _largest_data_file,
          "metadata": lambda step_dir: os.path.join(step_dir, "state", "_METADATA")}


@pytest.fixture
def saved(tmp_path):
    """checkpoints/{1,2,3} of `_state(step)`, real orbax files."""
    directory = str(tmp_path / "checkpoints")
    manager = ckpt.make_manager(directory, keep=5, keep_best=0, async_save=False)
    for step in (1, 2, 3):
        ckpt.save_state(manager, _state(step))
    manager.wait_until_finished()
    yield manager, directory
    manager.close()


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_damaged_newest_checkpoint_falls_back(saved, capsys, damage):
    """Items 2 and 3: a truncated data file or _METADATA of the newest step."""
    manager, directory = saved
    _truncate(DAMAGE[damage](os.path.join(directory, "3")))
    before = _snapshot(directory)
    state, step, damaged = ckpt.restore_newest_intact(manager, _state(0))
    assert (step, damaged) == (2, [3])
    np.testing.assert_array_equal(np.asarray(state.params["w"]), np.asarray(_state(2).params["w"]))
    err = capsys.readouterr().err
    assert os.path.join(directory, "3") in err and "step 3" in err
    assert "restored step 2" in err
    assert _snapshot(directory) == before  # nothing deleted or changed by a restore
    assert int(ckpt.restore_state(manager, _state(0)).step) == 2  # the default path too
    with pytest.raises(CheckpointError, match=os.path.join(directory, "3")):
        ckpt.restore_state(manager, _state(0), step=3)  # an explicit step: no fallback

    moved = ckpt.quarantine(manager, damaged)
    assert moved == [os.path.join(os.path.dirname(directory), "checkpoints_damaged", "3")]
    assert sorted(manager.all_steps()) == [1, 2]
    assert {os.path.join("3", k) for k in _snapshot(moved[0])} == \
        {k for k in before if k.startswith("3" + os.sep)}  # kept whole, for inspection
    ckpt.save_state(manager, _state(3))  # the step can be saved again
    manager.wait_until_finished()
    assert int(ckpt.restore_state(manager, _state(0)).step) == 3


def test_no_intact_checkpoint_is_a_clear_error(saved, capsys):
    manager, directory = saved
    for step in (1, 2, 3):
        _truncate(DAMAGE["data" if step % 2 else "metadata"](os.path.join(directory, str(step))))
    before = _snapshot(directory)
    with pytest.raises(CheckpointError) as info:
        ckpt.restore_newest_intact(manager, _state(0))
    assert directory in str(info.value) and "[3, 2, 1]" in str(info.value)
    assert _snapshot(directory) == before


def _log(path, lines):
    with open(path, "w") as f:
        f.write("".join(lines))


ROWS = [json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in (1, 2, 3, 4)]


def test_torn_last_metrics_line_is_dropped(tmp_path, capsys):
    """Item 4: a crash mid-write leaves a partial last line."""
    path = str(tmp_path / "metrics.jsonl")
    _log(path, ROWS[:3] + [ROWS[3][:9]])
    loop._truncate_log(path, 2)
    with open(path) as f:
        assert f.read() == "".join(ROWS[:2])
    err = capsys.readouterr().err
    assert path in err and "line 4" in err and "torn" in err


def test_fresh_run_clears_even_a_damaged_log(tmp_path):
    path = str(tmp_path / "metrics.jsonl")
    _log(path, [ROWS[0], "garbage\n", ROWS[2]])
    loop._truncate_log(path, 0)
    assert open(path).read() == ""


@pytest.mark.parametrize("bad_line", ['{"step": 2, "loss": 0.5', "garbage\n", '{"loss": 1}\n',
                                      "[1, 2]\n"])
def test_damaged_metrics_line_elsewhere_is_named(tmp_path, bad_line):
    path = str(tmp_path / "metrics.jsonl")
    _log(path, [ROWS[0], bad_line if bad_line.endswith("\n") else bad_line + "\n", *ROWS[2:]])
    before = open(path).read()
    with pytest.raises(RunRecordError, match=rf"{path}, line 2"):
        loop._truncate_log(path, 3)
    assert open(path).read() == before


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    base = tmp_path_factory.mktemp("resume_data")
    make_synthetic_mvtec(base / "syn", categories=("object",), num_train=16, num_test_good=2,
                         num_test_defect=1, image_size=32)
    return str(base / "syn" / "object")


def _train_argv(root, workdir, *extra):
    return ["train", "--config", TINY, "--workdir", str(workdir), f"data.root={root}",
            "data.backend=direct", "checkpoint.every_steps=1", "checkpoint.keep=5", *extra]


def _records(workdir):
    return {k: v for k, v in _snapshot(workdir).items() if not k.startswith("config_history")}


@pytest.mark.parametrize("changed", [["seed=1"], ["optim.learning_rate=0.01"],
                                     ["model.overrides.num_components=8"],
                                     ["loss.mse_weight=1", "seed=3"]])
def test_resume_with_changed_config(data_root, tmp_path, capsys, stub_train, changed):
    """Item 5: refused (listing the keys, nothing changed) unless --allow-config-change;
    num_steps may change; every replaced config is kept in config_history/."""
    workdir = tmp_path / "run"
    assert cli.main(_train_argv(data_root, workdir)) == 0
    (workdir / "checkpoints" / "4").mkdir(parents=True)  # a run with a checkpoint
    before = _snapshot(workdir)
    assert cli.main(_train_argv(data_root, workdir, "--resume", *changed)) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "--allow-config-change" in err
    for item in changed:
        assert item.split("=")[0] in err
    assert _snapshot(workdir) == before and len(stub_train) == 1

    assert cli.main(_train_argv(data_root, workdir, "--resume", "num_steps=80")) == 0
    assert cli.main(_train_argv(data_root, workdir, "--resume", "num_steps=80", *changed,
                                "--allow-config-change")) == 0
    history = sorted(os.listdir(workdir / "config_history"))
    assert len(history) == 2 and all(h.endswith("-until-step-4.json") for h in history)
    with open(workdir / "config_history" / history[0]) as f:
        first = json.load(f)
    with open(workdir / "config_history" / history[1]) as f:
        second = json.load(f)
    assert first["config"]["num_steps"] == 40 and first["changed"]["num_steps"]["to"] == 80
    assert first["config"]["seed"] == 0 and second["config"]["num_steps"] == 80
    key = changed[0].split("=")[0]
    assert key in second["changed"]
    with open(workdir / "run.json") as f:
        run = json.load(f)["config"]
    assert run["num_steps"] == 80 and stub_train[-1] == run
    assert cli.main(_train_argv(data_root, workdir, "--resume", "num_steps=80", *changed)) == 0
    assert len(os.listdir(workdir / "config_history")) == 2  # unchanged: nothing archived


def test_only_process_0_writes_run_records(data_root, tmp_path, monkeypatch, stub_train):
    """Multi-process training: every process runs train_from_config; a process other
    than 0 trains (the stub is called) but writes no run record: no run.json,
    config_history/ or train_summary.json of its own, even on a resume that changes the
    config (each process would otherwise archive the replaced config once)."""
    workdir = tmp_path / "run"
    assert cli.main(_train_argv(data_root, workdir)) == 0
    (workdir / "checkpoints" / "4").mkdir(parents=True)
    before = _snapshot(workdir)
    process = {"index": 1}
    monkeypatch.setattr(jax, "process_index", lambda *a, **k: process["index"])
    argv = _train_argv(data_root, workdir, "--resume", "seed=3", "--allow-config-change")
    assert cli.main(argv) == 0
    assert len(stub_train) == 2 and stub_train[-1]["seed"] == 3  # it did train
    assert _snapshot(workdir) == before
    process["index"] = 0  # the same command as process 0 writes them, once
    assert cli.main(argv) == 0
    assert len(os.listdir(workdir / "config_history")) == 1
    assert (workdir / "train_summary.json").is_file()
    with open(workdir / "run.json") as f:
        assert json.load(f)["config"]["seed"] == 3


def _params(workdir):
    return jax.device_get(loop.load_trained(str(workdir))[1])


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_resume_after_damage_equals_uninterrupted(data_root, tmp_path_factory, capsys, damage):
    """End to end: train 3 steps; damage step 3 (tear metrics.jsonl's last line, leave a
    half-written step 4 under orbax's temporary name);
    `--resume` warns, moves step 3 aside, retrains it from step 2: same parameters and
    losses as the uninterrupted run. With every step damaged: exit 2, nothing changed."""
    base = tmp_path_factory.getbasetemp() / "resume_e2e"
    reference = base / "reference"
    if not reference.exists():
        assert cli.main(_train_argv(data_root, reference, "num_steps=3")) == 0
    capsys.readouterr()
    workdir = base / damage
    shutil.copytree(reference, workdir)
    _truncate(DAMAGE[damage](str(workdir / "checkpoints" / "3")))
    log = workdir / "metrics.jsonl"
    log.write_text(log.read_text()[:-20])  # a torn last line (step 3)
    # A save of step 4 killed mid-write (orbax writes into a temporary name, renamed when
    # complete): never loaded, never counted.
    partial = workdir / "checkpoints" / "4.orbax-checkpoint-tmp-1700000000"
    shutil.copytree(workdir / "checkpoints" / "2", partial)
    (partial / "state" / "_METADATA").unlink()
    assert resume_lib.checkpoint_steps(str(workdir)) == [1, 2, 3]
    assert cli.main(_train_argv(data_root, workdir, "num_steps=3", "--resume")) == 0
    err = capsys.readouterr().err
    assert str(workdir / "checkpoints" / "3") in err and "restored step 2" in err
    assert (workdir / "checkpoints_damaged" / "3").is_dir()
    ref, got = _params(reference), _params(workdir)
    for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(got)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    ref_rows = [json.loads(line) for line in (reference / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert [r["loss"] for r in rows] == [r["loss"] for r in ref_rows]

    for step in (1, 2, 3):
        _truncate(DAMAGE[damage](str(workdir / "checkpoints" / str(step))))
    before = _snapshot(workdir)
    assert cli.main(_train_argv(data_root, workdir, "num_steps=4", "--resume")) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and str(workdir / "checkpoints") in err
    assert "no checkpoint can be restored" in err
    assert _snapshot(workdir) == before
