"""train/flops.py: XLA cost-analysis FLOPs, the peak table and MFU arithmetic."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from vtadl_jax.train.flops import (DTYPES, PEAK_FLOPS, device_peak_flops, format_mfu, mfu,
                                   step_flops)


@pytest.mark.parametrize("m,k,n", [(64, 48, 32), (7, 129, 5)])
def test_matmul_flops_are_2mnk(m, k, n):
    compiled = jax.jit(jnp.matmul).lower(jnp.ones((m, k)), jnp.ones((k, n))).compile()
    assert step_flops(compiled) == 2 * m * n * k


def test_sharded_program_reports_per_device_flops():
    """The partitioned program of a shard_map over d devices does 1/d of the matmul."""
    d = 4
    mesh = jax.make_mesh((d,), ("b",), devices=jax.devices()[:d],
                         axis_types=(jax.sharding.AxisType.Auto,))
    f = jax.jit(jax.shard_map(jnp.matmul, mesh=mesh, in_specs=(P("b"), P()),
                              out_specs=P("b")))
    m, k, n = 64, 48, 32
    assert step_flops(f.lower(jnp.ones((m, k)), jnp.ones((k, n))).compile()) == 2 * m * n * k / d


def test_step_flops_without_cost_analysis():
    class NoCost:
        def cost_analysis(self):
            raise NotImplementedError

    class Empty:
        def cost_analysis(self):
            return {}

    class OldList:  # older jaxlib: a list with one dict
        def cost_analysis(self):
            return [{"flops": 12.0}]

    assert step_flops(NoCost()) is None and step_flops(Empty()) is None
    assert step_flops(OldList()) == 12.0


def test_mfu_arithmetic():
    # 3e12 FLOPs in 0.5 s on 2 devices of 10 TFLOP/s each: 6e12 / 2e13 = 30 %.
    assert mfu(3e12, 0.5, 10e12, 2) == pytest.approx(0.3)
    assert mfu(1e9, 1.0, 1e9) == pytest.approx(1.0)
    assert mfu(None, 1.0, 1e12) is None and mfu(1e9, 1.0, None) is None
    assert format_mfu(0.3) == "30.0%" and format_mfu(None) == "-"
    with pytest.raises(ValueError, match="seconds"):
        mfu(1e9, 0.0, 1e12)


@pytest.mark.parametrize("kind,dtype,tflops", [
    ("NVIDIA A100-SXM4-80GB", "bfloat16", 312), ("NVIDIA A100-PCIE-40GB", "float32", 156),
    ("NVIDIA H100 80GB HBM3", "bfloat16", 989.5), ("NVIDIA H100 PCIe", "bfloat16", 756.5),
    ("NVIDIA H100 NVL", "float32", 417.5), ("NVIDIA H200", "bfloat16", 989.5),
    ("NVIDIA H200 NVL", "bfloat16", 835.5), ("NVIDIA L4", "bfloat16", 121),
    ("Tesla V100-SXM2-16GB", "float32", 15.7), ("Tesla V100-PCIE-32GB", "float32", 14),
    ("TPU v4", "bfloat16", 275), ("TPU v5 lite", "bfloat16", 197), ("TPU v5", "bfloat16", 459),
    ("TPU v5p", "float32", 459), ("TPU v6 lite", "bfloat16", 918),
])
def test_peak_table_lookup(kind, dtype, tflops):
    assert device_peak_flops(kind, dtype) == pytest.approx(tflops * 1e12)


@pytest.mark.parametrize("kind", ["cpu", "TPU v4 lite", "NVIDIA L40S", "NVIDIA GeForce RTX 4090",
                                  "TPU7x", "AMD Instinct MI300X"])
def test_unknown_devices_give_none(kind):
    assert all(device_peak_flops(kind, dt) is None for dt in DTYPES)
    assert format_mfu(mfu(1e12, 1.0, device_peak_flops(kind, "bfloat16"))) == "-"


def test_v100_has_no_bfloat16_peak_and_dtype_is_checked():
    assert device_peak_flops("Tesla V100-SXM2-32GB", "bfloat16") is None
    with pytest.raises(ValueError, match="dtype"):
        device_peak_flops("NVIDIA H100 PCIe", "float16")


def test_peaks_are_consistent():
    """bf16 >= f32 everywhere, and every entry is a plausible per-device FLOP/s."""
    for _, peaks in PEAK_FLOPS:
        assert set(peaks) == set(DTYPES)
        f32, bf16 = peaks["float32"], peaks["bfloat16"]
        assert 1e13 < f32 < 2e15
        assert bf16 is None or bf16 >= f32
    assert np.isfinite([p["float32"] for _, p in PEAK_FLOPS]).all()


def test_measured_rates_are_positive_and_finite():
    from vtadl_jax.train.flops import measure_copy_bandwidth, measure_matmul_rate

    rate = measure_matmul_rate(n=256, repeats=2)
    bw = measure_copy_bandwidth(nbytes=4 << 20, repeats=2)
    assert np.isfinite(rate) and rate > 1e6  # any CPU does > 1 MFLOP/s
    assert np.isfinite(bw) and bw > 1e6
    for bad in (dict(n=0), dict(repeats=0)):
        with pytest.raises(ValueError, match="measure_matmul_rate"):
            measure_matmul_rate(**bad)
    with pytest.raises(ValueError, match="measure_copy_bandwidth"):
        measure_copy_bandwidth(nbytes=2)


def test_step_time_floor_adds_compute_and_adam_traffic():
    from vtadl_jax.train.flops import step_time_floor

    # 100 GFLOP at 50 GFLOP/s = 2 s; 1e6 params x 7 words x 4 bytes at 28 MB/s = 1 s
    assert step_time_floor(100e9, 50e9, 10**6, 28e6) == pytest.approx(3.0)
    assert step_time_floor(0.0, 1.0, 10, 40.0, words_per_param=1) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="step_time_floor"):
        step_time_floor(1.0, 0.0, 1, 1.0)
