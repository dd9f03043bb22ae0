"""VT-ADL with many Gaussians: cost and quality of the density head vs K (Mishra et al.
2021, Fig. 4; the authors' README ablation: PRO 0.764 at K=10, 0.937 at K=150, 0.935 at
K=200).

    python experiments/sweep_k.py --out experiments/results/k_sweep

(a) cost, for every K in --cost-ks and every head path in --paths:
    - "unchunked": the head outputs (B, N, K, D) means and scales, ``mixture_nll`` on them
      (loss.k_chunk=None, loss.fused_head=False);
    - "fused": ``mixture_nll_from_head`` builds the means and scales chunk by chunk from
      the head's weights inside a ``lax.scan`` (loss.fused_head=True,
      loss.k_chunk=min(--k-chunk, K)), so no (B, N, K, D) tensor exists;
    - "chunked" (optional): head outputs materialised, NLL reduced in chunks of --k-chunk.
    The jitted data-parallel train step (``train.step.make_train_step``) of the model of
    ``experiments/configs/vtadl_synthetic.py`` (64x64x3, patch 8 -> N = 64 patches, D = 64,
    batch 8) is compiled ahead of time; its compiled memory (XLA ``memory_analysis``:
    temp + arguments + outputs - aliased (donated state), deterministic) is recorded,
    then, when that is below --mem-limit-gb, one warm-up step runs and the median of
    --cost-steps timed steps is the step time. Above the limit the configuration is
    compiled but not run (its memory is still reported).
(b) quality: the same short training (--steps optimiser steps, same seed, lr 1e-3 as the
    synthetic config) on the generated MVTec-layout set for each K in --ks, then AUPRO /
    pixel AUROC / image AUROC on its test split; and, with --mnist-ks, one-class MNIST
    digit --mnist-digit (the "mnist" variant, reconstruction-only image score, so K acts
    only through training) with --mnist-steps steps on the first --mnist-max-examples
    examples of each split.
Every unit is cached in <out>/runs/<key>.json (runner.cached): a rerun resumes.
Outputs: table.md/.csv (quality), cost.md/.csv, cost_vs_k.png, quality_vs_k.png.
"""
from __future__ import annotations

import dataclasses
import functools
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

if __name__ == "__main__":  # first, before jax loads: huge-page malloc (vtadl_jax.hostmem)
    from vtadl_jax.hostmem import reexec_with_hugepage_malloc

    reexec_with_hugepage_malloc()

from experiments import runner  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
# The authors' README ablation (METHODS.md part A): PRO vs K (their "PRO" is pixel AUROC
# in the code). Full-size MVTec AD, 400 epochs: not comparable in level to a short run on
# the generated set, only in shape.
PAPER_PRO_VS_K = {10: 0.764, 150: 0.937, 200: 0.935}
MIB = 2.0 ** 20


# ----------------------------------------------------------------------------- configs
def parse_overrides(items) -> dict:
    """["dim=16", "depth=1"] -> {"dim": 16, "depth": 1} (values via ast.literal_eval)."""
    import ast

    out = {}
    for item in items or ():
        key, _, text = item.partition("=")
        try:
            out[key] = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            out[key] = text
    return out


def synthetic_config(category: str, root: str, *, k: int, steps: int, seed: int = 0,
                     noise_std: float | None = None, model_overrides: dict | None = None):
    """experiments/configs/vtadl_synthetic.py with K, steps, seed (and noise) set; direct reader."""
    from vtadl_jax.configs import load_config

    config = load_config(os.path.join(HERE, "configs", "vtadl_synthetic.py") + f":{category}")
    overrides = dict(config.model.overrides.to_dict() if hasattr(config.model.overrides, "to_dict")
                     else config.model.overrides)
    overrides.update(model_overrides or {})
    overrides["num_components"] = int(k)
    if noise_std is not None:
        overrides["noise_std"] = float(noise_std)
    config.model.overrides = overrides
    if "image_size" in (model_overrides or {}):  # the data follow the model's input size
        config.data.image_size = int(model_overrides["image_size"])
    config.data.root = root
    config.data.backend = "direct"
    config.seed = int(seed)
    config.num_steps = int(steps)
    config.checkpoint.every_steps = max(1, int(steps))
    config.checkpoint.async_save = False
    config.progress = False
    return config


