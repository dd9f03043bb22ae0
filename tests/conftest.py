"""Test configuration.

Every test process sees 8 host CPU devices so that the data-parallel code paths are
exercised on CPU exactly as on an accelerator host. This must run before JAX is
imported anywhere.
"""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Persistent XLA compilation cache shared by the xdist workers (and the subprocesses the
# benchmark/runner tests start): many tests compile the same train step or backbone, and
# on 2 CPU cores compilation is most of the suite's time. Keyed by the program and the
# JAX version, so it never changes a result; delete the folder to start cold.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".pytest_cache", "xla"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "1")

import jax  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture
def x64():
    """Run a test body with float64 enabled (for references computed in float64)."""
    with jax.enable_x64(True):
        yield


@pytest.fixture
def stub_train(monkeypatch):
    """`train.loop.train` -> records its config (a list of dicts, returned), writes
    config.json as the loop does, trains nothing. For CLI and resume checks that must
    let a run through without the cost of training."""
    from vtadl_jax.train import loop

    calls = []

    def fake_train(config, workdir, source=None, *, before_write=None, **kwargs):
        before_write()
        calls.append(config.to_dict())
        if jax.process_index() == 0:  # as the loop: process 0 alone writes config.json
            with open(os.path.join(workdir, "config.json"), "w") as f:
                f.write(config.to_json_best_effort())
        return None, {"step": 0, "metrics": {}, "workdir": workdir}

    monkeypatch.setattr(loop, "train", fake_train)
    return calls
