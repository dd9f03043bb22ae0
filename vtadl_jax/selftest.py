"""``vtadl-jax selftest``: every kernel and metric against float64 NumPy/SciPy, on this backend.

Each check runs a kernel on the current default JAX backend (CPU, GPU or TPU) in float32
(float64 too when ``JAX_ENABLE_X64=1``; bfloat16 where the kernel takes it) and compares
it with an independent float64 re-derivation (``vtadl_jax.reference_numerics``) computed
from the same, already rounded, inputs. A check passes when every element satisfies
``|got - ref| <= atol + rtol * |ref|``. Data-parallel checks compare the shard_map'd
computation over all local devices with one device. Needs numpy and scipy only.
"""
from __future__ import annotations

import dataclasses
import functools
import importlib
import time
from typing import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from vtadl_jax import reference_numerics as ref

# (rtol, atol) per dtype; a case may scale them (see `_tol`).
TOLERANCES = {"float64": (1e-9, 1e-10), "float32": (2e-4, 2e-5), "bfloat16": (3e-2, 3e-2)}


@dataclasses.dataclass
class Check:
    kernel: str
    shape: str
    dtype: str
    max_abs: float
    max_rel: float
    rtol: float
    atol: float
    passed: bool
    note: str = ""


def _mod(name: str):
    """A kernel module looked up at call time (so a patched kernel is what gets tested)."""
    return importlib.import_module(f"vtadl_jax.{name}")


def _tol(dtype: str, scale: float = 1.0) -> tuple[float, float]:
    rtol, atol = TOLERANCES[dtype]
    return rtol * scale, atol * scale


def compare(kernel: str, shape, dtype: str, got, want, rtol: float, atol: float) -> Check:
    """Element-wise |got - want| <= atol + rtol |want| (NaN/inf or a shape change fails)."""
    got = np.asarray(jnp.asarray(got, jnp.float32) if dtype == "bfloat16" else got,
                     np.float64)
    want = np.asarray(want, np.float64)
    if got.shape != want.shape:
        return Check(kernel, str(shape), dtype, np.inf, np.inf, rtol, atol, False,
                     f"shape {got.shape} != reference {want.shape}")
    err = np.abs(got - want)
    max_abs = float(np.max(err)) if err.size else 0.0
    max_rel = float(np.max(err / np.maximum(np.abs(want), 1e-30))) if err.size else 0.0
    passed = bool(np.all(np.isfinite(got)) and np.all(err <= atol + rtol * np.abs(want)))
    return Check(kernel, "x".join(map(str, shape)) if isinstance(shape, tuple) else str(shape),
                 dtype, max_abs, max_rel, rtol, atol, passed)


def _sum_tol(dtype: str, want) -> tuple[float, float]:
    """Tolerance for sums of many terms: atol relative to the largest reference value
    (rounding of a sum scales with its terms, not with the result, which may be ~0);
    float32 5x the base, bfloat16 the base (3% of the largest value)."""
    rtol, atol = TOLERANCES[dtype]
    top = max(1.0, float(np.max(np.abs(want))))
    return rtol, atol * top * (1.0 if dtype == "bfloat16" else 5.0)


def _cast(x: np.ndarray, dtype: str) -> tuple[jax.Array, np.ndarray]:
    """(device array in dtype, the same rounded values in float64 for the reference)."""
    arr = jnp.asarray(np.asarray(x), dtype=dtype)
    return arr, np.asarray(arr.astype(jnp.float32) if dtype == "bfloat16" else arr, np.float64)


# ------------------------------------------------------------------------------ cases
def check_images(rng, dtypes, quick: bool) -> Iterator[Check]:
    k = _mod("kernels.ssim"), _mod("kernels.filters")
    n, h = (2, 24) if quick else (4, 64)
    x0 = rng.uniform(-1, 1, (n, h, h, 3))
    y0 = np.clip(x0 + rng.normal(0, 0.3, x0.shape), -1, 1)
    for dt in dtypes:
        (x, xr), (y, yr) = _cast(x0, dt), _cast(y0, dt)
        for pad in ("same", "valid"):
            got = k[0].ssim(x, y, max_val=2.0, padding=pad)
            yield compare(f"ssim[{pad}]", x0.shape, dt, got,
                          ref.ssim(xr, yr, max_val=2.0, padding=pad), *_tol(dt, 2))
        maps, mr = _cast(rng.gamma(2.0, 1.0, (n, h, h + 8)), dt)
        yield compare("gaussian_blur[sigma=4]", maps.shape, dt, k[1].gaussian_blur(maps, 4.0),
                      ref.gaussian_blur(mr, 4.0), *_tol(dt))
        small, sr = _cast(rng.normal(size=(n, 7, 9, 3)), dt)
        for ac in (False, True):
            yield compare(f"resize_bilinear[ac={ac}]", small.shape, dt,
                          k[1].resize_bilinear(small, (h, h + 5), align_corners=ac),
                          ref.resize_bilinear(sr, (h, h + 5), ac), *_tol(dt))
        grid, gr = _cast(rng.normal(size=(n, 8, 6)), dt)
        yield compare("resize_nearest", grid.shape, dt, k[1].resize_nearest(grid, (16, 18)),
                      ref.resize_nearest(gr, (16, 18)), 0.0, 0.0)


