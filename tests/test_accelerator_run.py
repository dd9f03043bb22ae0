"""experiments/accelerator_run.py: time boxes, skips, and the CPU smoke run end to end."""
import json
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from experiments import accelerator_run as acc  # noqa: E402


def test_stages_time_box_failure_and_skip(tmp_path):
    seen = []
    stages = acc.Stages(budget_s=8.0, out=str(tmp_path),
                        on_record=lambda: seen.append(len(stages.records)))
    ok = stages.run("ok", [sys.executable, "-c", "print('{\"step_s\": 0.5}')"], 1.0, min_s=1)
    assert ok["status"] == "ok" and acc._json_lines(ok["log_tail"]) == [{"step_s": 0.5}]
    bad = stages.run("bad", [sys.executable, "-c", "raise SystemExit(3)"], 1.0, min_s=1)
    assert bad["status"] == "failed (exit 3)"
    slow = stages.run("slow", [sys.executable, "-c", "import time; time.sleep(60)"], 0.3,
                      min_s=1)
    assert slow["status"] == "time box reached (killed)" and slow["seconds"] < 10
    late = stages.run("late", [sys.executable, "-c", "pass"], 1.0, min_s=60)
    assert late["status"] == "skipped" and "budget spent" in late["note"]
    assert [r["stage"] for r in stages.records] == ["ok", "bad", "slow", "late"]
    assert seen == [1, 2, 3, 4]  # main rewrites results.json after every stage


def test_sigterm_records_the_stages_so_far(tmp_path):
    """An outer `timeout` (SIGTERM) while a stage runs: the stage is killed and recorded
    as interrupted, results.json and summary.md say so, exit 128 + 15."""
    import signal
    import subprocess
    import time

    out = tmp_path / "acc"
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "experiments",
                                                          "accelerator_run.py"),
                             "--out", str(out), "--smoke", "--stages", "bench",
                             "--budget-s", "300"], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (out / "bench_tiny_float32.log").exists():
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()
            time.sleep(0.1)
        time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        text = proc.communicate(timeout=60)[0]
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, text
    result = json.loads((out / "results.json").read_text())
    assert result["interrupted"] == "SIGTERM"
    assert [r["stage"] for r in result["stages"]] == ["bench_tiny_float32"]
    assert result["stages"][0]["status"].startswith("interrupted (SIGTERM")
    assert "interrupted by SIGTERM" in (out / "summary.md").read_text()


def test_train_steps_fit_the_time_left():
    # 300 s left, 60 s fixed, 10 runs of 0.1 s steps (x1.2 margin): 200 steps each.
    assert acc.train_steps(300, 0.1, 10, 60, cap=10_000) == 200
    assert acc.train_steps(300, 0.1, 10, 60, cap=50) == 50
    assert acc.train_steps(10, 0.1, 10, 60, cap=50) == 1


def test_smoke_and_full_exclude_each_other(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        acc.main(["--out", str(tmp_path), "--smoke", "--full"])
    assert exc.value.code == 2 and "--full" in capsys.readouterr().err


def test_bench_plan_puts_what_is_needed_first():
    plan = acc.bench_plan(False, (8, 32))
    assert plan == [(("mnist", 64, 10), "float32"),
                    (("paper", 8, 3), "bfloat16"), (("paper", 8, 3), "float32"),
                    (("paper", 32, 3), "bfloat16"), (("paper", 32, 3), "float32")]
    assert acc.bench_plan(True, (8, 32)) == [(("tiny", 8, 2), "float32"),
                                             (("tiny", 8, 2), "bfloat16")]
    assert acc.bench_plan(False, (8,), (None,)) == [(("mnist", 64, 10), None),
                                                    (("paper", 8, 3), None)]


@pytest.mark.skipif(acc.find_mvtec_root(None) is None, reason="real MVTec AD bottle absent")
def test_cpu_smoke_run_end_to_end(tmp_path):
    """The smoke run minus the selftest stage (tests/test_selftest.py runs that)."""
    out = str(tmp_path / "acc")
    assert acc.main(["--out", out, "--budget-s", "900", "--stages", "bench", "mnist",
                     "bottle"]) == 0
    with open(os.path.join(out, "results.json")) as f:
        result = json.load(f)
    assert result["smoke"] and result["backend"] == "cpu"
    stages = {r["stage"]: r for r in result["stages"]}
    assert all(r["status"] == "ok" for r in stages.values()), stages
    bench = [r for name, r in stages.items() if name.startswith("bench_tiny")]
    assert bench and all(r["result"]["variant"] == "tiny" for r in bench)
    assert 0.0 <= float(stages["mnist_table2"]["result"]["image_auroc"]) <= 1.0
    assert 0.0 <= float(stages["bottle"]["result"]["pixel_auroc"]) <= 1.0
    summary = open(os.path.join(out, "summary.md")).read()
    assert "device: cpu (cpu" in summary and "| bottle | ok |" in summary
