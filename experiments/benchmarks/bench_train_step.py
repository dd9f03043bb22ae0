"""Train-step throughput of VT-ADL (Mishra et al. 2021) variants, after compilation.

Every measurement runs in its own subprocess so that the host device count
(XLA_FLAGS=--xla_force_host_platform_device_count=N, read when JAX starts) can differ:

- "paper": batch 8 of 512x512x3, K 150, the code's decoder, 1 device; on a CPU a step
  takes seconds (9.2 s in float32 on the project's 2 cores, 121 s before the sub-pixel
  decoder), so it is compiled ahead of time and a single step is timed, without warm-up;
- "mnist": batch 64 of 28x28x1, on 1 and on 8 host devices (data-parallel
  ``shard_map``; on a CPU the 8 "devices" share the same cores, so this measures the
  overhead of the data-parallel path rather than a speed-up).

Every case runs in both compute dtypes (``DTYPES``: float32 and bfloat16 mixed
precision, the model's ``dtype`` field). Each row also gives the step's FLOPs from XLA's
cost analysis of the compiled step (all devices: the per-device figure of the
partitioned program times the device count), the achieved TFLOP/s, the MFU against
the device's dense peak (``vtadl_jax.train.flops``; "-" where the peak is unknown, as
for CPUs) and the utilisation of the GEMM rate measured in the same process
("GEMM util": a square matmul in the step's compute dtype, 4096 on a CPU, 8192 on an
accelerator, timed with ``measure_matmul_rate``; the denominator is that rate times the
device count, or the rate alone for host CPU "devices", which share one machine's
cores). It is known everywhere, and on an accelerator it shows how far a step is from
what the device's own best GEMM reaches, which is below its datasheet peak. On an
accelerator (detected in a subprocess) ``ACCELERATOR_CASES`` replace ``CASES``: the
paper config at batch 8 and 32 and mnist at batch 64, on one device.

Usage: ``python experiments/benchmarks/bench_train_step.py`` (or ``run()``); a single
case: ``--case mnist --devices 8 --batch 64 --steps 20 --dtype bfloat16`` prints one
JSON line.
"""
from __future__ import annotations

if __name__ == "__main__":  # first, before jax loads: huge-page malloc (vtadl_jax.hostmem)
    from vtadl_jax.hostmem import reexec_with_hugepage_malloc

    reexec_with_hugepage_malloc()

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

CASES = (  # (variant, devices, global batch, timed steps, warm-up steps)
    ("mnist", 1, 64, 20, 1),
    ("mnist", 8, 64, 20, 1),
    ("paper", 1, 8, 1, 0),
    ("tiny", 1, 8, 50, 2),
)
ACCELERATOR_CASES = (
    ("mnist", 1, 64, 50, 3),
    ("paper", 1, 8, 20, 3),
    ("paper", 1, 32, 10, 3),
)
DTYPES = ("float32", "bfloat16")


def measure(variant: str, batch: int, steps: int, warmup: int = 1,
            dtype: str = "float32") -> dict:
    """Compile the train step ahead of time, run ``warmup`` steps, then time ``steps``."""
    import jax
    import numpy as np

    from vtadl_jax.models.variants import get_variant
    from vtadl_jax.train.flops import device_peak_flops, measure_matmul_rate, mfu, step_flops
    from vtadl_jax.train.optim import make_optimizer
    from vtadl_jax.train.state import create_train_state
    from vtadl_jax.train.step import LossConfig, make_mesh, make_train_step, replicate, shard_batch

    model, tx = get_variant(variant, dtype=dtype), make_optimizer(1e-4, 1e-4)
    mesh = make_mesh()
    shape = (*model.image_size, model.channels)
    images = np.random.default_rng(0).uniform(-1, 1, (batch, *shape)).astype(np.float32)
    t0 = time.perf_counter()
    state = replicate(create_train_state(model, tx, 0, shape), mesh)
    jax.block_until_ready(state)
    init_s = time.perf_counter() - t0
    step = make_train_step(model, tx, LossConfig(), mesh)
    x = shard_batch(images, mesh)
    t0 = time.perf_counter()
    step = step.lower(state, x).compile()
    compile_s = time.perf_counter() - t0
    per_device = step_flops(step)
    flops = None if per_device is None else per_device * mesh.size
    for _ in range(warmup):
        state, m = step(state, x)
    jax.block_until_ready(state)
    t0 = time.perf_counter()
    for _ in range(steps):
        state, m = step(state, x)
    jax.block_until_ready(m)
    step_s = (time.perf_counter() - t0) / steps
    kind = jax.devices()[0].device_kind
    platform = jax.devices()[0].platform
    peak = device_peak_flops(kind, dtype)
    util = mfu(flops, step_s, peak, mesh.size)
    del state, x  # the GEMM below gets the device to itself
    gemm_rate = measure_matmul_rate(4096 if platform == "cpu" else 8192, dtype,
                                    repeats=5 if platform == "cpu" else 20)
    gemm_util = mfu(flops, step_s, gemm_rate, 1 if platform == "cpu" else mesh.size)
    return {"variant": variant, "devices": mesh.size, "batch": batch, "timed_steps": steps,
            "platform": platform, "init_s": round(init_s, 2),
            "compile_s": round(compile_s, 2), "step_s": round(step_s, 4),
            "images_per_s": round(batch / step_s, 2), "loss": float(m["loss"]),
            "dtype": dtype, "device_kind": kind,
            "gflops_per_step": None if flops is None else round(flops / 1e9, 2),
            "achieved_tflops": None if flops is None else round(flops / step_s / 1e12, 4),
            "peak_tflops": None if peak is None else round(peak / 1e12, 1),
            "mfu": None if util is None else round(util, 4),
            "gemm_tflops": round(gemm_rate / 1e12, 4),
            "gemm_util": None if gemm_util is None else round(gemm_util, 4)}


