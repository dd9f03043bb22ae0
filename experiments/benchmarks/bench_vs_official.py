"""Train-step time of the authors' PyTorch VT-ADL code against ours, in one process.

Mishra et al. 2021 (VT-ADL). ``--official PATH`` is a checkout of
github.com/pankajmishra000/VT-ADL (not part of this project; nothing of it is copied
here). Their modules are imported from PATH unchanged; the only adaptation is to the
device: ``Tensor.cuda`` / ``Module.cuda`` become no-ops so their code runs on the CPU,
and ``torchvision`` (imported by their ``model_res18`` for a ResNet that the decoder does
not use) is replaced by an empty module when it is not installed. Their step is built
as their ``train.py`` builds it: ``VT_AE(patch_size=64, train=True)``, ``mdn1.MDN()``,
``Adam(lr 1e-4, weight_decay 1e-4)`` over both, loss 5 MSE - 0.5 SSIM + MDN loss,
``model.zero_grad()``, backward, step.

Ours: the code-equivalent configuration ("code": routing projection, their MDN head with
K 10, attention scale D^-0.5, -SSIM) and the paper variant ("paper", K 150), each the
jitted data-parallel step on one device. Steps are timed in interleaved rounds (one
step of each implementation per round, after one warm-up step each) at every batch
size, with torch's intra-op threads set to the CPU count JAX uses and its idle OpenMP
threads sleeping (``OMP_WAIT_POLICY=PASSIVE`` unless set: spin-waiting threads would take
the cores from the step that follows them in the round).

    python experiments/benchmarks/bench_vs_official.py --official /tmp/vtadl_official

Without --official it prints why it skips and exits 0. Writes
experiments/results/bench/vs_official.{json,md}.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import types

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
OUT = os.path.join(ROOT, "experiments", "results", "bench")
NEEDED = ("VT_AE.py", "mdn1.py", "pytorch_ssim/__init__.py", "student_transformer.py",
          "spatial.py", "model_res18.py", "config.py")


def official_step(path: str, batch: int, threads: int):
    """(step(images) -> loss, parameter count) of the authors' training step on CPU."""
    import importlib.util

    import torch
    import torch.nn.functional as F

    torch.set_num_threads(threads)
    torch.Tensor.cuda = lambda self, *a, **k: self  # device calls only: stay on the CPU
    torch.nn.Module.cuda = lambda self, *a, **k: self
    if "torchvision" not in sys.modules and importlib.util.find_spec("torchvision") is None:
        # imported, never used, by their model_res18 (the decoder's module)
        stub = types.ModuleType("torchvision")
        stub.models = types.ModuleType("torchvision.models")
        sys.modules.update({"torchvision": stub, "torchvision.models": stub.models})
    sys.path.insert(0, path)
    import mdn1
    import pytorch_ssim
    from VT_AE import VT_AE

    torch.manual_seed(0)
    model, g_estimate = VT_AE(patch_size=64, train=True), mdn1.MDN()
    model.train()
    g_estimate.train()
    optimiser = torch.optim.Adam(list(model.parameters()) + list(g_estimate.parameters()),
                                 lr=1e-4, weight_decay=1e-4)
    ssim_loss = pytorch_ssim.SSIM()

    def step(j):
        model.zero_grad()  # as their train.py (the MDN's gradients are not zeroed there)
        vector, reconstructions = model(j)
        pi, mu, sigma = g_estimate(vector)
        loss = (5 * F.mse_loss(reconstructions, j, reduction="mean")
                - 0.5 * ssim_loss(j, reconstructions)
                + mdn1.mdn_loss_function(vector, mu, sigma, pi))
        loss.backward()
        optimiser.step()
        return float(loss.item())

    n = sum(p.numel() for m in (model, g_estimate) for p in m.parameters())
    return step, n


def our_step(case: str):
    """(step(images) -> loss, parameter count) of our jitted step for ``case``."""
    import jax

    from experiments.benchmarks.vtadl_cases import build_case
    from vtadl_jax.train.state import count_params, create_train_state
    from vtadl_jax.train.step import make_mesh, make_train_step, shard_batch

    model, tx, loss_cfg = build_case(case)
    mesh = make_mesh(jax.devices()[:1])
    holder = {"state": create_train_state(
        model, tx, 0, (*model.image_size, model.channels),
        sharding=jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))}
    fn = make_train_step(model, tx, loss_cfg, mesh)

    def step(images):
        holder["state"], m = fn(holder["state"], shard_batch(images, mesh))
        return float(m["loss"])

    return step, count_params(holder["state"].params)