def check_mixtures(rng, dtypes, quick: bool) -> Iterator[Check]:
    m = _mod("kernels.mixture")
    b, n, kk, d, hd = (2, 6, 12, 8, 5) if quick else (4, 49, 150, 64, 32)
    for dt in dtypes:
        z, zr = _cast(rng.normal(size=(b, n, d)), dt)
        lg, lr = _cast(rng.normal(size=(b, n, kk)), dt)
        mu, mr = _cast(rng.normal(size=(b, n, kk, d)), dt)
        sc, sr = _cast(rng.uniform(0.5, 2.0, (b, n, kk, d)), dt)
        want = ref.mixture_nll(zr, lr, mr, sr)
        scale = max(1.0, float(np.max(np.abs(want))) / 100)  # NLL sums D terms
        for chunk in (None, 5):
            yield compare(f"mixture_nll[k_chunk={chunk}]", (b, n, kk, d), dt,
                          m.mixture_nll(z, lg, mu, sc, k_chunk=chunk), want, *_tol(dt, scale))
        h, hr = _cast(rng.normal(size=(b, n, hd)) / np.sqrt(hd), dt)
        ws = [_cast(rng.normal(size=s) / np.sqrt(hd), dt)
              for s in ((hd, kk), (hd, kk, d), (hd, kk, d))]
        bs = [_cast(rng.normal(size=s) * 0.1, dt) for s in ((kk,), (kk, d), (kk, d))]
        pre = np.einsum("bnh,hkd->bnkd", hr, ws[2][1]) + bs[2][1]
        want = ref.mixture_nll(zr, hr @ ws[0][1] + bs[0][1],
                               np.einsum("bnh,hkd->bnkd", hr, ws[1][1]) + bs[1][1],
                               np.logaddexp(0.0, pre) + 0.1)
        for chunk in (None, 5):
            got = m.mixture_nll_from_head(z, h, *(w for w, _ in ws), b_logits=bs[0][0],
                                          b_means=bs[1][0], b_scales=bs[2][0], k_chunk=chunk,
                                          min_scale=0.1)
            yield compare(f"mixture_nll_from_head[k_chunk={chunk}]", (b, n, hd, kk, d), dt,
                          got, want, *_tol(dt, scale))
        if dt == "float32":  # mixed precision: bf16 products, float32 accumulation
            rounded = [np.asarray(jnp.asarray(x, jnp.float32).astype(jnp.bfloat16), np.float64)
                       for x in (hr, *(w for _, w in ws))]
            hb, wl, wm, wsc = rounded
            want_b = ref.mixture_nll(
                zr, hb @ wl + bs[0][1], np.einsum("bnh,hkd->bnkd", hb, wm) + bs[1][1],
                np.logaddexp(0.0, np.einsum("bnh,hkd->bnkd", hb, wsc) + bs[2][1]) + 0.1)
            got = m.mixture_nll_from_head(z, h, *(w for w, _ in ws), b_logits=bs[0][0],
                                          b_means=bs[1][0], b_scales=bs[2][0], k_chunk=5,
                                          min_scale=0.1, matmul_dtype=jnp.bfloat16)
            yield compare("mixture_nll_from_head[bf16 matmul]", (b, n, hd, kk, d),
                          dt, got, want_b, *_tol(dt, scale))
        lv, vr = _cast(rng.uniform(0.1, 2.0, (b, n, kk, d)), dt)
        want = ref.vtadl_code_mdn_loss(zr, lr, mr, vr)
        yield compare("vtadl_code_mdn_loss[none]", (b, n, kk, d), dt,
                      m.vtadl_code_mdn_loss(z, lg, mu, lv, reduction="none"), want,
                      *_tol(dt, scale))
        yield compare("vtadl_code_mdn_loss[mean]", (b, n, kk, d), dt,
                      m.vtadl_code_mdn_loss(z, lg, mu, lv), np.mean(np.sum(want, 1)),
                      *_tol(dt, scale * n))
        if dt == "bfloat16":
            continue  # triangular solves take float32/64
        kf, df = 4, 3
        a = rng.normal(size=(b, n, kf, df, df)) * 0.3
        chol, cr = _cast(np.tril(a) + np.eye(df) * 1.0, dt)
        zf, zfr = _cast(rng.normal(size=(b, n, df)), dt)
        mf, mfr = _cast(rng.normal(size=(b, n, kf, df)), dt)
        lf, lfr = _cast(rng.normal(size=(b, n, kf)), dt)
        yield compare("mixture_nll_full_cov", (b, n, kf, df), dt,
                      m.mixture_nll_full_cov(zf, lf, mf, chol, k_chunk=3),
                      ref.mixture_nll_full_cov(zfr, lfr, mfr, cr), *_tol(dt))


