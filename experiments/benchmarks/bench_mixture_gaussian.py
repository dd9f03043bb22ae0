"""Memory and time of the mixture NLL and of Mahalanobis scoring.

``run()`` returns rows of two tables:

(a) ``mixture``: value-and-gradient of the diagonal mixture NLL for N = 64 patches,
    D = 512, K in (64, 256, 1024, 4096), unchunked vs ``k_chunk=64``; memory is XLA's
    compiled ``memory_analysis()`` (temp, argument, output bytes; compiled from shapes,
    nothing allocated) and time is the median wall time of one jitted call. Two forms:
    ``mixture_nll`` (means/scales given as (N, K, D) inputs) and
    ``mixture_nll_from_head`` (means/scales computed from H = 512 head features by
    (H, K, D) weights, as in the VT-ADL density head). A form is only executed when its
    total bytes fit a budget (``exec_budget_gb``, per form: the large from-head cases
    take tens of seconds on a CPU); otherwise the row says "skipped".
(b) ``mahalanobis``: P = 49 positions (7x7), B = 32, C in (128, 448, 1536): triangular
    solve vs whitening matmul vs NumPy (precision matrix from np.linalg.inv, batched
    matmul + einsum). Factors are precomputed (fit-time work is not timed); for speed of
    setup, a few distinct SPD matrices are tiled over the 49 positions (values do not
    affect timing).

    python -m experiments.benchmarks.bench_mixture_gaussian
"""
from __future__ import annotations

if __name__ == "__main__":  # first, before jax loads: huge-page malloc (vtadl_jax.hostmem)
    from vtadl_jax.hostmem import reexec_with_hugepage_malloc

    reexec_with_hugepage_malloc()

import functools  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from typing import Callable  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from vtadl_jax.kernels import gaussian as G  # noqa: E402
from vtadl_jax.kernels.mixture import mixture_nll, mixture_nll_from_head  # noqa: E402

_MB = 2.0 ** 20


def _median_ms(fn: Callable[[], object], repeats: int, slow_ms: float = 250.0) -> float:
    """Median wall time after a warm-up call; one timed call when a call takes > slow_ms."""
    jax.block_until_ready(fn())  # warm-up / compile
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append((time.perf_counter() - t0) * 1e3)
        if times[0] > slow_ms:
            break
    return statistics.median(times)


@functools.partial(jax.jit, static_argnums=1)
def _normal(key, shape: tuple) -> jax.Array:
    """Small random block repeated to ``shape`` (fast; values do not affect timing)."""
    block = 0.05 * jax.random.normal(key, (min(int(np.prod(shape)), 1 << 18),), jnp.float32)
    return jnp.resize(block, shape)


def _grad_fn(form: str, k_chunk):
    if form == "mixture_nll":
        def loss(z, logits, means, scales):
            return mixture_nll(z, logits, means, scales, k_chunk=k_chunk).sum()
    else:
        def loss(z, h, w_logits, w_means, w_scales):
            return mixture_nll_from_head(z, h, w_logits, w_means, w_scales,
                                         k_chunk=k_chunk).sum()
    return jax.jit(jax.value_and_grad(loss, argnums=tuple(range(4 if form == "mixture_nll"
                                                                else 5))))


def _shapes(form: str, n: int, k: int, d: int, hdim: int) -> list[tuple]:
    if form == "mixture_nll":
        return [(n, d), (n, k), (n, k, d), (n, k, d)]
    return [(n, d), (n, hdim), (hdim, k), (hdim, k, d), (hdim, k, d)]


def bench_mixture(ks=(64, 256, 1024, 4096), n: int = 64, d: int = 512, hdim: int = 512,
                  k_chunk: int = 64, repeats: int = 3,
                  exec_budget_gb: dict | None = None) -> list[dict]:
    budget = {"mixture_nll": 3.0, "mixture_nll_from_head": 0.5, **(exec_budget_gb or {})}
    rows = []
    for form in ("mixture_nll", "mixture_nll_from_head"):
        for k in ks:
            shapes = _shapes(form, n, k, d, hdim)
            for kc in (None, k_chunk):
                fn = _grad_fn(form, kc)
                structs = [jax.ShapeDtypeStruct(s, jnp.float32) for s in shapes]
                ma = fn.lower(*structs).compile().memory_analysis()
                row = dict(table="mixture", form=form, K=k, D=d, N=n,
                           k_chunk=kc or "none")
                if ma is not None:
                    row.update(temp_mb=ma.temp_size_in_bytes / _MB,
                               arg_mb=ma.argument_size_in_bytes / _MB,
                               out_mb=ma.output_size_in_bytes / _MB)
                    total = (ma.temp_size_in_bytes + ma.argument_size_in_bytes
                             + ma.output_size_in_bytes)
                    row["total_mb"] = total / _MB
                else:
                    total = 0
                if total > budget[form] * 2 ** 30:
                    row["ms"] = f"skipped (> {budget[form]:g} GB)"
                else:
                    keys = jax.random.split(jax.random.key(k), len(shapes))
                    args = [_normal(key, s) for key, s in zip(keys, shapes)]
                    if form == "mixture_nll":
                        args[3] = jnp.abs(args[3]) + 0.5
                    row["ms"] = _median_ms(functools.partial(fn, *args), repeats)
                    del args
                rows.append(row)
    return rows


