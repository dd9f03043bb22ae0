"""experiments/benchmarks/bench_vs_official.py without the authors' code: it skips cleanly,
and bad arguments exit 2 naming the option, before torch or any model is loaded."""
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
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.check=0:glibc.malloc.hugetlb=1")
    assert "huge pages" in bench.malloc_note()
    monkeypatch.delenv("GLIBC_TUNABLES")
    assert bench.malloc_note() == "default malloc (no huge pages)"
