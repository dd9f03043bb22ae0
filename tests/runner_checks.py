"""Helpers shared by the experiment-runner smoke tests (not a test module)."""
import glob
import os


def assert_served_from_cache(monkeypatch, main, argv, out, module, names):
    """Call ``main(argv)`` again with ``module.<name>`` for each name replaced by a function
    that fails: every unit must come from ``<out>/runs/*.json``, whose files keep their
    modification times."""
    stamps = {p: os.stat(p).st_mtime_ns for p in glob.glob(os.path.join(out, "runs", "*.json"))}
    assert stamps

    def must_not_run(*args, **kwargs):
        raise AssertionError("recomputed although the run is cached")

    for name in names:
        monkeypatch.setattr(module, name, must_not_run)
    main(argv)
    assert {p: os.stat(p).st_mtime_ns for p in stamps} == stamps
