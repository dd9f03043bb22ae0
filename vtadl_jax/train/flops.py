"""FLOPs of a compiled step (XLA cost analysis) and model FLOPs utilisation (MFU).

- ``step_flops(compiled)``: the "flops" entry of ``compiled.cost_analysis()`` for a
  ``jax.jit(f).lower(...).compile()`` object. For an SPMD program (``shard_map`` or a
  sharded ``jit``) it is the cost of the partitioned per-device program, so the step's
  total is ``step_flops * n_devices``. XLA counts 2*m*n*k for an (m, k) x (k, n)
  matmul and also counts elementwise operations (e.g. the converts that XLA:CPU
  inserts around bfloat16 matmuls), so it is an estimate of the executed work, not
  of the model's matmul FLOPs alone.
- ``device_peak_flops(device_kind, dtype)``: dense (no sparsity) peak FLOP/s of one
  device for "bfloat16" or "float32" matmuls, or None when unknown (CPUs, unlisted
  devices). ``device_kind`` is ``jax.devices()[0].device_kind``.
- ``mfu(flops, seconds, peak, n_devices)``: flops / (seconds * peak * n_devices).

The "float32" peak is that of JAX's default matmul precision (``jax.lax.Precision``
docstring: "DEFAULT ... On TPU: performs float32 computations in bfloat16. On GPU: uses
tensorfloat32 if available (e.g. on A100 and H100 GPUs), otherwise standard float32
(e.g. on V100 GPUs)"): the TF32 tensor-core peak on Ampere/Ada/Hopper GPUs, the FP32
peak on V100, the bfloat16 peak on TPUs. Under ``jax.default_matmul_precision
("highest")`` the float32 MFU is therefore understated (TPU: ~6 bf16 passes; GPU: the
non-tensor-core FP32 peak applies, e.g. 19.5 TFLOP/s on A100).

Sources (vendor datasheets; NVIDIA quotes sparse tensor figures, halved here for dense):
  A100 (SXM4 and PCIe): "NVIDIA A100 Tensor Core GPU" datasheet: BF16 312, TF32 156.
  H100 SXM: "NVIDIA H100 Tensor Core GPU" datasheet: BF16 1,979*, TF32 989* (*sparse).
  H100 PCIe: same datasheet: BF16 1,513*, TF32 756*.  H100 NVL: BF16 1,671*, TF32 835*.
  H200 (SXM): "NVIDIA H200 Tensor Core GPU" datasheet: BF16 1,979*, TF32 989*.
  H200 NVL: same datasheet: BF16 1,671*, TF32 835*.
  L4: "NVIDIA L4 Tensor Core GPU" datasheet: BF16 242*, TF32 120*.
  V100 SXM2 / PCIe: "NVIDIA Tesla V100 GPU" datasheet: FP32 15.7 / 14 (no BF16 tensor
    cores: bfloat16 peak unknown, None).
  TPU v4 (275), v5e (197), v5p (459), v6e / Trillium (918) bf16 TFLOP/s per chip:
    Google Cloud TPU documentation, "TPU v4", "TPU v5e", "TPU v5p", "TPU v6e" system
    architecture pages. JAX exposes one device per chip on these (megacore on v4/v5p);
    their device_kind strings are "TPU v4", "TPU v5 lite" (v5e), "TPU v5" (v5p) and
    "TPU v6 lite" (v6e), as JAX's Pallas TPU chip-version table spells them.
"""
from __future__ import annotations

import math
import re
from typing import Any, Sequence

T = 1e12
# (pattern matched against the lower-cased device_kind, {dtype: FLOP/s}), first match wins.
PEAK_FLOPS: tuple[tuple[str, dict[str, float | None]], ...] = (
    (r"a100", {"bfloat16": 312 * T, "float32": 156 * T}),
    (r"h100.*(pcie)", {"bfloat16": 1513 / 2 * T, "float32": 756 / 2 * T}),
    (r"h100.*nvl", {"bfloat16": 1671 / 2 * T, "float32": 835 / 2 * T}),
    (r"h100", {"bfloat16": 1979 / 2 * T, "float32": 989 / 2 * T}),  # SXM ("H100 80GB HBM3")
    (r"h200.*nvl", {"bfloat16": 1671 / 2 * T, "float32": 835 / 2 * T}),
    (r"h200", {"bfloat16": 1979 / 2 * T, "float32": 989 / 2 * T}),
    (r"\bl4\b", {"bfloat16": 242 / 2 * T, "float32": 120 / 2 * T}),
    (r"v100.*pcie", {"bfloat16": None, "float32": 14 * T}),
    (r"v100", {"bfloat16": None, "float32": 15.7 * T}),
    (r"^tpu v4$", {"bfloat16": 275 * T, "float32": 275 * T}),  # not "TPU v4 lite" (v4i)
    (r"^tpu v5( lite|e)$", {"bfloat16": 197 * T, "float32": 197 * T}),
    (r"^tpu v5p?$", {"bfloat16": 459 * T, "float32": 459 * T}),
    (r"^tpu v6( lite|e)$", {"bfloat16": 918 * T, "float32": 918 * T}),
)
DTYPES = ("float32", "bfloat16")


def step_flops(compiled: Any) -> float | None:
    """FLOPs of one call of a compiled JAX function (per device for SPMD programs).

    ``compiled``: ``jax.jit(f).lower(*args).compile()``. None when the backend gives no
    cost analysis.
    """
    try:
        cost = compiled.cost_analysis()
    except NotImplementedError:
        return None
    if isinstance(cost, (list, tuple)):  # older jaxlib: one dict per program
        cost = cost[0] if cost else None
    if not cost or "flops" not in cost:
        return None
    return float(cost["flops"])