def _spd_factors(rng, p: int, c: int, distinct: int = 2):
    """Lower Cholesky factors, whitening matrices and precision matrices, (P, C, C) each."""
    u = rng.standard_normal((distinct, c, 32), dtype=np.float32)
    cov = np.einsum("pcr,pdr->pcd", u, u) / 32 + np.eye(c, dtype=np.float32)
    chol = G.cholesky_factor(jnp.asarray(cov))
    whiten = G.whitening_matrix(chol)
    prec = np.linalg.inv(cov)
    tile = lambda a: np.ascontiguousarray(np.resize(np.asarray(a), (p, c, c)))  # noqa: E731
    return jnp.asarray(tile(chol)), jnp.asarray(tile(whiten)), tile(prec)


def bench_mahalanobis(cs=(128, 448, 1536), p: int = 49, b: int = 32,
                      repeats: int = 5) -> list[dict]:
    rows = []
    rng = np.random.default_rng(1)
    solve = jax.jit(G.mahalanobis)
    whitened = jax.jit(G.mahalanobis_whitened)
    for c in cs:
        chol, whiten, prec = _spd_factors(rng, p, c)
        feats_np = rng.standard_normal((b, p, c), dtype=np.float32)
        mean_np = rng.standard_normal((p, c), dtype=np.float32) * 0.1
        feats, mean = jnp.asarray(feats_np), jnp.asarray(mean_np)

        def numpy_inv_einsum():
            diff = feats_np - mean_np
            y = np.matmul(np.ascontiguousarray(diff.transpose(1, 0, 2)), prec)  # (P, B, C)
            return np.sqrt(np.einsum("pbc,bpc->bp", y, diff))

        d_solve = np.asarray(solve(feats, mean, chol))
        distances = {"solve (vmapped triangular)": d_solve,
                     "whitening matmul": np.asarray(whitened(feats, mean, whiten)),
                     "numpy inv + einsum": numpy_inv_einsum()}
        timings = {"solve (vmapped triangular)": _median_ms(lambda: solve(feats, mean, chol),
                                                            repeats),
                   "whitening matmul": _median_ms(lambda: whitened(feats, mean, whiten),
                                                  repeats),
                   "numpy inv + einsum": _median_ms(numpy_inv_einsum, repeats)}
        ref = timings["solve (vmapped triangular)"]
        for name, ms in timings.items():
            rows.append(dict(table="mahalanobis", impl=name, P=p, B=b, C=c, ms=ms,
                             ratio_to_solve=ms / ref,
                             max_rel_diff_vs_solve=float(np.max(
                                 np.abs(distances[name] - d_solve) / d_solve))))
        del chol, whiten, prec
    return rows


def run() -> list[dict]:
    """All rows of both tables."""
    return bench_mixture() + bench_mahalanobis()


def _fmt(v) -> str:
    return f"{v:.1f}" if isinstance(v, float) else str(v)


def _print_table(rows: list[dict], cols: list[str]) -> None:
    widths = [max(len(c), *(len(_fmt(r.get(c, ""))) for r in rows)) for c in cols]
    print("  ".join(c.rjust(w) for c, w in zip(cols, widths)))
    for r in rows:
        print("  ".join(_fmt(r.get(c, "")).rjust(w) for c, w in zip(cols, widths)))


if __name__ == "__main__":
    t0 = time.perf_counter()
    all_rows = run()
    print(f"backend: {jax.default_backend()}, devices: {jax.device_count()}")
    print("\n(a) mixture NLL, value + gradient, float32 (memory from XLA memory_analysis)")
    _print_table([r for r in all_rows if r["table"] == "mixture"],
                 ["form", "K", "k_chunk", "temp_mb", "arg_mb", "out_mb", "total_mb", "ms"])
    print("\n(b) Mahalanobis scoring, float32, time per call")
    rows_b = [r for r in all_rows if r["table"] == "mahalanobis"]
    for r in rows_b:
        r["ratio_to_solve"] = f"{r['ratio_to_solve']:.2f}"
    _print_table(rows_b, ["C", "impl", "ms", "ratio_to_solve"])
    print(f"\ntotal benchmark time: {time.perf_counter() - t0:.1f} s")
