"""Pictures and tables a person looks at: heatmap overlays, curves, Markdown/CSV tables.

Matplotlib with the non-interactive Agg backend; every figure is written as a PNG and
closed. Nothing here computes a metric: numbers come from `vtadl_jax.evaluate`.
"""

from __future__ import annotations

import csv
import os
from typing import Any, Iterable, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def _to_display(image: np.ndarray) -> np.ndarray:
    """(H, W, C) or (H, W) float image in any range -> (H, W, 3) in [0, 1]."""
    image = np.asarray(image, np.float32)
    if image.ndim == 2:
        image = image[..., None]
    if image.shape[-1] == 1:
        image = np.repeat(image, 3, axis=-1)
    lo, hi = float(image.min()), float(image.max())
    return (image - lo) / (hi - lo) if hi > lo else np.zeros_like(image)


def save_overlays(path: str, images: np.ndarray, maps: np.ndarray,
                  masks: np.ndarray | None = None, *, titles: Sequence[str] | None = None,
                  vmin: float | None = None, vmax: float | None = None,
                  predicted: np.ndarray | None = None, map_title: str = "anomaly map") -> str:
    """One PNG with a row per image: input, anomaly map, overlay with mask contours.

    Args:
      images: (N, H, W[, C]) test images (any range; each is min-max scaled for display).
      maps: (N, H, W) anomaly maps; one colour scale for all rows (vmin/vmax default to
        the maps' 1st and 99.9th percentiles) so rows are comparable.
      masks: optional (N, H, W) binary ground truth, drawn as a white contour.
      predicted: optional (N, H, W) binary predicted masks, drawn as a red contour.
      map_title: the title of the middle panel.
    """
    images, maps = np.asarray(images), np.asarray(maps, np.float32)
    if maps.ndim != 3 or images.shape[0] != maps.shape[0]:
        raise ValueError(f"maps: expected (N, H, W) matching images' N, got {maps.shape} vs {images.shape}")
    n = maps.shape[0]
    vmin = float(np.percentile(maps, 1)) if vmin is None else vmin
    vmax = float(np.percentile(maps, 99.9)) if vmax is None else vmax
    fig, axes = plt.subplots(n, 3, figsize=(7.5, 2.5 * n), squeeze=False)
    for i in range(n):
        img = _to_display(images[i])
        axes[i, 0].imshow(img)
        axes[i, 0].set_title(titles[i] if titles else "image", fontsize=8)
        axes[i, 1].imshow(maps[i], cmap="jet", vmin=vmin, vmax=vmax)
        axes[i, 1].set_title(map_title, fontsize=8)
        axes[i, 2].imshow(img)
        axes[i, 2].imshow(maps[i], cmap="jet", alpha=0.45, vmin=vmin, vmax=vmax)
        overlay_title = "overlay"
        for outline, colour, name in ((masks, "white", "ground truth"),
                                      (predicted, "red", "predicted mask")):
            if outline is None:
                continue
            overlay_title += f" + {name} ({colour})"
            if np.asarray(outline[i]).any():
                axes[i, 2].contour(np.asarray(outline[i]) > 0, levels=[0.5], colors=colour,
                                   linewidths=1)
        axes[i, 2].set_title(overlay_title, fontsize=8)
        for ax in axes[i]:
            ax.axis("off")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def pick_examples(labels: np.ndarray, scores: np.ndarray, count: int = 6) -> np.ndarray:
    """Indices of a small, informative sample: the highest- and lowest-scored anomalous
    images and the highest-scored normal ones (the failures a person wants to see)."""
    labels, scores = np.asarray(labels), np.asarray(scores)
    order = np.argsort(-scores, kind="stable")
    anomalous = [i for i in order if labels[i] == 1]
    normal = [i for i in order if labels[i] == 0]
    half = max(1, count // 3)
    chosen = anomalous[:half] + anomalous[::-1][:half] + normal[:max(0, count - 2 * half)]
    # When a class is small (or missing) the picks above overlap or run short: fill up
    # with the next-highest normal images, then the remaining anomalous ones.
    chosen += normal + anomalous
    seen: list[int] = []
    for i in chosen:
        if len(seen) == count:
            break
        if int(i) not in seen:
            seen.append(int(i))
    return np.asarray(seen, np.int64)


def save_curve(path: str, curves: dict[str, tuple[np.ndarray, np.ndarray]], *, xlabel: str,
               ylabel: str, title: str = "", logx: bool = False, diagonal: bool = False) -> str:
    """Line plot of named (x, y) curves, e.g. ROC curves or cost against K."""
    fig, ax = plt.subplots(figsize=(5, 4))
    for name, (x, y) in curves.items():
        ax.plot(x, y, marker="o" if len(x) < 30 else None, label=name)
    if diagonal:
        ax.plot([0, 1], [0, 1], "k--", linewidth=0.8)
    if logx:
        ax.set_xscale("log", base=2)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _fmt(value: Any) -> str:
    if value is None or (isinstance(value, (float, np.floating)) and np.isnan(value)):
        return "-"
    if isinstance(value, (float, np.floating)):  # np.float32 is not a float subclass
        return f"{float(value):.3f}"
    return str(value).replace("|", "\\|")  # a bare "|" would split the cell


def markdown_table(rows: Iterable[dict[str, Any]], columns: Sequence[str]) -> str:
    """A GitHub Markdown table of `rows` restricted to `columns` (missing values as '-')."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(_fmt(row.get(c)) for c in columns) + " |")
    return "\n".join(lines) + "\n"


def write_tables(stem: str, rows: list[dict[str, Any]], columns: Sequence[str],
                 *, title: str = "") -> tuple[str, str]:
    """Write `stem`.md and `stem`.csv with the same rows; returns both paths."""
    os.makedirs(os.path.dirname(os.path.abspath(stem)), exist_ok=True)
    md = (f"# {title}\n\n" if title else "") + markdown_table(rows, columns)
    with open(stem + ".md", "w") as f:
        f.write(md)
    with open(stem + ".csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns), extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({c: row.get(c, "") for c in columns})
    return stem + ".md", stem + ".csv"
