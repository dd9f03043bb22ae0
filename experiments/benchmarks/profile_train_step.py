"""Per-component profile of the VT-ADL train step: XLA cost-analysis FLOPs and measured ms.

Components of one step (Mishra et al. 2021): encoder (patch ViT), projection, decoder
(train mode, BatchNorm statistics updated), MDN head + NLL, SSIM, optimiser (Adam with
coupled weight decay), and the whole jitted step. Each component is jitted on its own,
forward and forward+backward (vjp w.r.t. its parameters and its input, with a random
cotangent); "bwd" = fwd+bwd - fwd. The whole step and the optimiser donate their state,
as training does (each run takes the previous run's state; timed without donation, the
optimiser's fresh outputs had cost it 199 vs 48 ms at batch 2, code case). Times: median
of ``--repeats`` runs after one warm-up; the machine is shared, so medians of few runs
are what they are.

    python experiments/benchmarks/profile_train_step.py --batch 2 --tag after
    python experiments/benchmarks/profile_train_step.py --cases code --batch 8 --tag after

Writes (merging with earlier tags) experiments/results/bench/profile_train_step.json
and .md.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

if __name__ == "__main__":  # first, before jax loads: huge-page malloc (vtadl_jax.hostmem)
    from vtadl_jax.hostmem import reexec_with_hugepage_malloc

    reexec_with_hugepage_malloc()

OUT = os.path.join(ROOT, "experiments", "results", "bench")


def _time(fn, args, repeats: int) -> tuple[float, float]:
    """(GFLOP by XLA's cost analysis, median ms) of jit(fn)(*args)."""
    import jax

    return _time_compiled(jax.jit(fn).lower(*args).compile(), args, repeats)


def _time_compiled(compiled, args, repeats: int, *, donated: bool = False
                   ) -> tuple[float, float | None]:
    """(GFLOP by XLA's cost analysis, median ms of ``repeats`` runs after one warm-up) of
    ``compiled(*args)``. ``donated``: the first argument is donated, so every run takes
    the previous run's first output in its place (a train step's state)."""
    from vtadl_jax.train.flops import median_run_seconds, step_flops

    flops = step_flops(compiled)
    gflop = float("nan") if flops is None else flops / 1e9
    if repeats == 0:  # FLOPs only
        return gflop, None
    return gflop, 1e3 * median_run_seconds(compiled, args, repeats, donated=donated)


def _with_vjp(f):
    """fwd+bwd of f(params, x): the cotangents of params and x for a fixed output cotangent."""
    import jax

    def fwd_bwd(params, x, ct):
        out, pull = jax.vjp(f, params, x)
        return pull(ct)
    return fwd_bwd


def components(model, tx, loss_cfg, batch: int):
    """[(name, f(params, x), params, x)] for every component, inputs as in a real step."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from vtadl_jax.kernels.ssim import ssim
    from vtadl_jax.models.mdn import MixtureDensityHead, patch_nll
    from vtadl_jax.train.state import init_variables
    from vtadl_jax.train.step import ssim_window

    shape = (*model.image_size, model.channels)
    variables = init_variables(model, jax.random.PRNGKey(0), shape)
    params, stats = variables["params"], variables["batch_stats"]
    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.uniform(-1, 1, (batch, *shape)), jnp.float32)
    bound = model.bind(variables, rngs={"noise": jax.random.PRNGKey(1)})
    z = bound.encoder(images)
    v = bound.project(z.reshape(batch, -1))
    recon = bound.dec(v, train=False)
    enc, proj, dec = bound.encoder.clone(parent=None), bound.project.clone(parent=None), \
        bound.dec.clone(parent=None)
    head = MixtureDensityHead(model.num_components, model.mdn_head, model.scale_floor)

    def decoder(p, x):
        out, _ = dec.apply({"params": p, "batch_stats": stats}, x, train=True,
                           mutable=["batch_stats"])
        return out

    def mdn(p, x):
        nll = patch_nll(x, head.apply({"params": p}, x), head=model.mdn_head,
                        k_chunk=loss_cfg.k_chunk)
        return jnp.mean(jnp.sum(nll, -1))

    fs = ssim_window(loss_cfg.ssim_filter_size, *shape[:2])

    def ssim_term(_, x):
        return jnp.mean(ssim(images, x, max_val=loss_cfg.ssim_max_val, filter_size=fs,
                             filter_sigma=loss_cfg.ssim_sigma, padding="same"))

    return [("encoder", lambda p, x: enc.apply({"params": p}, x), params["encoder"], images),
            ("projection", lambda p, x: proj.apply({"params": p}, x.reshape(batch, -1)),
             params["project"], z),
            ("decoder", decoder, params["dec"], v),
            ("mdn_head+nll", mdn, params["mdn"], z),
            ("ssim", ssim_term, {}, recon)], params


def profile_case(case: str, batch: int, repeats: int) -> list[dict]:
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    from experiments.benchmarks.vtadl_cases import build_case
    from vtadl_jax.train.state import create_train_state
    from vtadl_jax.train.step import make_mesh, make_train_step, replicate, shard_batch

    model, tx, loss_cfg = build_case(case)
    rows = []
    parts, params = components(model, tx, loss_cfg, batch)
    for name, f, p, x in parts:
        out = jax.eval_shape(f, p, x)
        ct = jax.tree.map(lambda s: np.random.default_rng(1).normal(size=s.shape).astype(
            s.dtype), out)
        gf, ms_f = _time(f, (p, x), repeats)
        gfb, ms_fb = _time(_with_vjp(f), (p, x, ct), repeats)
        rows.append(dict(case=case, batch=batch, component=name, fwd_gflop=gf, fwd_ms=ms_f,
                         fwd_bwd_gflop=gfb, fwd_bwd_ms=ms_fb,
                         bwd_ms=None if ms_f is None else ms_fb - ms_f))
        print(json.dumps(rows[-1]), flush=True)
    grads = jax.tree.map(lambda a: 1e-3 * a, params)
    opt_state = tx.init(params)

    def optimiser(state, g):  # parameters and moments updated in place, as in the step
        p, opt_state = state
        updates, opt_state = tx.update(g, opt_state, p)
        return (optax.apply_updates(p, updates), opt_state), {}
    args = ((jax.tree.map(jnp.copy, params), opt_state), grads)
    gf, ms = _time_compiled(jax.jit(optimiser, donate_argnums=0).lower(*args).compile(),
                            args, repeats, donated=True)
    rows.append(dict(case=case, batch=batch, component="optimiser", fwd_gflop=gf, fwd_ms=ms))
    mesh = make_mesh(jax.devices()[:1])
    state = replicate(create_train_state(model, tx, 0, (*model.image_size, model.channels)),
                      mesh)
    images = shard_batch(np.random.default_rng(0).uniform(
        -1, 1, (batch, *model.image_size, model.channels)).astype(np.float32), mesh)
    step = make_train_step(model, tx, loss_cfg, mesh)  # donated state, as in training
    gf, ms = _time_compiled(step.lower(state, images).compile(), (state, images), repeats,
                            donated=True)
    rows.append(dict(case=case, batch=batch, component="whole step", fwd_bwd_gflop=gf,
                     fwd_bwd_ms=ms))
    print(json.dumps(rows[-1]), flush=True)
    return rows


def write(results: dict, out_dir: str) -> None:
    from vtadl_jax.records import write_json_atomic, write_text_atomic

    write_json_atomic(results, os.path.join(out_dir, "profile_train_step.json"))
    cols = ("component", "fwd_gflop", "fwd_bwd_gflop", "fwd_ms", "bwd_ms", "fwd_bwd_ms")
    lines = ["# VT-ADL train step per component", "",
             "XLA cost-analysis GFLOP and median ms (CPU, see machine.json); "
             "bwd = fwd+bwd - fwd. Written by experiments/benchmarks/profile_train_step.py.", ""]
    for tag in sorted(results):
        groups: dict = {}
        for r in results[tag]["rows"]:
            groups.setdefault((r["case"], r["batch"]), []).append(r)
        for (case, batch), rows in sorted(groups.items()):
            lines += [f"## {tag}: case {case}, batch {batch}", "",
                      "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
            for r in rows:
                cells = [r["component"]] + [
                    "-" if r.get(c) is None else f"{r[c]:.1f}" if "ms" in c else f"{r[c]:.2f}"
                    for c in cols[1:]]
                lines.append("| " + " | ".join(cells) + " |")
            lines.append("")
    write_text_atomic("\n".join(lines), os.path.join(out_dir, "profile_train_step.md"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", default=["code", "paper"])
    parser.add_argument("--batch", type=int, nargs="+", default=[2])
    parser.add_argument("--repeats", type=int, default=3, help="0: XLA FLOPs only, no timing")
    parser.add_argument("--tag", default="current", help="label of this run in the tables")
    parser.add_argument("--out", default=OUT)
    args = parser.parse_args()
    path = os.path.join(args.out, "profile_train_step.json")
    results = json.load(open(path)) if os.path.exists(path) else {}
    rows = [r for c in args.cases for b in args.batch for r in profile_case(c, b, args.repeats)]
    old = [r for r in results.get(args.tag, {}).get("rows", [])
           if (r["case"], r["batch"]) not in {(r2["case"], r2["batch"]) for r2 in rows}]
    results[args.tag] = {"rows": old + rows}
    write(results, args.out)


if __name__ == "__main__":
    main()