def run(official: str, batches=(2, 8), rounds: int = 3, cases=("code", "paper"),
        warmup: int = 1, on_batch=None) -> list[dict]:
    """Interleaved timing; ``on_batch(rows)`` is called after every batch size."""
    import jax
    import numpy as np
    import torch

    threads = os.cpu_count() if jax.devices()[0].platform == "cpu" else 1
    rows = []
    for batch in batches:
        images = np.random.default_rng(0).uniform(-1, 1, (batch, 512, 512, 3)).astype(np.float32)
        timed = {"official": official_step(official, batch, threads)}
        timed.update({f"ours ({c})": our_step(c) for c in cases})
        inputs = {name: images for name in timed}
        inputs["official"] = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))
        times: dict[str, list[float]] = {name: [] for name in timed}
        for r in range(rounds + warmup):  # warm-up rounds first (compilation, allocator)
            for name, (step, _) in timed.items():
                t0 = time.perf_counter()
                loss = step(inputs[name])
                dt = time.perf_counter() - t0
                if r >= warmup:
                    times[name].append(dt)
                print(f"batch {batch} round {r} {name:12s} {dt:8.3f} s  loss {loss:.5g}",
                      flush=True)
        ref = statistics.median(times["official"])
        for name, (_, n_params) in timed.items():
            med = statistics.median(times[name])
            rows.append(dict(batch=batch, impl=name, params=n_params, median_s=round(med, 3),
                             times_s=[round(t, 3) for t in times[name]],
                             official_over_impl=round(ref / med, 3),
                             images_per_s=round(batch / med, 3)))
        if on_batch is not None:
            on_batch(rows)
    return rows


def malloc_note() -> str:
    """How glibc's malloc ran (``vtadl_jax.hostmem``): it changes both sides' times."""
    from vtadl_jax.hostmem import TUNABLE

    if TUNABLE in (os.environ.get("GLIBC_TUNABLES") or ""):
        return f"malloc with transparent huge pages (GLIBC_TUNABLES={TUNABLE})"
    return "default malloc (no huge pages)"


def write(rows: list[dict], out_dir: str, meta: dict) -> None:
    from vtadl_jax.records import write_json_atomic

    write_json_atomic({"meta": meta, "rows": rows}, os.path.join(out_dir, "vs_official.json"))
    lines = ["# VT-ADL train step: the authors' PyTorch code vs ours", "",
             f"{meta['note']}", "",
             "| batch | implementation | parameters | median s/step | official / this "
             "| images/s | rounds (s) |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['batch']} | {r['impl']} | {r['params']:,} | {r['median_s']:.3f} | "
                     f"{r['official_over_impl']:.2f} | {r['images_per_s']:.2f} | "
                     f"{', '.join(f'{t:.2f}' for t in r['times_s'])} |")
    tmp = os.path.join(out_dir, ".vs_official.md.tmp")
    with open(tmp, "w") as f:
        f.write("\n".join(lines) + "\n")
    os.replace(tmp, os.path.join(out_dir, "vs_official.md"))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--official", help="checkout of github.com/pankajmishra000/VT-ADL")
    parser.add_argument("--batch", type=int, nargs="+", default=[2, 8])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1,
                        help="untimed rounds first (compilation, allocator settling)")
    parser.add_argument("--cases", nargs="+", choices=("code", "paper"), default=["code", "paper"])
    parser.add_argument("--out", default=OUT)
    args = parser.parse_args(argv)
    if args.warmup < 1 or args.rounds < 1:
        print("error: --warmup and --rounds must be >= 1", file=sys.stderr)
        return 2
    if not args.official:
        print("bench_vs_official: skipped (no --official PATH to a checkout of "
              "github.com/pankajmishra000/VT-ADL given)")
        return 0
    missing = [f for f in NEEDED if not os.path.isfile(os.path.join(args.official, f))]
    if missing:
        print(f"error: --official {args.official}: not a VT-ADL checkout (missing "
              f"{', '.join(missing)})", file=sys.stderr)
        return 2
    # Idle OpenMP threads of torch sleep instead of spin-waiting: interleaved in one
    # process, spinning threads take the cores from the next implementation's step
    # (measured: ours 1.23 -> 1.03 s/step at batch 2). Read when torch loads libgomp.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    try:
        import torch
    except ImportError:
        print("bench_vs_official: skipped (torch is not installed)")
        return 0
    import jax

    meta = dict(platform=jax.devices()[0].platform, cpu_count=os.cpu_count(),
                torch=torch.__version__, jax=jax.__version__,
                torch_threads=torch.get_num_threads(), rounds=args.rounds,
                warmup=args.warmup,
                note=(f"512x512x3, {args.rounds} interleaved rounds after {args.warmup} "
                      f"warm-up round(s); "
                      f"torch {torch.__version__} with {torch.get_num_threads()} threads, "
                      f"jax {jax.__version__} on {jax.devices()[0].platform} "
                      f"({os.cpu_count()} CPUs); {malloc_note()}, the same for both in this "
                      f"process; torch's idle threads: OMP_WAIT_POLICY="
                      f"{os.environ.get('OMP_WAIT_POLICY')}. "
                      f"'official / this' > 1: this one is faster."),
                omp_wait_policy=os.environ.get("OMP_WAIT_POLICY"),
                glibc_tunables=os.environ.get("GLIBC_TUNABLES"))
    rows = run(args.official, tuple(args.batch), args.rounds, tuple(args.cases), args.warmup,
               on_batch=lambda rows: write(rows, args.out, meta))
    for r in rows:
        print(f"batch {r['batch']} {r['impl']:12s} {r['median_s']:8.3f} s/step  "
              f"official/this {r['official_over_impl']:.2f}")
    return 0


if __name__ == "__main__":
    from vtadl_jax.hostmem import reexec_with_hugepage_malloc

    reexec_with_hugepage_malloc()  # huge-page malloc for XLA:CPU (see vtadl_jax.hostmem)
    sys.exit(main())
