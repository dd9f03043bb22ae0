"""Benchmark runner: every kernel against its reference, the metrics, the patch-Gaussian
fit, and the VT-ADL train step; prints tables and stores them with the machine.

    python experiments/benchmark.py --out experiments/results/bench            # all
    python experiments/benchmark.py --out /tmp/bench --only ssim_filters metrics

With --only, the suites not rerun keep the tables stored in <out>/<suite>.json by an
earlier run (marked so in benchmarks.md); the machine is that of the latest run.

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

from experiments import runner  # noqa: E402
from vtadl_jax.records import write_json_atomic  # noqa: E402
from vtadl_jax.report import markdown_table  # noqa: E402

SUITES = ("ssim_filters", "mixture_gaussian", "metrics", "patch_gaussian_fit", "train_step")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--only", nargs="+", choices=SUITES, default=list(SUITES))
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    write_json_atomic(runner.machine(), os.path.join(args.out, "machine.json"))
    sections = [f"# Benchmarks\n\nmachine: {runner.machine()}\n"]
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
        columns = list(dict.fromkeys(k for r in rows for k in r))
        section = f"{heading}\n\n" + markdown_table(rows, columns)
        if name in args.only:
            print(section, flush=True)
        sections.append(section)
    with open(os.path.join(args.out, "benchmarks.md"), "w") as f:
        f.write("\n".join(sections))
    print(f"tables: {os.path.join(args.out, 'benchmarks.md')}")


if __name__ == "__main__":
    main()
