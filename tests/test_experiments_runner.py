"""The shared runner machinery (experiments/runner.py): command lines and the cache."""
import json
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from experiments import runner  # noqa: E402


def _with_units(p):
    p.add_argument("--digits", type=int, nargs="+", default=[0])
    p.add_argument("overrides", nargs="*")


@pytest.mark.parametrize("argv", [
    ["--out", "o", "--digits", "7", "8", "num_steps=600", "progress=False"],
    ["--out", "o", "num_steps=600", "--digits", "7", "8", "progress=False"],
    ["num_steps=600", "progress=False", "--out", "o", "--digits", "7", "8"],
])
def test_overrides_are_taken_wherever_they_stand(argv):
    args = runner.parse_args("t", _with_units, argv)
    assert args.digits == [7, 8] and args.out == "o"
    assert args.overrides == ["num_steps=600", "progress=False"]


def test_option_values_with_equals_stay_with_their_option():
    # A runner without positional overrides (sweep_k's --model-overrides k=v ...).
    args = runner.parse_args("t", lambda p: p.add_argument("--model-overrides", nargs="*"),
                             ["--out", "o", "--model-overrides", "dim=16", "depth=1"])
    assert args.model_overrides == ["dim=16", "depth=1"]


def test_bad_unit_value_still_fails(capsys):
    with pytest.raises(SystemExit):
        runner.parse_args("t", _with_units, ["--out", "o", "--digits", "seven"])
    assert "--digits" in capsys.readouterr().err


def test_cached_runs_once_and_records_the_machine(tmp_path):
    calls = []
    fn = lambda: calls.append(1) or {"value": 3}  # noqa: E731
    first = runner.cached(str(tmp_path), "unit", fn)
    second = runner.cached(str(tmp_path), "unit", fn)
    assert calls == [1] and first == second and first["value"] == 3
    with open(tmp_path / "runs" / "unit.json") as f:
        stored = json.load(f)
    assert stored["machine"]["cpu_count"] == os.cpu_count() and stored["seconds"] >= 0
    runner.cached(str(tmp_path), "unit", fn, fresh=True)
    assert calls == [1, 1]