def mnist_config(digit: int, *, k: int, steps: int, max_examples: int | None, seed: int = 0):
    from vtadl_jax.configs import load_config

    config = load_config(os.path.join(HERE, "configs", "vtadl_mnist.py") + f":{digit}")
    config.model.overrides = {"num_components": int(k)}
    config.data.backend = "direct"
    if max_examples:
        config.data.max_examples = int(max_examples)
    config.seed = int(seed)
    config.num_steps = int(steps)
    config.checkpoint.every_steps = max(1, int(steps))
    config.checkpoint.async_save = False
    config.progress = False
    return config


def ensure_synthetic(out: str) -> str:
    from vtadl_jax.data import make_synthetic_mvtec

    syn = os.path.join(out, "synthetic")
    if not all(os.path.isdir(os.path.join(syn, c)) for c in ("texture", "object")):
        make_synthetic_mvtec(syn, seed=0, overwrite=True)
    return syn


# ----------------------------------------------------------------------------- cost
def memory_of(compiled) -> dict:
    """Compiled memory (bytes) of an XLA executable; total = temp + args + out - alias."""
    ma = compiled.memory_analysis()
    if ma is None:
        return {}
    temp, arg = int(ma.temp_size_in_bytes), int(ma.argument_size_in_bytes)
    out, alias = int(ma.output_size_in_bytes), int(ma.alias_size_in_bytes)
    return {"temp_mib": temp / MIB, "args_mib": arg / MIB, "out_mib": out / MIB,
            "alias_mib": alias / MIB, "memory_mib": (temp + arg + out - alias) / MIB}


def measure_cost(k: int, path: str, *, k_chunk: int, steps: int, mem_limit_gb: float,
                 batch: int = 8, impl: str = "jit", model_overrides: dict | None = None
                 ) -> dict:
    """Compile the train step of the synthetic model with K components; memory, time."""
    import jax
    import numpy as np

    from vtadl_jax.train import loop
    from vtadl_jax.train.optim import make_optimizer
    from vtadl_jax.train.state import create_train_state
    from vtadl_jax.train.step import (make_mesh, make_train_step, replicate, shard_batch,
                                      train_step)

    config = synthetic_config("object", "unused", k=k, steps=1,
                              model_overrides=model_overrides)
    config.batch_size = batch
    model, tx = loop.build_model(config), make_optimizer(**config.optim)
    chunk = None if path == "unchunked" else min(int(k_chunk), int(k))
    loss_cfg = dataclasses.replace(loop.loss_config(config), k_chunk=chunk,
                                   fused_head=(path == "fused"))
    shape = (*model.image_size, model.channels)
    images = np.random.default_rng(0).uniform(-1, 1, (batch, *shape)).astype(np.float32)
    state = create_train_state(model, tx, 0, shape)
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(state.params))
    head_params = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(
        state.params["mdn"]))
    if impl == "shard_map":  # the training loop's step (data-parallel over all devices)
        mesh = make_mesh()
        state, x = replicate(state, mesh), shard_batch(images, mesh)
        fn = make_train_step(model, tx, loss_cfg, mesh)
    else:  # the same pure step, one device, no shard_map
        x = jax.numpy.asarray(images)
        fn = jax.jit(functools.partial(train_step, model=model, tx=tx, loss_cfg=loss_cfg,
                                       axis_name=None), donate_argnums=(0,))
    t0 = time.perf_counter()
    compiled = fn.lower(state, x).compile()
    compile_s = time.perf_counter() - t0
    mem = memory_of(compiled)
    row = {"k": int(k), "path": path, "k_chunk": chunk, "batch": batch, "impl": impl,
           "num_patches": int(np.prod(model.grid)), "dim": int(model.dim),
           "params": n_params, "head_params": head_params, "compile_s": compile_s, **mem,
           "bnkd_mib": batch * int(np.prod(model.grid)) * k * model.dim * 4 / MIB,
           "step_s": None, "skipped": None, "loss": None}
    if mem.get("memory_mib", 0.0) > mem_limit_gb * 1024:
        row["skipped"] = (f"compiled memory {mem['memory_mib'] / 1024:.2f} GiB > "
                          f"{mem_limit_gb} GiB limit: compiled, not run")
    else:
        state, m = compiled(state, x)  # warm-up
        jax.block_until_ready(m)
        times = []
        for _ in range(steps):
            t0 = time.perf_counter()
            state, m = compiled(state, x)
            jax.block_until_ready(m)
            times.append(time.perf_counter() - t0)
        row.update(step_s=statistics.median(times), step_times=times,
                   loss=float(m["loss"]), timed_steps=steps)
    del compiled, state
    jax.clear_caches()
    make_train_step.cache_clear()
    return row