def check_gaussians(rng, dtypes, quick: bool) -> Iterator[Check]:
    g = _mod("kernels.gaussian")
    n, p, c = (24, 4, 6) if quick else (200, 49, 64)
    mix = rng.normal(size=(p, c, c)) / np.sqrt(c)
    x0 = np.einsum("pcd,npd->npc", mix, rng.normal(size=(n, p, c))) + 20.0
    for dt in (d for d in dtypes if d != "bfloat16"):
        x, xr = _cast(x0, dt)
        half = n // 3
        a = g.update(g.init(p, c, dtype=dt), x[:half])
        stats = g.merge(a, g.update(g.init(p, c, dtype=dt), x[half:]))
        shape = (n, p, c)
        yield compare("gaussian.update+merge[m2]", shape, dt, stats.m2, ref.centred_sums(xr),
                      *_tol(dt, 5))
        mean, cov = g.finalize(stats, eps=0.01)
        want_mean, want_cov = ref.gaussian_fit(xr, 0.01)
        yield compare("gaussian.finalize[mean]", shape, dt, mean, want_mean, *_tol(dt))
        yield compare("gaussian.finalize[cov]", shape, dt, cov, want_cov, *_tol(dt, 5))
        cov_in, covr = _cast(want_cov, dt)
        yield compare("cholesky_factor", (p, c, c), dt, g.cholesky_factor(cov_in),
                      ref.cholesky(covr), *_tol(dt, 5))
        chol_in, _ = _cast(ref.cholesky(covr), dt)
        t, tr = _cast(x0[:8] + rng.normal(size=(8, p, c)), dt)
        mean_in, meanr = _cast(want_mean, dt)
        want = ref.mahalanobis(tr, meanr, covr)
        yield compare("mahalanobis[solve]", (8, p, c), dt, g.mahalanobis(t, mean_in, chol_in),
                      want, *_tol(dt, 5))
        yield compare("mahalanobis[whitened]", (8, p, c), dt,
                      g.mahalanobis_whitened(t, mean_in, g.whitening_matrix(chol_in)), want,
                      *_tol(dt, 5))


def check_capsules(rng, dtypes, quick: bool) -> Iterator[Check]:
    cap = _mod("kernels.capsule")
    b, n_in, n_out, d_in, d_out = (2, 6, 3, 4, 5) if quick else (4, 32, 10, 8, 16)
    for dt in dtypes:
        s, sr = _cast(rng.normal(size=(b, n_out, d_out)), dt)
        yield compare("squash", s.shape, dt, cap.squash(s), ref.squash(sr), *_tol(dt))
        u, ur = _cast(rng.normal(size=(b, n_in, d_in)), dt)
        w, wr = _cast(rng.normal(size=(n_in, n_out, d_out, d_in)) * 0.3, dt)
        got = cap.dynamic_routing(cap.capsule_votes(u, w), 3)
        yield compare("capsule_votes+dynamic_routing[3]", (b, n_in, n_out, d_out), dt, got,
                      ref.dynamic_routing(ur, wr, 3), *_tol(dt, 5))
        w1, w1r = _cast(rng.normal(size=(n_in, d_out, d_in)) * 0.3, dt)
        g, gr = _cast(rng.normal(size=(b, d_out)), dt)
        y, pull = jax.vjp(cap.single_capsule_sum, u, w1)
        du, dw = pull(g)
        du_want, dw_want = ref.single_capsule_sum_vjp(ur, w1r, gr)
        for name, got_val, want_val in (("", y, ref.single_capsule_sum(ur, w1r)),
                                        (" du", du, du_want), (" dW", dw, dw_want)):
            yield compare(f"single_capsule_sum{name}", (b, n_in, d_out, d_in), dt, got_val,
                          want_val, *_tol(dt, 5))


