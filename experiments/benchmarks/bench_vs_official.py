"""Train-step time of the authors' PyTorch VT-ADL code against ours, in one run.

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
step of each implementation per round, after ``--warmup`` untimed rounds) at every batch
size, with torch's intra-op threads set to the CPU count JAX uses and its idle OpenMP
threads sleeping (``OMP_WAIT_POLICY=PASSIVE`` unless set: spin-waiting threads would take
the cores from the step that follows them in the round). By default
(``--isolation process``) each implementation lives in its own spawned process, as a
user runs it: two runtimes in one process share a malloc heap and compete with their
thread pools, which slowed both sides by amounts that varied between runs; the idle
processes wait on a pipe, so a round still times one step at a time on a quiet machine.
``--isolation shared`` keeps the earlier all-in-one-process timing.

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

if __name__ == "__main__":  # first, before jax loads: huge-page malloc (vtadl_jax.hostmem)
    from vtadl_jax.hostmem import reexec_with_hugepage_malloc

    reexec_with_hugepage_malloc()

OUT = os.path.join(ROOT, "experiments", "results", "bench")
NEEDED = ("VT_AE.py", "mdn1.py", "pytorch_ssim/__init__.py", "student_transformer.py",
          "spatial.py", "model_res18.py", "config.py")


def official_step(path: str, batch: int, threads: int):
    """(step() -> loss, parameter count, {}) of the authors' training step on CPU, on a
    fixed batch of ``batch`` uniform [-1, 1] 512x512 images (the same as ours get)."""
    import importlib.util

    import numpy as np
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
    j = torch.from_numpy(np.ascontiguousarray(_images(batch).transpose(0, 3, 1, 2)))

    def step():
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
    return step, n, {}


def our_step(case: str, batch: int):
    """(step() -> loss, parameter count, {"flops": XLA's FLOPs of the compiled step}) of our
    jitted step for ``case`` on the same fixed batch as ``official_step`` (put on the
    device inside the timed step, as before)."""
    import jax

    from experiments.benchmarks.vtadl_cases import build_case
    from vtadl_jax.train.flops import step_flops
    from vtadl_jax.train.state import count_params, create_train_state
    from vtadl_jax.train.step import make_mesh, make_train_step, shard_batch

    model, tx, loss_cfg = build_case(case)
    mesh = make_mesh(jax.devices()[:1])
    holder = {"state": create_train_state(
        model, tx, 0, (*model.image_size, model.channels),
        sharding=jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))}
    images = _images(batch)
    fn = make_train_step(model, tx, loss_cfg, mesh).lower(
        holder["state"], shard_batch(images, mesh)).compile()  # donates the state

    def step():
        holder["state"], m = fn(holder["state"], shard_batch(images, mesh))
        return float(m["loss"])

    return step, count_params(holder["state"].params), {"flops": step_flops(fn)}


def _images(batch: int):
    import numpy as np

    return np.random.default_rng(0).uniform(-1, 1, (batch, 512, 512, 3)).astype(np.float32)


class _InProcess:
    """An implementation's step built and run in this process."""

    def __init__(self, factory, args):
        self._step, self.params, self.info = factory(*args)

    def step(self) -> tuple[float, float]:
        t0 = time.perf_counter()
        loss = self._step()
        return time.perf_counter() - t0, loss

    def close(self) -> None:
        self._step = None


def _serve(conn, factory, args) -> None:
    """Worker process: build the step, then run one timed step per request until None."""
    try:
        step, params, info = factory(*args)
        conn.send(("ready", params, info))
        while conn.recv() is not None:
            t0 = time.perf_counter()
            loss = step()
            conn.send(("step", time.perf_counter() - t0, loss))
    except EOFError:  # the parent is gone: nothing to report to
        pass
    except BaseException as e:  # reported to the parent, which names the implementation
        try:
            conn.send(("error", f"{type(e).__name__}: {e}", None))
        except OSError:  # the parent is gone too
            pass
    finally:
        conn.close()


class _InWorker:
    """An implementation's step built and run in its own (spawned) process; the parent
    only asks for steps, so the idle implementations' processes sleep on a pipe."""

    def __init__(self, name: str, factory, args):
        import multiprocessing

        ctx = multiprocessing.get_context("spawn")
        self.name = name
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=_serve, args=(child, factory, args), daemon=True)
        self._proc.start()
        child.close()
        _, self.params, self.info = self._reply("ready")

    def _reply(self, kind: str):
        try:
            msg = self._conn.recv()
        except EOFError:
            self._proc.join(5)
            raise RuntimeError(f"{self.name}: worker process died "
                               f"(exit code {self._proc.exitcode})") from None
        if msg[0] == "error":
            raise RuntimeError(f"{self.name}: {msg[1]}")
        assert msg[0] == kind, msg
        return msg

    def step(self) -> tuple[float, float]:
        self._conn.send(True)
        _, dt, loss = self._reply("step")
        return dt, loss

    def close(self) -> None:
        try:
            self._conn.send(None)
        except (BrokenPipeError, OSError):
            pass
        self._proc.join(30)
        if self._proc.is_alive():
            self._proc.kill()
        self._conn.close()


def interleave(factories: dict, rounds: int, warmup: int = 1, isolation: str = "process",
               log=print) -> dict:
    """{name: (times_s, params, info)}: every implementation's step timed in interleaved
    rounds (one step of each per round; the first ``warmup`` rounds untimed).

    ``factories``: {name: (factory, args)}, ``factory(*args) -> (step() -> loss, params,
    info)`` a module-level function. ``isolation="process"``: each implementation runs in
    its own spawned process (its own allocator, thread pools and OpenMP runtime; the idle
    ones wait on a pipe), ``"shared"``: all in this process."""
    if isolation not in ("process", "shared"):
        raise ValueError(f"isolation {isolation!r}: expected 'process' or 'shared'")
    runners = {}
    try:
        for name, (factory, args) in factories.items():
            runners[name] = (_InWorker(name, factory, args) if isolation == "process"
                             else _InProcess(factory, args))
        times: dict[str, list[float]] = {name: [] for name in runners}
        for r in range(rounds + warmup):  # warm-up rounds first (compilation, allocator)
            for name, runner in runners.items():
                dt, loss = runner.step()
                if r >= warmup:
                    times[name].append(dt)
                log(f"round {r} {name:12s} {dt:8.3f} s  loss {loss:.5g}")
        return {name: (times[name], runner.params, runner.info)
                for name, runner in runners.items()}
    finally:
        for runner in runners.values():
            runner.close()


def run(official: str, batches=(2, 8), rounds: int = 3, cases=("code", "paper"),
        warmup: int = 1, on_batch=None, isolation: str = "process", threads: int = 0,
        rates: dict | None = None) -> list[dict]:
    """One row per implementation and batch size; ``on_batch(rows)`` after every batch size.
    ``threads``: torch's intra-op threads (0: the CPU count, what XLA:CPU uses).
    ``rates``: {"matmul_flops_per_s", "bandwidth_bytes_per_s"} measured on this machine:
    each of our rows then gets ``floor_s`` (``train.flops.step_time_floor`` of its XLA
    FLOPs and parameters) and ``official_over_floor``, the best ratio these FLOPs allow."""
    from vtadl_jax.train.flops import step_time_floor

    threads = threads or os.cpu_count()
    rows = []
    for batch in batches:
        factories = {"official": (official_step, (official, batch, threads))}
        factories.update({f"ours ({c})": (our_step, (c, batch)) for c in cases})
        timed = interleave(factories, rounds, warmup, isolation,
                           log=lambda line, b=batch: print(f"batch {b} {line}", flush=True))
        ref = statistics.median(timed["official"][0])
        for name, (times, n_params, info) in timed.items():
            med = statistics.median(times)
            row = dict(batch=batch, impl=name, params=n_params, median_s=round(med, 3),
                       times_s=[round(t, 3) for t in times],
                       official_over_impl=round(ref / med, 3),
                       images_per_s=round(batch / med, 3))
            if rates and info.get("flops") is not None:
                floor = step_time_floor(info["flops"], rates["matmul_flops_per_s"], n_params,
                                        rates["bandwidth_bytes_per_s"])
                row.update(gflop=round(info["flops"] / 1e9, 2), floor_s=round(floor, 3),
                           official_over_floor=round(ref / floor, 3))
            rows.append(row)
        if on_batch is not None:
            on_batch(rows)
    return rows


def malloc_note() -> str:
    """How malloc ran (``vtadl_jax.hostmem``: glibc's huge-page tunable, or jemalloc under
    ``VTADL_JAX_MALLOC=jemalloc``): it changes both sides' times."""
    from vtadl_jax.hostmem import TUNABLE

    preload = [p for p in (os.environ.get("LD_PRELOAD") or "").split(":") if "jemalloc" in p]
    if preload:
        return (f"jemalloc ({os.path.basename(preload[0])} preloaded, "
                f"MALLOC_CONF={os.environ.get('MALLOC_CONF', '')})")
    if TUNABLE in (os.environ.get("GLIBC_TUNABLES") or ""):
        return f"malloc with transparent huge pages (GLIBC_TUNABLES={TUNABLE})"
    return "default malloc (no huge pages)"


def write(rows: list[dict], out_dir: str, meta: dict) -> None:
    from vtadl_jax.records import write_json_atomic, write_text_atomic

    write_json_atomic({"meta": meta, "rows": rows}, os.path.join(out_dir, "vs_official.json"))
    lines = ["# VT-ADL train step: the authors' PyTorch code vs ours", "",
             f"{meta['note']}", "",
             "| batch | implementation | parameters | median s/step | official / this "
             "| images/s | GFLOP (XLA) | floor s | official / floor | rounds (s) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        extra = [f"{r['gflop']:.1f}", f"{r['floor_s']:.3f}", f"{r['official_over_floor']:.2f}"
                 ] if "floor_s" in r else ["-", "-", "-"]
        lines.append(f"| {r['batch']} | {r['impl']} | {r['params']:,} | {r['median_s']:.3f} | "
                     f"{r['official_over_impl']:.2f} | {r['images_per_s']:.2f} | "
                     + " | ".join(extra) + " | "
                     f"{', '.join(f'{t:.2f}' for t in r['times_s'])} |")
    if "rates" in meta:
        lines += ["", f"Floor (`vtadl_jax.train.flops.step_time_floor`): XLA's FLOPs at this "
                  f"machine's measured {meta['rates']['matmul_flops_per_s'] / 1e9:.0f} GFLOP/s "
                  f"({meta['rates']['matmul_n']}^2 float32 matmul) plus Adam's 7 words per "
                  f"parameter at the measured "
                  f"{meta['rates']['bandwidth_bytes_per_s'] / 1e9:.1f} GB/s (elementwise pass "
                  f"over 256 MiB), measured before the rounds; 'official / floor' is the "
                  f"largest ratio that step could reach here."]
    write_text_atomic("\n".join(lines) + "\n", os.path.join(out_dir, "vs_official.md"))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--official", help="checkout of github.com/pankajmishra000/VT-ADL")
    parser.add_argument("--batch", type=int, nargs="+", default=[2, 8])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1,
                        help="untimed rounds first (compilation, allocator settling)")
    parser.add_argument("--cases", nargs="+", choices=("code", "paper"), default=["code", "paper"])
    parser.add_argument("--isolation", choices=("process", "shared"), default="process",
                        help="process (default): each implementation in its own process; "
                             "shared: all in this one")
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
    import importlib.metadata
    import importlib.util

    if importlib.util.find_spec("torch") is None:
        print("bench_vs_official: skipped (torch is not installed)")
        return 0
    # Idle OpenMP threads of torch sleep instead of spin-waiting: interleaved in one
    # process, spinning threads take the cores from the next implementation's step
    # (measured: ours 1.23 -> 1.03 s/step at batch 2). Read when torch loads libgomp;
    # inherited by the worker processes.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import jax

    platform = jax.devices()[0].platform
    threads = os.cpu_count() if platform == "cpu" else 1
    torch_version = importlib.metadata.version("torch")
    from vtadl_jax.train.flops import measure_copy_bandwidth, measure_matmul_rate

    rates = dict(matmul_n=4096, matmul_flops_per_s=measure_matmul_rate(4096),
                 bandwidth_bytes_per_s=measure_copy_bandwidth(256 << 20))
    print(f"this machine: {rates['matmul_flops_per_s'] / 1e9:.0f} GFLOP/s (4096^2 f32 "
          f"matmul), {rates['bandwidth_bytes_per_s'] / 1e9:.1f} GB/s", flush=True)
    where = ("each implementation in its own process (idle ones wait on a pipe)"
             if args.isolation == "process" else "all implementations in one process")
    meta = dict(platform=platform, cpu_count=os.cpu_count(), torch=torch_version,
                jax=jax.__version__, torch_threads=threads, rounds=args.rounds,
                warmup=args.warmup, isolation=args.isolation, rates=rates,
                note=(f"512x512x3, {args.rounds} interleaved rounds after {args.warmup} "
                      f"warm-up round(s), {where}; "
                      f"torch {torch_version} with {threads} threads, "
                      f"jax {jax.__version__} on {platform} "
                      f"({os.cpu_count()} CPUs); {malloc_note()}, the same for both; "
                      f"torch's idle threads: OMP_WAIT_POLICY="
                      f"{os.environ.get('OMP_WAIT_POLICY')}. "
                      f"'official / this' > 1: this one is faster."),
                omp_wait_policy=os.environ.get("OMP_WAIT_POLICY"),
                glibc_tunables=os.environ.get("GLIBC_TUNABLES"))
    try:
        rows = run(args.official, tuple(args.batch), args.rounds, tuple(args.cases),
                      args.warmup, on_batch=lambda rows: write(rows, args.out, meta),
                      isolation=args.isolation, threads=threads, rates=rates)
    except RuntimeError as e:  # a worker failed: name it, keep what was written
        print(f"error: {e}", file=sys.stderr)
        return 1
    for r in rows:
        floor = (f"  floor {r['floor_s']:.3f} s, official/floor {r['official_over_floor']:.2f}"
                 if "floor_s" in r else "")
        print(f"batch {r['batch']} {r['impl']:12s} {r['median_s']:8.3f} s/step  "
              f"official/this {r['official_over_impl']:.2f}{floor}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
