"""Benchmark runner: every kernel against its reference, the metrics, the patch-Gaussian
fit, and the VT-ADL train step; prints tables and stores them with the machine.

    python experiments/benchmark.py --out experiments/results/bench            # all
    python experiments/benchmark.py --out /tmp/bench --only ssim_filters metrics

    python experiments/benchmark.py --out experiments/results/bench --report    # no runs

With --only, the suites not rerun keep the tables stored in <out>/<suite>.json by an
earlier run (marked so in benchmarks.md); the machine is that of the latest run.
--report rewrites benchmarks.md from the stored JSONs alone (nothing is measured).
benchmarks.md has one section per suite and, inside it, one table per kind of row (the
rows' "table" or "bench" field), each with only the columns its rows have.

Each suite lives in experiments/benchmarks/bench_<name>.py with a `run() -> rows`.
Figures are ratios against a reference measured in the same run; absolute times depend
on the machine (recorded in machine.json). On a GPU host the same command times the GPU.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

if __name__ == "__main__":  # first, before jax loads: huge-page malloc (vtadl_jax.hostmem)
    from vtadl_jax.hostmem import reexec_with_hugepage_malloc

    reexec_with_hugepage_malloc()

from experiments import runner  # noqa: E402
from vtadl_jax.records import write_json_atomic  # noqa: E402
from vtadl_jax.report import markdown_table  # noqa: E402

SUITES = ("ssim_filters", "mixture_gaussian", "metrics", "patch_gaussian_fit", "train_step")
GROUP_KEYS = ("table", "bench")  # a row field naming the sub-table it belongs to


def suite_markdown(heading: str, rows: list[dict]) -> str:
    """One section: a table per group of rows (by "table"/"bench"), own columns each."""
    key = next((k for k in GROUP_KEYS if any(k in r for r in rows)), None)
    groups: dict[str, list[dict]] = {}
    for row in rows:
        groups.setdefault(str(row.get(key, "")) if key else "", []).append(row)
    parts = [heading + "\n"]
    for name, members in groups.items():
        columns = [c for c in dict.fromkeys(k for r in members for k in r) if c != key]
        title = f"### {name}\n\n" if len(groups) > 1 or name else ""
        parts.append(title + markdown_table(members, columns))
    return "\n".join(parts)


def _machine_line(out: str) -> str:
    path = os.path.join(out, "machine.json")
    if os.path.isfile(path):
        with open(path) as f:
            return str(json.load(f))
    return str(runner.machine())


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--only", nargs="+", choices=SUITES, default=list(SUITES))
    parser.add_argument("--report", action="store_true",
                        help="only rewrite benchmarks.md from the stored <out>/<suite>.json")
    args = parser.parse_args(argv)
    if args.report:
        args.only = []
    os.makedirs(args.out, exist_ok=True)
    if args.only:
        write_json_atomic(runner.machine(), os.path.join(args.out, "machine.json"))
    sections = [f"# Benchmarks\n\nmachine: {_machine_line(args.out)}\n"]
    for name in SUITES:
        path = os.path.join(args.out, f"{name}.json")
        if name in args.only:
            module = importlib.import_module(f"experiments.benchmarks.bench_{name}")
            start = time.perf_counter()
            rows = module.run()
            heading = f"## {name} ({time.perf_counter() - start:.0f} s)"
            write_json_atomic(rows, path)
        elif os.path.isfile(path):  # a suite not rerun keeps its stored table
            with open(path) as f:
                rows = json.load(f)
            heading = f"## {name} (stored from an earlier run, not rerun)"
        else:
            continue
        section = suite_markdown(heading, rows)
        if name in args.only:
            print(section, flush=True)
        sections.append(section)
    with open(os.path.join(args.out, "benchmarks.md"), "w") as f:
        f.write("\n".join(sections))
    print(f"tables: {os.path.join(args.out, 'benchmarks.md')}")


if __name__ == "__main__":
    main()