# ----------------------------------------------------------------------------- quality
def quality_unit(out: str, key: str, config) -> dict:
    from vtadl_jax.pipelines import vtadl

    workdir = os.path.join(out, "work", key)
    _, summary = vtadl.train_from_config(config, workdir, resume=True)
    result = vtadl.evaluate_workdir(workdir, num_overlays=4)
    overrides = dict(config.model.overrides)
    return {"k": int(overrides["num_components"]), "steps": int(config.num_steps),
            "seed": int(config.seed), "dataset": config.data.name if config.data.name != "folder"
            else "synthetic/" + os.path.basename(config.data.root),
            "noise_std": float(overrides.get("noise_std", 0.2)),
            "train_seconds": summary.get("train_seconds"),
            "final_loss": summary.get("metrics", {}).get("loss"),
            **{m: result.get(m) for m in ("aupro", "pixel_auroc", "image_auroc", "pixel_ap",
                                          "num_images", "eval_seconds")}}


# ----------------------------------------------------------------------------- plots
def plot_cost(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for p, marker in (("unchunked", "o"), ("chunked", "s"), ("fused", "^")):
        sel = sorted((r for r in rows if r["path"] == p), key=lambda r: r["k"])
        if not sel:
            continue
        ran = [r for r in sel if r.get("step_s")]
        if ran:
            axes[0].plot([r["k"] for r in ran], [r["step_s"] * 1e3 for r in ran],
                         marker=marker, label=p)
        axes[1].plot([r["k"] for r in sel], [r["memory_mib"] for r in sel], marker=marker,
                     label=f"{p} (total)")
        axes[1].plot([r["k"] for r in sel], [r["temp_mib"] for r in sel], marker=marker,
                     linestyle=":", label=f"{p} (temp)")
        skipped = [r for r in sel if r.get("skipped")]
        if skipped:
            axes[1].scatter([r["k"] for r in skipped], [r["memory_mib"] for r in skipped],
                            s=120, facecolors="none", edgecolors="red",
                            label="compiled, not run")
    ks = sorted({r["k"] for r in rows})
    ref = [r for r in rows if r["path"] == "unchunked" and r.get("step_s")]
    if ref:  # linear-in-K guide through the largest K that ran
        top = max(ref, key=lambda r: r["k"])
        axes[0].plot(ks, [top["step_s"] * 1e3 * k / top["k"] for k in ks], "k--", lw=0.8,
                     label="∝ K")
    bnkd = [r for r in rows if r["path"] == "unchunked"]
    if bnkd:
        axes[1].plot([r["k"] for r in bnkd], [r["bnkd_mib"] for r in bnkd], "k--", lw=0.8,
                     label="one (B,N,K,D) f32 tensor")
    runner.save_loglog(fig, axes, path, xlabel="K (Gaussians)",
                       ylabels=("train step (ms, median)", "compiled memory (MiB)"),
                       title="VT-ADL density head vs K (64x64 synthetic model, D=64, N=64, "
                             "batch 8)")


def plot_quality(rows: list[dict], mnist_rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for dataset in sorted({r["dataset"] for r in rows}):
        sel = sorted((r for r in rows if r["dataset"] == dataset), key=lambda r: r["k"])
        for metric, ls in (("aupro", "-"), ("pixel_auroc", "--"), ("image_auroc", ":")):
            vals = [(r["k"], r[metric]) for r in sel if r.get(metric) is not None]
            if vals:
                ax.plot(*zip(*vals), marker="o", linestyle=ls, label=f"{dataset} {metric}")
    for dataset in sorted({r["dataset"] for r in mnist_rows}):
        sel = sorted((r for r in mnist_rows if r["dataset"] == dataset), key=lambda r: r["k"])
        ax.plot([r["k"] for r in sel], [r["image_auroc"] for r in sel], marker="s",
                label=f"{dataset} image_auroc")
    ax.plot(list(PAPER_PRO_VS_K), list(PAPER_PRO_VS_K.values()), "k*", markersize=11,
            label="authors' README ablation, MVTec 'PRO' (pixel AUROC), 400 epochs")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("K (Gaussians)")
    ax.set_ylabel("score")
    ax.set_ylim(0, 1.02)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=6.5, loc="lower right")
    ax.set_title("VT-ADL quality vs K (short runs; cf. paper Fig. 4)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


# ----------------------------------------------------------------------------- main
def _extra(p) -> None:
    p.add_argument("--cost-ks", type=int, nargs="*", default=[1, 4, 16, 64, 256, 1024, 4096])
    p.add_argument("--paths", nargs="+", default=["unchunked", "fused"],
                   choices=["unchunked", "chunked", "fused"])
    p.add_argument("--k-chunk", type=int, default=64)
    p.add_argument("--step-impl", default="jit", choices=["jit", "shard_map"],
                   help="jit: train.step.train_step(axis_name=None) under jax.jit on one "
                        "device; shard_map: train.step.make_train_step (the loop's step)")
    p.add_argument("--cost-steps", type=int, default=3, help="timed steps (median)")
    p.add_argument("--mem-limit-gb", type=float, default=3.0)
    p.add_argument("--ks", type=int, nargs="*", default=[1, 4, 16, 64, 256])
    p.add_argument("--categories", nargs="*", default=["object"])
    p.add_argument("--steps", type=int, default=150, help="training steps per quality unit")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model-overrides", nargs="*", default=[],
                   help="extra VTADL fields for the synthetic model, e.g. dim=16 depth=1 "
                        "(smoke tests); part of every cache key when given")
    p.add_argument("--mnist-ks", type=int, nargs="*", default=[])
    p.add_argument("--mnist-digit", type=int, default=0)
    p.add_argument("--mnist-steps", type=int, default=100)
    p.add_argument("--mnist-max-examples", type=int, default=1000)


def main(argv=None) -> dict:
    args = runner.parse_args(__doc__.split("\n")[0], _extra, argv)
    out = args.out
    os.makedirs(out, exist_ok=True)
    machine = runner.machine()
    extra = parse_overrides(args.model_overrides)
    tag = ("_" + "_".join(f"{k}{v}" for k, v in sorted(extra.items()))) if extra else ""

    # (a) cost
    cost_rows = []
    for k in args.cost_ks:
        for path in args.paths:
            key = (f"cost_{args.step_impl}_k{k}_{path}"
                   + (f"_c{args.k_chunk}" if path != "unchunked" else "") + tag)
            cost_rows.append(runner.cached(out, key, lambda k=k, path=path: measure_cost(
                k, path, k_chunk=args.k_chunk, steps=args.cost_steps,
                mem_limit_gb=args.mem_limit_gb, impl=args.step_impl, model_overrides=extra),
                fresh=args.fresh))
    if cost_rows:
        for r in cost_rows:
            r["step_ms"] = None if r.get("step_s") is None else r["step_s"] * 1e3
            r["note"] = r.get("skipped") or ""
        cols = ["k", "path", "k_chunk", "head_params", "step_ms", "memory_mib", "temp_mib",
                "args_mib", "bnkd_mib", "compile_s", "note"]
        runner.write_report(out, "cost", cost_rows, cols,
                            title="VT-ADL train-step cost vs K (64x64 synthetic model: N=64 "
                                  "patches, D=64, batch 8)",
                            notes=[f"step_ms: median of {args.cost_steps} steps after one "
                                   "warm-up step (compiled ahead of time).",
                                   "memory_mib: XLA compiled memory_analysis of the jitted "
                                   "train step, temp + arguments + outputs - aliased (the "
                                   "donated state); temp_mib alone is the working memory.",
                                   "bnkd_mib: size of one (B, N, K, D) float32 tensor.",
                                   "fused with K <= k_chunk is a single chunk (the same "
                                   "program as unchunked, same memory).",
                                   "timings are wall-clock on a shared CPU (other jobs ran at "
                                   "the same time): below K ~ 64 the differences between the "
                                   "paths are noise; memory is deterministic.",
                                   f"configurations above {args.mem_limit_gb} GiB compiled "
                                   "memory are compiled but not run.",
                                   f"step: {args.step_impl} ("
                                   + ("train.step.train_step(axis_name=None) under jax.jit, "
                                      "one device, donated state (--step-impl shard_map "
                                      "times the training loop's make_train_step instead)"
                                      if args.step_impl == "jit" else
                                      "train.step.make_train_step, the loop's step") + ").",
                                   f"machine: {machine}"])
        plot_cost(cost_rows, os.path.join(out, "cost_vs_k.png"))

    # (b) quality
    rows, mnist_rows = [], []
    if args.ks:
        syn = ensure_synthetic(out)
        for category in args.categories:
            for k in args.ks:
                key = f"quality_{category}_k{k}_s{args.steps}_seed{args.seed}{tag}"
                config = synthetic_config(category, os.path.join(syn, category), k=k,
                                          steps=args.steps, seed=args.seed,
                                          model_overrides=extra)
                rows.append(runner.cached(out, key, lambda key=key, c=config: quality_unit(
                    out, key, c), fresh=args.fresh))
    for k in args.mnist_ks:
        key = (f"mnist{args.mnist_digit}_k{k}_s{args.mnist_steps}_n{args.mnist_max_examples}"
               f"_seed{args.seed}")
        config = mnist_config(args.mnist_digit, k=k, steps=args.mnist_steps,
                              max_examples=args.mnist_max_examples, seed=args.seed)
        mnist_rows.append(runner.cached(out, key, lambda key=key, c=config: quality_unit(
            out, key, c), fresh=args.fresh))
    if rows or mnist_rows:
        table = [dict(r) for r in rows + mnist_rows]
        for k, v in PAPER_PRO_VS_K.items():
            table.append({"dataset": "paper: authors' README ablation (MVTec, 'PRO')", "k": k,
                          "pixel_auroc": v})
        cols = ["dataset", "k", "steps", "aupro", "pixel_auroc", "image_auroc", "final_loss",
                "train_seconds", "num_images"]
        notes = [f"synthetic: experiments/configs/vtadl_synthetic.py model (64x64, D 64, batch 8, "
                 f"lr 1e-3, noise 0.2), {args.steps} steps, seed {args.seed}, on the "
                 "generated MVTec-layout set (30 train images per category); "
                 "test split of that set.",
                 "paper rows: the authors' README ablation (METHODS.md part A); their 'PRO' is "
                 "pixel AUROC as the code computes it, on real MVTec AD after 400 epochs: "
                 "compare shapes, not levels."]
        if mnist_rows:
            notes.append(f"mnist: one-class digit {args.mnist_digit}, 'mnist' variant, "
                         f"{args.mnist_steps} steps at batch 64, data.max_examples="
                         f"{args.mnist_max_examples} (first n normal training images, first "
                         "n test images of all digits); image score reconstruction-only, as "
                         "the paper (K acts only through training).")
        notes.append(f"machine: {machine}")
        runner.write_report(out, "table", table, cols,
                            title="VT-ADL quality vs K (paper Fig. 4 / README ablation beside)",
                            notes=notes)
        plot_quality(rows, mnist_rows, os.path.join(out, "quality_vs_k.png"))
    return {"cost": cost_rows, "quality": rows, "mnist": mnist_rows}


if __name__ == "__main__":
    main()
