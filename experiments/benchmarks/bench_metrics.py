"""Benchmark of the exact metrics: speed and memory of AUPRO and AUROC.

Rows:
- aupro on 120 maps of 512x512 (an MVTec-sized test set, 31.5 M pixels), time and peak
  traced memory (tracemalloc; NumPy reports its buffers to it);
- aupro on a medium set (20 maps 256x256);
- aupro on a small set (8 maps 48x48, ~18 k distinct thresholds) against the direct
  threshold-by-threshold definition (below), with the speed ratio and the difference;
- auroc on the 31.5 M pixels against scikit-learn's roc_auc_score (if installed).

Run: ``python -m experiments.benchmarks.bench_metrics`` (under a minute on 2 CPU
cores, most of it in the two references). ``run()`` returns the rows as dicts.
"""
from __future__ import annotations

if __name__ == "__main__":  # first, before jax loads: huge-page malloc (vtadl_jax.hostmem)
    from vtadl_jax.hostmem import reexec_with_hugepage_malloc

    reexec_with_hugepage_malloc()

import time  # noqa: E402
import tracemalloc  # noqa: E402
from typing import Any, Callable  # noqa: E402

import numpy as np  # noqa: E402
from scipy import ndimage  # noqa: E402

from vtadl_jax.metrics import aupro, auroc  # noqa: E402


def make_case(n: int, size: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Synthetic test set: maps (n, size, size) float32, masks (n, size, size) bool.

    A third of the images are anomaly-free; the others hold 1-3 rectangles of random
    size (a few percent of the image); maps are uniform noise raised inside the defects.
    """
    rng = np.random.default_rng(seed)
    masks = np.zeros((n, size, size), dtype=bool)
    for i in range(n // 3, n):
        for _ in range(rng.integers(1, 4)):
            h, w = rng.integers(size // 32 + 1, size // 6 + 2, size=2)
            y, x = rng.integers(0, size - h), rng.integers(0, size - w)
            masks[i, y:y + h, x:x + w] = True
    maps = rng.random(masks.shape, dtype=np.float32)
    maps += np.float32(0.4) * masks
    return maps, masks


def direct_aupro(maps: np.ndarray, masks: np.ndarray, fpr_limit: float = 0.3) -> float:
    """AUPRO straight from the definition: one pass over the pixels per distinct score."""
    maps = np.asarray(maps, dtype=np.float64)
    regions = np.zeros(masks.shape, dtype=np.int64)
    offset = 0
    for i in range(masks.shape[0]):
        lab, num = ndimage.label(masks[i], structure=np.ones((3, 3)))
        regions[i] = np.where(lab > 0, lab + offset, 0)
        offset += num
    sizes = np.bincount(regions.ravel(), minlength=offset + 1)[1:]
    normal = ~masks.astype(bool)
    fprs, pros = [0.0], [0.0]
    for t in np.unique(maps)[::-1]:
        pred = maps >= t
        fprs.append(np.count_nonzero(pred & normal) / np.count_nonzero(normal))
        hits = np.bincount(regions[pred], minlength=offset + 1)[1:]
        pros.append(float(np.mean(hits / sizes)))
    area = 0.0
    for x0, x1, y0, y1 in zip(fprs[:-1], fprs[1:], pros[:-1], pros[1:]):
        if x1 <= fpr_limit:
            area += (x1 - x0) * (y0 + y1) / 2
        else:
            if x0 < fpr_limit:
                y_cut = y0 + (y1 - y0) * (fpr_limit - x0) / (x1 - x0)
                area += (fpr_limit - x0) * (y0 + y_cut) / 2
            break
    return area / fpr_limit


def _timed(fn: Callable[[], Any], repeat: int = 1) -> tuple[float, Any]:
    best, out = float("inf"), None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def _peak_mib(fn: Callable[[], Any]) -> float:
    tracemalloc.start()
    tracemalloc.reset_peak()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1] / 2**20
    finally:
        tracemalloc.stop()


def run() -> list[dict[str, Any]]:
    """All benchmark rows (see the module docstring)."""
    rows: list[dict[str, Any]] = []

    maps, masks = make_case(8, 48, seed=1)
    t_ours, v_ours = _timed(lambda: aupro(maps, masks), repeat=3)
    t_ref, v_ref = _timed(lambda: direct_aupro(maps, masks))
    rows.append(dict(metric="aupro", case="8x48x48", pixels=maps.size,
                     thresholds=int(np.unique(maps).size), ours_s=t_ours,
                     reference="direct definition", reference_s=t_ref,
                     speedup=t_ref / t_ours, value=v_ours, abs_diff=abs(v_ours - v_ref)))

    maps, masks = make_case(20, 256, seed=2)
    t_ours, v_ours = _timed(lambda: aupro(maps, masks), repeat=2)
    rows.append(dict(metric="aupro", case="20x256x256", pixels=maps.size, ours_s=t_ours,
                     value=v_ours))

    maps, masks = make_case(120, 512, seed=3)
    t_ours, v_ours = _timed(lambda: aupro(maps, masks))
    peak = _peak_mib(lambda: aupro(maps, masks))
    rows.append(dict(metric="aupro", case="120x512x512", pixels=maps.size, ours_s=t_ours,
                     value=v_ours, peak_mib=peak,
                     peak_bytes_per_pixel=peak * 2**20 / maps.size,
                     input_mib=(maps.nbytes + masks.nbytes) / 2**20))

    t_ours, v_ours = _timed(lambda: auroc(maps, masks))
    row = dict(metric="auroc", case="120x512x512", pixels=maps.size, ours_s=t_ours,
               value=v_ours)
    try:
        from sklearn.metrics import roc_auc_score
    except ImportError:  # optional reference
        row["reference"] = "sklearn not installed"
    else:
        t_ref, v_ref = _timed(lambda: roc_auc_score(masks.ravel(), maps.ravel()))
        row.update(reference="sklearn roc_auc_score", reference_s=t_ref,
                   speedup=t_ref / t_ours, abs_diff=abs(v_ours - v_ref))
    rows.append(row)
    return rows


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) >= 1e-3 or value == 0 else f"{value:.1e}"
    return str(value)


def main() -> None:
    rows = run()
    cols = ["metric", "case", "pixels", "thresholds", "ours_s", "reference", "reference_s",
            "speedup", "value", "abs_diff", "peak_mib", "peak_bytes_per_pixel", "input_mib"]
    cols = [c for c in cols if any(c in r for r in rows)]
    table = [cols] + [[_fmt(r.get(c, "")) for c in cols] for r in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(cols))]
    for line in table:
        print("  ".join(cell.ljust(w) for cell, w in zip(line, widths)))


if __name__ == "__main__":
    main()