def device_peak_flops(device_kind: str, dtype: str) -> float | None:
    """Dense peak FLOP/s of one device of ``device_kind`` for ``dtype`` matmuls, or None.

    ``device_kind``: e.g. ``jax.devices()[0].device_kind`` ("NVIDIA H100 80GB HBM3",
    "TPU v5 lite", "cpu"); ``dtype``: "float32" or "bfloat16".
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    kind = device_kind.strip().lower()
    for pattern, peaks in PEAK_FLOPS:
        if re.search(pattern, kind):
            return peaks[dtype]
    return None


def mfu(flops: float | None, seconds: float, peak: float | None,
        n_devices: int = 1) -> float | None:
    """Model FLOPs utilisation flops / (seconds * peak * n_devices), or None if unknown.

    ``flops``: the whole step's FLOPs (all devices); ``peak``: one device's FLOP/s.
    """
    if flops is None or peak is None:
        return None
    if not (seconds > 0 and n_devices >= 1 and peak > 0):
        raise ValueError(f"mfu: need seconds > 0, peak > 0, n_devices >= 1; got "
                         f"{seconds}, {peak}, {n_devices}")
    return flops / (seconds * peak * n_devices)


def format_mfu(value: float | None) -> str:
    """"12.3%" or "-" when unknown."""
    return "-" if value is None or math.isnan(value) else f"{100 * value:.1f}%"


def median_run_seconds(compiled: Any, args: Sequence[Any], repeats: int, *,
                       donated: bool = False) -> float:
    """Median seconds of ``repeats`` runs of ``compiled(*args)`` after one untimed run.

    ``donated``: the first argument is donated, so every run takes the previous run's
    first output in its place (a train step's state, an in-place update).
    """
    import time

    import jax
    import numpy as np

    if repeats < 1:
        raise ValueError(f"median_run_seconds: need repeats >= 1, got {repeats}")
    args = list(args)

    def call():
        out = jax.block_until_ready(compiled(*args))
        if donated:
            args[0] = out[0]

    call()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def measure_matmul_rate(n: int = 4096, dtype: Any = None, repeats: int = 5,
                        device: Any = None) -> float:
    """Measured FLOP/s of one jitted (n, n) x (n, n) matmul on ``device`` (default: the
    first device): 2 n^3 / the median of ``repeats`` timed runs after one warm-up.

    A stand-in peak where ``device_peak_flops`` knows none (CPUs): the rate of the
    backend's own best-shaped GEMM, so ``flops / rate`` is the time a step would take if
    every FLOP ran as fast as a large square matmul.
    """
    import jax
    import jax.numpy as jnp

    if n < 1 or repeats < 1:
        raise ValueError(f"measure_matmul_rate: need n >= 1 and repeats >= 1, got {n}, {repeats}")
    device = device or jax.devices()[0]
    dtype = jnp.float32 if dtype is None else dtype
    a = jax.device_put(jnp.ones((n, n), dtype) / n, device)
    f = jax.jit(lambda x: x @ x).lower(a).compile()
    return 2.0 * n**3 / median_run_seconds(f, (a,), repeats)


def measure_copy_bandwidth(nbytes: int = 256 << 20, repeats: int = 5,
                           device: Any = None) -> float:
    """Measured bytes/s of a jitted in-place (donated) elementwise x <- x / 2 + 1 over
    ``nbytes`` of float32, read + write counted: the memory bandwidth an in-place
    memory-bound update, such as a donated optimiser step, can reach."""
    import jax
    import jax.numpy as jnp

    if nbytes < 4 or repeats < 1:
        raise ValueError(f"measure_copy_bandwidth: need nbytes >= 4 and repeats >= 1, "
                         f"got {nbytes}, {repeats}")
    device = device or jax.devices()[0]
    x = jax.device_put(jnp.ones((nbytes // 4,), jnp.float32), device)
    f = jax.jit(lambda v: (0.5 * v + 1.0,), donate_argnums=0).lower(x).compile()
    return 2.0 * (nbytes // 4) * 4 / median_run_seconds(f, (x,), repeats, donated=True)


ADAM_WORDS_PER_PARAM = 7  # Adam's update reads p, g, m, v and writes p, m, v


def step_time_floor(flops: float, matmul_rate: float, n_params: int, bandwidth: float,
                    bytes_per_word: int = 4,
                    words_per_param: int = ADAM_WORDS_PER_PARAM) -> float:
    """An estimate of the fastest train step a device allows, in seconds: every FLOP at
    ``matmul_rate`` FLOP/s (XLA's count, elementwise work included) plus the optimiser's
    parameter traffic (``words_per_param`` words per parameter, Adam's by default) at
    ``bandwidth`` bytes/s.

    The sum assumes the two parts do not overlap (a tensor's update needs its finished
    gradient); a step below it would have to run operations faster than the best
    square GEMM or stream memory faster than a plain elementwise pass.
    """
    if not (flops >= 0 and matmul_rate > 0 and n_params >= 0 and bandwidth > 0):
        raise ValueError(f"step_time_floor: need flops >= 0, matmul_rate > 0, "
                         f"n_params >= 0, bandwidth > 0; got {flops}, {matmul_rate}, "
                         f"{n_params}, {bandwidth}")
    return flops / matmul_rate + n_params * words_per_param * bytes_per_word / bandwidth