def check_convolutions(rng, dtypes, quick: bool) -> Iterator[Check]:
    """conv_transpose values and both gradients in every gradient and forward form, and the
    adjoint of SSIM's separable blur, against float64 definitions."""
    ct, ss = _mod("kernels.conv_transpose"), _mod("kernels.ssim")
    cases = [(3, 2, 1), (7, 5, 1), (11, 1, 0)] if quick else \
        [(3, 2, 1), (9, 3, 1), (7, 5, 1), (9, 2, 0), (6, 1, 0), (11, 1, 0)]
    for k, s, p in cases:  # the VT-ADL code decoder's (kernel, stride, padding)
        for dt in dtypes:
            x, xr = _cast(rng.normal(size=(2, 5, 4, 3)), dt)
            w, wr = _cast(rng.normal(size=(k, k, 3, 4)) / k, dt)
            want = ref.conv_transpose(xr, wr, s, p)
            g, gr = _cast(rng.normal(size=want.shape), dt)
            dx_want, dw_want = ref.conv_transpose_vjp(xr, wr, gr, s, p)
            for impl, fwd in (("conv", "conv"), ("gemm", "conv"), ("blocked", "conv"),
                              ("blocked", "wblocked")):
                tag = f"conv_transpose[k{k} s{s} p{p}, {impl}" + (
                    f", fwd {fwd}]" if fwd != "conv" else "]")
                y, pull = jax.vjp(lambda a, b: ct.conv_transpose(a, b, s, p, grad_impl=impl,
                                                                 fwd_impl=fwd), x, w)
                dx, dw = pull(g)
                outs = [("dx", x.shape, dx, dx_want), ("dw", w.shape, dw, dw_want)]
                if impl == "conv" or fwd != "conv":  # each forward form once
                    outs.insert(0, ("", x.shape, y, want))
                for name, shape, got, ref_val in outs:
                    yield compare(f"{tag} {name}".rstrip(), shape, dt, got, ref_val,
                                  *_sum_tol(dt, ref_val))
    for dt in dtypes:
        h, wd = (13, 11) if quick else (40, 33)
        taps = np.asarray(ss._gaussian_window(11, 1.5, jnp.float64 if dt == "float64"
                                              else jnp.float32), np.float64)
        z, _ = _cast(rng.normal(size=(2, 3, h, wd)), dt)  # planes: spatial axes last
        g, gr = _cast(rng.normal(size=(2, 3, h, wd)), dt)
        _, pull = jax.vjp(lambda a: ss._separable_blur(a, jnp.asarray(taps, z.dtype), "same"),
                          z)
        mh, mw = (ref.separable_blur_matrix(n, taps, "same") for n in (h, wd))
        want = np.einsum("ih,ncij,jw->nchw", mh, gr, mw)  # M_h^T g M_w
        yield compare("ssim blur adjoint[same]", z.shape, dt, pull(g)[0], want, *_tol(dt, 2))


def check_metrics(rng, dtypes, quick: bool) -> Iterator[Check]:
    met = _mod("metrics")
    n, h = (6, 12) if quick else (12, 32)
    labels = np.arange(4 * n) % 3 == 0
    scores = np.round(rng.normal(size=4 * n) + labels, 1).astype(np.float32)  # with ties
    yield compare("auroc", scores.shape, "float32", met.auroc(scores, labels),
                  ref.auroc(scores, labels), 1e-12, 1e-12)
    yield compare("average_precision", scores.shape, "float32",
                  met.average_precision(scores, labels),
                  ref.average_precision(scores, labels), 1e-12, 1e-12)
    masks = np.zeros((n, h, h), bool)
    masks[1, 2:5, 3:7] = masks[1, 8:10, 8:11] = masks[3, 5:9, 1:4] = True
    maps = np.round(rng.normal(size=masks.shape) + 1.5 * masks, 1).astype(np.float32)
    yield compare("aupro[0.3]", masks.shape, "float32", met.aupro(maps, masks, 0.3),
                  ref.aupro(maps, masks, 0.3), 1e-10, 1e-10)


