"""The `vtadl-jax` command line: one entry point for both methods.

    vtadl-jax make-synthetic --out DIR [--seed 0]
    vtadl-jax train    --config experiments/configs/vtadl_mnist.py:0 --workdir runs/mnist0 [key=value ...]
    vtadl-jax fit      --config experiments/configs/patch_gaussian_synthetic.py --workdir runs/pg [key=value ...]
    vtadl-jax evaluate --workdir runs/pg [--overlays 6]
    vtadl-jax predict  --workdir runs/pg --images a.png b.png --out preds/
    vtadl-jax calibrate --workdir runs/pg (--normal-dir D --fpr 0.01 | --from-test
                        | --image-threshold X --pixel-threshold Y)
    vtadl-jax demo     --out outputs/demo
    vtadl-jax selftest [--quick] [--json PATH]

`train` is VT-ADL (a trained model); `fit` is the patch-Gaussian method (no training).
`evaluate` and `predict` read the method from the work directory. Overrides are
dotted config keys, e.g. `num_steps=200 model.overrides.num_components=64`, accepted
anywhere on the line after the subcommand (before or after the flags).

User errors (a bad config value, path or file, a damaged checkpoint or record, an
unwritable directory) end with one message naming what is wrong and exit status 2;
anything unexpected keeps its traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

from vtadl_jax.errors import ConfigError, PeerProcessError


def _cmd_make_synthetic(args) -> int:
    from vtadl_jax.data import make_synthetic_mvtec

    path = make_synthetic_mvtec(args.out, seed=args.seed, image_size=args.image_size)
    print(f"synthetic MVTec-layout dataset written to {path}")
    return 0


def _cmd_train(args) -> int:
    from vtadl_jax.configs import load_config
    from vtadl_jax.pipelines import vtadl as pipeline

    config = load_config(args.config, args.overrides)
    pipeline.train_from_config(config, args.workdir, resume=args.resume,
                               allow_config_change=args.allow_config_change)
    return 0


def _cmd_fit(args) -> int:
    from vtadl_jax.configs import load_config
    from vtadl_jax.pipelines import patch_gaussian as pipeline

    config = load_config(args.config, args.overrides)
    pipeline.fit_from_config(config, args.workdir)
    return 0


def _method_of(workdir: str) -> str:
    from vtadl_jax.pipelines.common import read_method

    return read_method(workdir)


def _pipeline_for(workdir: str):
    method = _method_of(workdir)
    if method == "vtadl":
        from vtadl_jax.pipelines import vtadl as pipeline
    elif method == "patch_gaussian":
        from vtadl_jax.pipelines import patch_gaussian as pipeline
    else:
        raise ValueError(f"{os.path.join(workdir, 'run.json')}: unknown method {method!r}; "
                         "expected 'vtadl' or 'patch_gaussian'")
    return pipeline


def _share_done(verb: str, outputs: str) -> None:
    """What a process other than 0 of a multi-process evaluate / predict / calibrate says."""
    import jax

    print(f"process {jax.process_index()}: share {verb}; process 0 wrote {outputs}")


def _join(args) -> None:
    """evaluate / predict / calibrate --distributed: join the multi-process job JAX detects
    (SLURM, Open MPI, Cloud TPU, ...) before anything starts JAX's backend. Without it they
    join only when JAX_COORDINATOR_ADDRESS is set."""
    if args.distributed:
        from vtadl_jax import multihost

        multihost.maybe_initialize_distributed({"distributed": True}, asked_by="--distributed")


def _cmd_evaluate(args) -> int:
    _join(args)
    result = _pipeline_for(args.workdir).evaluate_workdir(
        args.workdir, num_overlays=args.overlays, overrides=args.overrides)
    if result is None:  # a multi-process evaluation, not process 0
        _share_done("scored", "the report")
    else:
        print(f"metrics: {result['metrics_path']}")
    return 0


def _cmd_predict(args) -> int:
    _join(args)
    rows = _pipeline_for(args.workdir).predict_files(args.workdir, args.images, args.out)
    if rows is None:  # a multi-process prediction, not process 0
        _share_done("predicted", "the tables")
    return 0


def _cmd_calibrate(args) -> int:
    _join(args)
    thresholds = _pipeline_for(args.workdir).calibrate_workdir(
        args.workdir, normal=args.normal_dir or (), fpr=args.fpr, from_test=args.from_test,
        image_threshold=args.image_threshold, pixel_threshold=args.pixel_threshold)
    if thresholds is None:  # a multi-process calibration, not process 0
        _share_done("scored", "the thresholds")
    return 0


def _cmd_demo(args) -> int:
    from vtadl_jax.pipelines.demo import run_demo

    run_demo(args.out, quick=args.quick)
    return 0


def _count(text: str) -> int:
    """argparse type: an int >= 0 (argparse names the option in its error)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an int >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an int >= 0, got {text!r}")
    return value