def run_case(variant: str, devices: int, batch: int, steps: int, warmup: int = 1,
             timeout: float = 900, dtype: str = "float32") -> dict:
    """``measure`` in a subprocess; devices > 1 means that many host CPU devices,
    devices == 1 the default platform (an accelerator when there is one)."""
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    if devices > 1:  # host "devices" exist on the CPU platform only
        env["JAX_PLATFORMS"] = "cpu"
    cmd = [sys.executable, os.path.abspath(__file__), "--case", variant, "--devices",
           str(devices), "--batch", str(batch), "--steps", str(steps), "--warmup", str(warmup), "--dtype", dtype]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if out.returncode:
        raise RuntimeError(f"benchmark case {variant}/{devices} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def default_platform() -> str:
    """JAX's default backend, asked in a subprocess (this process never starts JAX, so
    an accelerator's memory stays free for the measuring subprocesses)."""
    out = subprocess.run([sys.executable, "-c", "import jax; print(jax.default_backend())"],
                         capture_output=True, text=True, timeout=300)
    return out.stdout.strip().splitlines()[-1] if out.returncode == 0 and out.stdout else "cpu"


def run(cases=None, dtypes=DTYPES) -> list[dict]:
    """Run every case in every dtype and print a table; return the result dicts.

    ``cases`` default: ``CASES`` on a CPU host, ``ACCELERATOR_CASES`` otherwise."""
    from vtadl_jax.train.flops import format_mfu

    if cases is None:
        cases = CASES if default_platform() == "cpu" else ACCELERATOR_CASES
    results = []
    for variant, devices, batch, steps, warmup in cases:
        for dtype in dtypes:
            r = run_case(variant, devices, batch, steps, warmup, dtype=dtype)
            results.append(r)
            gflops = "-" if r["gflops_per_step"] is None else f"{r['gflops_per_step']:.1f}"
            tflops = "-" if r["achieved_tflops"] is None else f"{r['achieved_tflops']:.3f}"
            print(f"{r['variant']:6s} {dtype:8s} devices={r['devices']} batch={r['batch']:3d} "
                  f"[{r['platform']}] compile {r['compile_s']:7.2f}s  "
                  f"step {r['step_s']:8.4f}s  {r['images_per_s']:9.2f} images/s  "
                  f"{gflops} GFLOP/step  {tflops} TFLOP/s  MFU {format_mfu(r['mfu'])}  "
                  f"GEMM util {format_mfu(r['gemm_util'])} of {r['gemm_tflops']:.3f} TFLOP/s "
                  f"({r['timed_steps']} timed steps)", flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", choices=("paper", "mnist", "tiny"))
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--dtype", choices=DTYPES, default="float32",
                        help="compute dtype of the model (parameters stay float32)")
    args = parser.parse_args()
    if args.case is None:
        run()
        return
    print(json.dumps(measure(args.case, args.batch, args.steps, args.warmup, args.dtype)))


if __name__ == "__main__":
    main()