def check_data_parallel(rng, dtypes, quick: bool) -> Iterator[Check]:
    """shard_map over every local device == the same computation on one device."""
    from jax.sharding import PartitionSpec as P

    g, m = _mod("kernels.gaussian"), _mod("kernels.mixture")
    devices = jax.local_devices()
    nd = len(devices)
    mesh = jax.make_mesh((nd,), ("d",), devices=devices,
                         axis_types=(jax.sharding.AxisType.Auto,))
    split = jax.sharding.NamedSharding(mesh, P("d"))
    x_host = np.asarray(rng.normal(size=(4 * nd, 5, 6)) + 3.0, np.float32)
    x = jax.device_put(x_host, split)

    @functools.partial(jax.shard_map, mesh=mesh, in_specs=P("d"), out_specs=P())
    def sharded(xs):
        return g.merge_across(g.update(g.init(5, 6, dtype=jnp.float32), xs), "d")

    one = jax.device_put(x_host, devices[0])
    want = g.update(g.init(5, 6, dtype=jnp.float32), one)
    got = jax.jit(sharded)(x)
    tag = f"{nd} devices"
    yield compare("shard_map gaussian update[m2]", tag, "float32", got.m2, want.m2, 1e-5, 1e-4)
    yield compare("shard_map gaussian update[mean]", tag, "float32", got.mean, want.mean,
                  1e-6, 1e-5)
    z_host = np.asarray(rng.normal(size=(2 * nd, 3, 4)), np.float32)
    z = jax.device_put(z_host, split)
    lg, mu = jnp.zeros((6,)), jnp.asarray(rng.normal(size=(6, 4)), jnp.float32)

    def mean_nll(means, zs):
        return jnp.mean(m.mixture_nll(zs, lg, means, jnp.ones_like(means), k_chunk=4))

    @functools.partial(jax.shard_map, mesh=mesh, in_specs=(P(), P("d")), out_specs=P())
    def grad_sharded(means, zs):
        means = jax.lax.pcast(means, "d", to="varying")
        return jax.lax.pmean(jax.grad(mean_nll)(means, zs), "d")

    yield compare("shard_map mixture_nll grad", tag, "float32", jax.jit(grad_sharded)(mu, z),
                  jax.grad(mean_nll)(mu, jax.device_put(z_host, devices[0])), 1e-5, 1e-6)


CHECKS: tuple[Callable, ...] = (check_images, check_mixtures, check_gaussians, check_capsules,
                                check_convolutions, check_metrics, check_data_parallel)


def run(quick: bool = False, seed: int = 0) -> dict:
    """Run every check; returns {"backend", "device_kind", "checks": [...], "passed", ...}."""
    dtypes = ["float32", "bfloat16"] + (["float64"] if jax.config.jax_enable_x64 else [])
    rng = np.random.default_rng(seed)
    checks, start = [], time.perf_counter()
    for fn in CHECKS:
        try:
            checks.extend(fn(rng, dtypes, quick))
        except Exception as err:  # a crashing kernel is a failed check, not a crash
            checks.append(Check(fn.__name__, "-", "-", np.inf, np.inf, 0, 0, False,
                                f"{type(err).__name__}: {err}"[:200]))
    return {"backend": jax.default_backend(), "device_kind": jax.devices()[0].device_kind,
            "num_devices": jax.local_device_count(), "x64": bool(jax.config.jax_enable_x64),
            "quick": quick, "seconds": round(time.perf_counter() - start, 1),
            "passed": all(c.passed for c in checks),
            "checks": [dataclasses.asdict(c) for c in checks]}


def format_table(result: dict) -> str:
    head = f"{'kernel':40} {'shape':22} {'dtype':8} {'max abs':>9} {'max rel':>9} " \
           f"{'rtol':>7} {'atol':>7}  pass"
    lines = [head, "-" * len(head)]
    for c in result["checks"]:
        lines.append(f"{c['kernel']:40} {c['shape'][:22]:22} {c['dtype']:8} "
                     f"{c['max_abs']:9.2e} {c['max_rel']:9.2e} {c['rtol']:7.0e} "
                     f"{c['atol']:7.0e}  {'ok' if c['passed'] else 'FAIL'}"
                     + (f"  {c['note']}" if c["note"] else ""))
    failed = sum(not c["passed"] for c in result["checks"])
    lines.append(f"{len(result['checks']) - failed}/{len(result['checks'])} passed on "
                 f"{result['backend']} ({result['device_kind']}, {result['num_devices']} "
                 f"local devices) in {result['seconds']} s")
    return "\n".join(lines)
