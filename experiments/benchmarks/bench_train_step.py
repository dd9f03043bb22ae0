"""Train-step throughput of VT-ADL (Mishra et al. 2021) variants, after compilation.

Every measurement runs in its own subprocess so that the host device count
(XLA_FLAGS=--xla_force_host_platform_device_count=N, read when JAX starts) can differ:

- "paper": batch 8 of 512x512x3, K 150, the code's decoder, 1 device; on a CPU a step
  takes about two minutes (measured: 121 s on 2 shared cores), so it is compiled ahead
  of time and a single step is timed, without warm-up;
- "mnist": batch 64 of 28x28x1, on 1 and on 8 host devices (data-parallel
  ``shard_map``; on a CPU the 8 "devices" share the same cores, so this measures the
  overhead of the data-parallel path rather than a speed-up).

Usage: ``python experiments/benchmarks/bench_train_step.py`` (or ``run()``); a single
case: ``--case mnist --devices 8 --batch 64 --steps 20`` prints one JSON line.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

CASES = (  # (variant, devices, global batch, timed steps, warm-up steps)
    ("mnist", 1, 64, 20, 1),
    ("mnist", 8, 64, 20, 1),
    ("paper", 1, 8, 1, 0),
)


def measure(variant: str, batch: int, steps: int, warmup: int = 1) -> dict:
    """Compile the train step ahead of time, run ``warmup`` steps, then time ``steps``."""
    import jax
    import numpy as np

    from vtadl_jax.models.variants import get_variant
    from vtadl_jax.train.optim import make_optimizer
    from vtadl_jax.train.state import create_train_state
    from vtadl_jax.train.step import LossConfig, make_mesh, make_train_step, replicate, shard_batch

    model, tx = get_variant(variant), make_optimizer(1e-4, 1e-4)
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
    for _ in range(warmup):
        state, m = step(state, x)
    jax.block_until_ready(state)
    t0 = time.perf_counter()
    for _ in range(steps):
        state, m = step(state, x)
    jax.block_until_ready(m)
    step_s = (time.perf_counter() - t0) / steps
    return {"variant": variant, "devices": mesh.size, "batch": batch, "timed_steps": steps,
            "platform": jax.devices()[0].platform, "init_s": round(init_s, 2),
            "compile_s": round(compile_s, 2), "step_s": round(step_s, 4),
            "images_per_s": round(batch / step_s, 2), "loss": float(m["loss"])}


def run_case(variant: str, devices: int, batch: int, steps: int, warmup: int = 1,
             timeout: float = 900) -> dict:
    """``measure`` in a subprocess; devices > 1 means that many host CPU devices,
    devices == 1 the default platform (an accelerator when there is one)."""
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    if devices > 1:  # host "devices" exist on the CPU platform only
        env["JAX_PLATFORMS"] = "cpu"
    cmd = [sys.executable, os.path.abspath(__file__), "--case", variant, "--devices",
           str(devices), "--batch", str(batch), "--steps", str(steps), "--warmup", str(warmup)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if out.returncode:
        raise RuntimeError(f"benchmark case {variant}/{devices} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def run(cases=CASES) -> list[dict]:
    """Run every case and print a table; return the result dicts."""
    results = []
    for variant, devices, batch, steps, warmup in cases:
        r = run_case(variant, devices, batch, steps, warmup)
        results.append(r)
        print(f"{r['variant']:6s} devices={r['devices']} batch={r['batch']:3d} "
              f"[{r['platform']}] compile {r['compile_s']:7.2f}s  "
              f"step {r['step_s']:8.4f}s  {r['images_per_s']:9.2f} images/s "
              f"({r['timed_steps']} timed steps)", flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", choices=("paper", "mnist", "tiny"))
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    args = parser.parse_args()
    if args.case is None:
        run()
        return
    print(json.dumps(measure(args.case, args.batch, args.steps, args.warmup)))


if __name__ == "__main__":
    main()