def _cmd_selftest(args) -> int:
    from vtadl_jax import records, selftest

    result = selftest.run(quick=args.quick)
    print(selftest.format_table(result))
    if args.json:
        records.write_json_atomic(result, args.json)
        print(f"selftest results: {args.json}")
    return 0 if result["passed"] else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vtadl-jax", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("make-synthetic", help="write a small generated MVTec-layout dataset")
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=_count, default=0)
    p.add_argument("--image-size", type=int, default=128)
    p.set_defaults(func=_cmd_make_synthetic)

    for name, func, help_ in (("train", _cmd_train, "train VT-ADL from a config"),
                              ("fit", _cmd_fit, "fit patch Gaussians from a config")):
        p = sub.add_parser(name, help=help_)
        p.add_argument("--config", required=True, help="path/to/config.py[:arg]")
        p.add_argument("--workdir", required=True)
        p.add_argument("overrides", nargs="*", help="dotted.key=value config overrides")
        if name == "train":
            p.add_argument("--resume", action="store_true",
                           help="continue from the last intact checkpoint in --workdir")
            p.add_argument("--allow-config-change", action="store_true",
                           help="with --resume: accept settings other than num_steps that "
                                "differ from the run's (the old config is kept)")
        p.set_defaults(func=func)

    p = sub.add_parser("evaluate", help="metrics JSON and heatmap PNGs for a work directory")
    p.add_argument("--workdir", required=True)
    p.add_argument("--overlays", type=_count, default=6, help="number of heatmap rows to draw")
    p.add_argument("overrides", nargs="*", help="dotted.key=value overrides of the data config")
    p.set_defaults(func=_cmd_evaluate)

    p = sub.add_parser("predict", help="scores, labels, masks and heatmaps for image files")
    p.add_argument("--workdir", required=True)
    p.add_argument("--images", nargs="+", required=True,
                   help="image files, directories (searched recursively) and glob patterns")
    p.add_argument("--out", required=True)
    p.set_defaults(func=_cmd_predict)

    p = sub.add_parser("calibrate", help="store decision thresholds in a work directory")
    p.add_argument("--workdir", required=True)
    p.add_argument("--normal-dir", nargs="+", default=None,
                   help="normal images (files, directories, globs) held out from training")
    p.add_argument("--fpr", type=float, default=None,
                   help="false-positive rate on the normal images, in (0, 1), e.g. 0.01")
    p.add_argument("--from-test", action="store_true",
                   help="F1-max thresholds on the labelled test split of the config")
    p.add_argument("--image-threshold", type=float, default=None)
    p.add_argument("--pixel-threshold", type=float, default=None)
    p.set_defaults(func=_cmd_calibrate)

    for name in ("evaluate", "predict", "calibrate"):  # each scores a share per process
        sub.choices[name].add_argument(
            "--distributed", action="store_true",
            help="join the multi-process job JAX detects (SLURM, Open MPI, Cloud TPU) and "
                 "score a share per process; without it, processes join only when "
                 "JAX_COORDINATOR_ADDRESS is set")

    p = sub.add_parser("demo", help="both methods on generated data, end to end")
    p.add_argument("--out", default="outputs/demo")
    p.add_argument("--quick", action="store_true", help="smallest settings (seconds, for tests)")
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("selftest", help="check every kernel and metric against float64 "
                       "NumPy/SciPy on this backend (exit 1 on a failure)")
    p.add_argument("--quick", action="store_true", help="small shapes (under 2 minutes on a CPU)")
    p.add_argument("--json", help="also write the results to this JSON file")
    p.set_defaults(func=_cmd_selftest)
    return parser


def _is_override(token: str) -> bool:
    return not token.startswith("-") and "=" in token


def parse_args(parser: argparse.ArgumentParser, argv: Sequence[str] | None):
    """Parse `argv`; `key=value` tokens anywhere after the subcommand go to the
    subcommand's `overrides` (in command-line order) when it takes them.

    argparse gives a `nargs="*"` positional only its first run of tokens; later runs
    (after a flag) come back as extras and are appended here.
    """
    args, extras = parser.parse_known_args(argv)
    unknown = [t for t in extras if not (_is_override(t) and hasattr(args, "overrides"))]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if extras:
        args.overrides = list(args.overrides or []) + list(extras)
    return args


# Anticipated user errors: bad paths / unwritable directories (OSError), bad values
# (ValueError: ConfigError, DatasetError, CheckpointError, RunRecordError are subclasses),
# a non-finite loss (FloatingPointError).
USER_ERRORS = (OSError, ValueError, ConfigError, FloatingPointError, PeerProcessError)


def main(argv: Sequence[str] | None = None) -> int:
    if argv is None:  # a process entry (console script / python -m), not a library call
        from vtadl_jax.hostmem import reexec_with_hugepage_malloc

        reexec_with_hugepage_malloc()  # huge-page malloc for XLA:CPU (vtadl_jax.hostmem)
    args = parse_args(build_parser(), argv)
    try:
        return args.func(args)
    except USER_ERRORS as err:
        message = str(err) or type(err).__name__
        print(f"vtadl-jax {args.command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
