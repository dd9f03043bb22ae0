"""Test configuration.

Every test process sees 8 host CPU devices so that the data-parallel code paths are
exercised on CPU exactly as on an accelerator host. This must run before JAX is
imported anywhere.
"""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture
def x64():
    """Run a test body with float64 enabled (for references computed in float64)."""
    with jax.enable_x64(True):
        yield
