"""Shared machinery of the experiment runners: cached runs, tables with the paper's
numbers beside the measured ones, and the machine a result was measured on.

Every unit of work (one digit, one category, one K) writes its result to
`<out>/runs/<key>.json` when it finishes; a rerun loads finished units instead of
recomputing them, so an interrupted sweep continues where it stopped (`--fresh`
recomputes).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from typing import Any, Callable, Sequence

import jax

from vtadl_jax.records import write_json_atomic
from vtadl_jax.report import write_tables


def machine() -> dict[str, Any]:
    """Where a figure was measured (recorded with every result)."""
    dev = jax.devices()[0]
    return {"platform": dev.platform, "device": getattr(dev, "device_kind", str(dev)),
            "num_devices": jax.device_count(), "cpu_count": os.cpu_count(),
            "python": platform.python_version(), "jax": jax.__version__,
            "host": platform.machine()}


def cached(out_dir: str, key: str, fn: Callable[[], dict[str, Any]], *,
           fresh: bool = False) -> dict[str, Any]:
    """Run `fn` once per key; its dict result (plus seconds and machine) is stored."""
    path = os.path.join(out_dir, "runs", f"{key}.json")
    if os.path.isfile(path) and not fresh:
        with open(path) as f:
            result = json.load(f)
        print(f"[cached] {key}")
        return result
    start = time.perf_counter()
    result = dict(fn())
    result.setdefault("seconds", time.perf_counter() - start)
    result.setdefault("machine", machine())
    write_json_atomic(result, path)
    return result


def parse_args(description: str, extra: Callable[[argparse.ArgumentParser], None] | None = None,
               argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse a runner's command line.

    When ``extra`` adds a positional ``overrides`` (config ``key=value`` pairs), every
    ``key=value`` token is taken as an override wherever it stands, so that
    ``--digits 7 8 num_steps=600`` works: argparse alone would hand ``num_steps=600``
    to ``--digits`` (nargs="+") and fail.
    """
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--out", required=True, help="output folder (tables, plots, cached runs)")
    parser.add_argument("--fresh", action="store_true", help="recompute cached runs")
    if extra:
        extra(parser)
    argv = list(sys.argv[1:] if argv is None else argv)
    takes_overrides = any(a.dest == "overrides" and not a.option_strings
                          for a in parser._actions)
    if not takes_overrides:
        return parser.parse_args(argv)
    is_override = [("=" in a and not a.startswith("-")) for a in argv]
    args = parser.parse_args([a for a, o in zip(argv, is_override) if not o])
    args.overrides = list(args.overrides) + [a for a, o in zip(argv, is_override) if o]
    return args


def write_report(out_dir: str, stem: str, rows: list[dict[str, Any]], columns: Sequence[str],
                 *, title: str, notes: Sequence[str] = ()) -> str:
    """`<out>/<stem>.md` and `.csv`; notes are appended to the Markdown under the table."""
    md, _ = write_tables(os.path.join(out_dir, stem), rows, columns, title=title)
    if notes:
        with open(md, "a") as f:
            f.write("\n" + "\n".join(f"- {n}" for n in notes) + "\n")
    with open(md) as f:
        print(f.read())
    return md


def mean_row(rows: list[dict[str, Any]], label_key: str, label: str,
             columns: Sequence[str]) -> dict[str, Any]:
    """A 'mean' row over the numeric columns present in every row."""
    out: dict[str, Any] = {label_key: label}
    for c in columns:
        values = [r[c] for r in rows if isinstance(r.get(c), (int, float))]
        if values and len(values) == len(rows):
            out[c] = sum(values) / len(values)
    return out


def missing_dataset_note(name: str, env_var: str, layout: str) -> str:
    return (f"{name} was not found (set {env_var}=/path/to/{layout} to run on it; it cannot "
            "be downloaded on the project machines). This run used the generated "
            "MVTec-layout set instead, to prove the machinery end to end.")


def mvtec_categories(root: str, categories: Sequence[str] | None) -> tuple[list[str], list[str]]:
    """The requested (default: all 15) MVTec AD categories present under `root`, and notes.

    A root holding only some categories runs those and notes the missing ones; none
    present (or a bad root/category name) exits with status 2 and one message.
    """
    from vtadl_jax.data import DatasetError, mvtec_categories_present

    try:
        present, missing = mvtec_categories_present(root, categories)
    except DatasetError as err:
        print(f"error: MVTEC_AD_ROOT={root}: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    notes = []
    if missing:
        notes.append(f"MVTec AD categories not found under {root} (not run): "
                     f"{', '.join(missing)}")
        print(f"note: {notes[-1]}")
    return present, notes


def save_bars(path: str, labels: list[str], values: list[float], *, reference: float | None,
              reference_label: str, ylabel: str, title: str) -> str:
    """A small bar chart (one bar per unit) with an optional horizontal reference line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(3.5, 0.5 * len(labels) + 1.5), 3.2))
    bars = ax.bar(labels, values, color="tab:blue")
    for b, v in zip(bars, values):
        ax.text(b.get_x() + b.get_width() / 2, v, f"{v:.3f}", ha="center", va="bottom",
                fontsize=7)
    if reference is not None:
        ax.axhline(reference, color="tab:red", linestyle="--", linewidth=1, label=reference_label)
        ax.legend(fontsize=7, loc="lower right")
    ax.set_ylim(0, 1.05)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def vtadl_config_note(runs: list[dict[str, Any]], overrides: Sequence[str]) -> str:
    """The table note that says which VT-ADL config produced the runs."""
    cfg = runs[0]["config"] if runs else {}
    return (f"config: variant {cfg.get('model', {}).get('variant')}, batch "
            f"{cfg.get('batch_size')}, lr {cfg.get('optim', {}).get('learning_rate')}, "
            f"score_form {runs[0].get('score_form') if runs else '-'}; overrides: "
            f"{' '.join(overrides) or '(none)'}. steps: training steps run; "
            "final_loss: training loss at the last step.")


def save_loglog(fig, axes, path: str, *, xlabel: str, ylabels: Sequence[str], title: str,
                legend_fontsize: float = 7) -> str:
    """Finish a row of cost-vs-size panels: log2 x, log y, grid, legend; save as PNG."""
    import matplotlib.pyplot as plt

    for ax, ylabel in zip(axes, ylabels):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=legend_fontsize)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
