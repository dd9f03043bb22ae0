"""PNG plots of the patch-Gaussian bottle sweep (experiments/sweep_pg_bottle.py)."""

from __future__ import annotations

import os
from collections import defaultdict


def _label(r: dict) -> str:
    return f"{r['size']}px {'+'.join(s.replace('block', 'b') for s in r['stages'])}"


def _series(rows, select, x_key):
    """{label: sorted [(x, row)]} over the rows that `select` keeps."""
    out = defaultdict(list)
    for r in rows:
        if select(r):
            out[_label(r)].append((r[x_key], r))
    return {k: sorted(v, key=lambda t: t[0]) for k, v in sorted(out.items())}


def _line_panels(path: str, rows, select, x_key: str, xlabel: str, title: str,
                 log_x: bool = False) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = (("pixel_auroc", "pixel AUROC"), ("aupro", "AUPRO (FPR 0.3)"),
               ("pixel_ap", "pixel AP"))
    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    for label, points in _series(rows, select, x_key).items():
        xs = [x for x, _ in points]
        style = "-" if label.startswith("224") else ("--" if label.startswith("256") else ":")
        for ax, (key, _) in zip(axes, metrics):
            ax.plot(xs, [r[key] for _, r in points], style, marker="o", markersize=3,
                    label=label)
    for ax, (_, name) in zip(axes, metrics):
        ax.set_xlabel(xlabel)
        ax.set_ylabel(name)
        if log_x:
            ax.set_xscale("log")
        ax.grid(alpha=0.3)
    if axes[0].lines:
        axes[0].legend(fontsize=6)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def _subset_bars(path: str, rows) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    pick = lambda sub: {_label(r): r for r in rows  # noqa: E731
                        if r["eps"] == 0.01 and r["blur_sigma"] == 4.0
                        and r["channel_subset"] == sub}
    full, part = pick(0), pick(100)
    labels = [k for k in full if k in part]
    x = np.arange(len(labels))
    fig, ax = plt.subplots(figsize=(max(5, 0.7 * len(labels) + 2), 3.5))
    ax.bar(x - 0.2, [full[k]["aupro"] for k in labels], 0.4, label="all channels")
    ax.bar(x + 0.2, [part[k]["aupro"] for k in labels], 0.4, label="100 random (seed 0)")
    ax.set_xticks(x, labels, rotation=30, ha="right", fontsize=7)
    lo = min([full[k]["aupro"] for k in labels] + [part[k]["aupro"] for k in labels] + [1])
    ax.set_ylim(max(0.0, lo - 0.05), 1.0)
    ax.set_ylabel("AUPRO (FPR 0.3)")
    ax.set_title("channel subset (PaDiM) vs all, eps 0.01, sigma 4", fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def save_sweep_plots(out: str, rows: list[dict]) -> list[str]:
    """sigma.png (eps 0.01, all channels), eps.png (sigma 4), subset.png."""
    os.makedirs(out, exist_ok=True)
    return [
        _line_panels(os.path.join(out, "sigma.png"), rows,
                     lambda r: r["eps"] == 0.01 and r["channel_subset"] == 0, "blur_sigma",
                     "blur sigma (pixels at the input size)",
                     "Bottle: blur sigma (eps 0.01, all channels); line style = input size"),
        _line_panels(os.path.join(out, "eps.png"), rows,
                     lambda r: r["blur_sigma"] == 4.0 and r["channel_subset"] == 0, "eps",
                     "eps (Sigma + eps I)", "Bottle: covariance regulariser (sigma 4)",
                     log_x=True),
        _subset_bars(os.path.join(out, "subset.png"), rows),
    ]
