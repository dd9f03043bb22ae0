"""experiments/benchmarks/bench_vs_official.py without the authors' code: it skips cleanly,
and bad arguments exit 2 naming the option, before torch or any model is loaded; the
interleaved rounds (own processes or shared) and the table writer, on stand-in steps."""
from experiments.benchmarks import bench_vs_official as bench


def test_skips_without_a_checkout(capsys):
    assert bench.main([]) == 0
    assert "skipped (no --official PATH" in capsys.readouterr().out


def test_not_a_checkout_exits_2(tmp_path, capsys):
    assert bench.main(["--official", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert str(tmp_path) in err and "VT_AE.py" in err


def test_bad_round_counts_exit_2(capsys):
    for argv in (["--warmup", "0"], ["--rounds", "0"]):
        assert bench.main(argv) == 2
        assert "--warmup and --rounds must be >= 1" in capsys.readouterr().err


def test_malloc_note_names_the_setting(monkeypatch):
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.check=0:glibc.malloc.hugetlb=1")
    assert "huge pages" in bench.malloc_note()
    monkeypatch.delenv("GLIBC_TUNABLES")
    assert bench.malloc_note() == "default malloc (no huge pages)"
    monkeypatch.setenv("LD_PRELOAD", "/x/a.so:/usr/lib/libjemalloc.so.2")
    monkeypatch.setenv("MALLOC_CONF", "thp:always")
    assert bench.malloc_note() == ("jemalloc (libjemalloc.so.2 preloaded, "
                                   "MALLOC_CONF=thp:always)")


def _counting_step(loss: float, sleep_s: float):
    """A stand-in implementation for bench.interleave: sleeps, returns its loss and pid."""
    import os
    import time

    calls = []

    def step():
        calls.append(1)
        time.sleep(sleep_s)
        return loss + len(calls)
    return step, 7, {"pid": os.getpid()}


def _broken_step():
    raise ValueError("no such model")


def _dying_step():
    """Builds, then the process dies at its first step (as on a kill -9 or an OOM kill)."""
    import os

    def step():
        os._exit(3)
    return step, 1, {}


def test_interleave_times_every_step_in_its_own_process():
    import os

    lines = []
    out = bench.interleave({"a": (_counting_step, (1.0, 0.05)), "b": (_counting_step, (10.0, 0.0))},
                           rounds=3, warmup=2, isolation="process", log=lines.append)
    assert set(out) == {"a", "b"}
    (ta, pa, ia), (tb, pb, ib) = out["a"], out["b"]
    assert len(ta) == len(tb) == 3 and pa == pb == 7
    assert min(ta) >= 0.05 and max(tb) < 0.05  # each worker timed its own step
    assert len({ia["pid"], ib["pid"], os.getpid()}) == 3
    # 5 rounds in order a, b; the losses count each worker's own calls
    assert [ln.split()[2] for ln in lines] == ["a", "b"] * 5
    assert lines[-1].endswith("loss 15") and lines[-2].endswith("loss 6")


def test_interleave_shared_runs_in_this_process():
    import os

    out = bench.interleave({"a": (_counting_step, (0.0, 0.0))}, rounds=2, warmup=1,
                           isolation="shared", log=lambda line: None)
    assert out["a"][2]["pid"] == os.getpid() and len(out["a"][0]) == 2


def test_interleave_names_a_failing_worker():
    import pytest

    with pytest.raises(RuntimeError, match="broken: ValueError: no such model"):
        bench.interleave({"ok": (_counting_step, (0.0, 0.0)), "broken": (_broken_step, ())},
                         rounds=1, isolation="process", log=lambda line: None)
    with pytest.raises(RuntimeError, match=r"dies: worker process died \(exit code 3\)"):
        bench.interleave({"dies": (_dying_step, ())}, rounds=1, isolation="process",
                         log=lambda line: None)
    with pytest.raises(ValueError, match="isolation 'thread'"):
        bench.interleave({}, rounds=1, isolation="thread")


def test_write_tables_the_floor_where_known(tmp_path):
    import json

    rows = [dict(batch=2, impl="official", params=5, median_s=1.2, times_s=[1.2],
                 official_over_impl=1.0, images_per_s=1.67),
            dict(batch=2, impl="ours (code)", params=5, median_s=0.8, times_s=[0.8],
                 official_over_impl=1.5, images_per_s=2.5, gflop=77.0, floor_s=0.5,
                 official_over_floor=2.4)]
    meta = dict(note="n", rates=dict(matmul_n=4096, matmul_flops_per_s=1.7e11,
                                     bandwidth_bytes_per_s=4.6e10))
    bench.write(rows, str(tmp_path), meta)
    md = (tmp_path / "vs_official.md").read_text().splitlines()
    assert md[6].startswith("| 2 | official | 5 | 1.200 | 1.00 | 1.67 | - | - | - |")
    assert md[7].startswith("| 2 | ours (code) | 5 | 0.800 | 1.50 | 2.50 | 77.0 | 0.500 | 2.40 |")
    assert "measured 170 GFLOP/s" in md[-1] and "46.0 GB/s" in md[-1]
    assert json.loads((tmp_path / "vs_official.json").read_text())["rows"] == rows
