"""Timing of the SSIM and Gaussian-blur kernels against reference implementations.

``run()`` returns one row per (kernel, implementation): the median wall time of one call
(after a warm-up call that also compiles the jitted functions) and its ratio to ours
(> 1: slower than ours). Reference implementations: ``dm_pix.ssim`` (jitted),
``skimage.metrics.structural_similarity`` (a Python loop over the images) and
``scipy.ndimage.gaussian_filter`` (a loop over the maps). Sizes are CI-sized; the whole
run takes well under 30 s on a laptop CPU.

    python -m experiments.benchmarks.bench_ssim_filters
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

from vtadl_jax.kernels.filters import gaussian_blur  # noqa: E402
from vtadl_jax.kernels.ssim import ssim  # noqa: E402


def _median_ms(fn: Callable[[], object], repeats: int) -> float:
    jax.block_until_ready(fn())  # warm-up / compile
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _rows(kernel: str, shape: tuple, timings: dict[str, float]) -> list[dict]:
    ours = timings["vtadl_jax"]
    return [dict(kernel=kernel, impl=name, shape="x".join(map(str, shape)), ms=ms,
                 ratio_to_ours=ms / ours) for name, ms in timings.items()]


def bench_ssim(shape=(8, 256, 256, 3), repeats: int = 5) -> list[dict]:
    """Our jitted ssim (padding="valid", as the references) vs dm_pix and skimage."""
    import dm_pix
    from skimage.metrics import structural_similarity

    rng = np.random.default_rng(0)
    x_np = rng.random(shape, dtype=np.float32)
    y_np = np.clip(x_np + 0.1 * rng.standard_normal(shape, dtype=np.float32), 0, 1)
    x, y = jnp.asarray(x_np), jnp.asarray(y_np)
    ours = jax.jit(functools.partial(ssim, max_val=1.0, padding="valid"))
    ours_same = jax.jit(functools.partial(ssim, max_val=1.0, padding="same"))
    pix = jax.jit(functools.partial(dm_pix.ssim, max_val=1.0))

    def skimage_loop():
        return [structural_similarity(a, b, gaussian_weights=True, sigma=1.5,
                                      use_sample_covariance=False, data_range=1.0,
                                      channel_axis=-1) for a, b in zip(x_np, y_np)]

    timings = {
        "vtadl_jax": _median_ms(lambda: ours(x, y), repeats),
        "vtadl_jax (same)": _median_ms(lambda: ours_same(x, y), repeats),
        "dm_pix (jit)": _median_ms(lambda: pix(x, y), repeats),
        "skimage (loop)": _median_ms(skimage_loop, max(1, repeats // 2)),
    }
    return _rows("ssim", shape, timings)


def bench_blur(shape=(16, 224, 224), sigma: float = 4.0, repeats: int = 5) -> list[dict]:
    """Our jitted gaussian_blur vs scipy.ndimage.gaussian_filter per map."""
    from scipy import ndimage

    maps_np = np.random.default_rng(1).random(shape, dtype=np.float32)
    maps = jnp.asarray(maps_np)
    ours = jax.jit(functools.partial(gaussian_blur, sigma=sigma))

    def scipy_loop():
        return [ndimage.gaussian_filter(m, sigma) for m in maps_np]

    timings = {
        "vtadl_jax": _median_ms(lambda: ours(maps), repeats),
        "scipy (loop)": _median_ms(scipy_loop, repeats),
    }
    return _rows(f"gaussian_blur(sigma={sigma:g})", shape, timings)


def run() -> list[dict]:
    """All rows: kernel, impl, shape, ms (median per call), ratio_to_ours."""
    return bench_ssim() + bench_blur()


def _format(rows: list[dict]) -> str:
    head = f"{'kernel':<24} {'impl':<18} {'shape':<14} {'ms':>9} {'ratio':>7}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['kernel']:<24} {r['impl']:<18} {r['shape']:<14} "
                     f"{r['ms']:>9.2f} {r['ratio_to_ours']:>7.2f}")
    return "\n".join(lines)


if __name__ == "__main__":
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}")
    print(_format(run()))
