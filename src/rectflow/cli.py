"""The ``rectflow`` command line: a thin layer over the Python API.

Exit codes: 0 success, 2 bad input (config, data, checkpoint), 130 interrupted, 1 anything else.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

__all__ = ["main", "build_parser"]


def _add_sample_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--solver", default="euler", help="euler | midpoint | heun | rk4 | dopri5 (default: %(default)s)")
    p.add_argument("--steps", "--nfe", dest="steps", type=int, default=100, help="steps of a fixed-step solver; Euler NFE = steps (default: %(default)s)")
    p.add_argument("--rtol", type=float, default=1e-5, help="dopri5 relative tolerance (default: %(default)s)")
    p.add_argument("--atol", type=float, default=1e-5, help="dopri5 absolute tolerance (default: %(default)s)")


def build_parser() -> argparse.ArgumentParser:
    fmt = argparse.ArgumentDefaultsHelpFormatter
    parser = argparse.ArgumentParser(prog="rectflow", description="Rectified flow: train, sample and evaluate flows between distributions.")
    parser.add_argument("--version", action="version", version=f"rectflow {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train", help="train a 1-rectified flow from a YAML config", formatter_class=fmt)
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. train.steps=2000 target=moons")
    p.add_argument("--config", "-c", help="YAML config file (defaults apply to missing keys)")
    p.add_argument("--run", "-r", required=True, help="run directory (created, or resumed if it holds the same run)")
    p.add_argument("--fresh", action="store_true", help="refuse to resume: fail if the run directory already has checkpoints")
    p.add_argument("--no-eval", action="store_true", help="skip the evaluation table and plots after training")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")

    p = sub.add_parser("sample", help="sample a trained run to a .npy file", formatter_class=fmt)
    p.add_argument("run", help="run directory")
    p.add_argument("--n", type=int, default=1000, help="number of samples")
    p.add_argument("--seed", type=int, default=0, help="seed of the source samples")
    p.add_argument("--out", "-o", required=True, help="output .npy file (N x d)")
    p.add_argument("--trajectory", help="also save the trajectory (K x N x d) to this .npy file")
    p.add_argument("--raw", action="store_true", help="use the raw weights instead of the EMA weights")
    _add_sample_args(p)

    p = sub.add_parser("eval", help="W2 / energy distance vs NFE table for a run", formatter_class=fmt)
    p.add_argument("run", help="run directory")
    p.add_argument("--solvers", help="comma-separated solver specs, e.g. euler:1,euler:8,heun:4,dopri5 (default: the run's eval.solvers)")
    p.add_argument("--n", type=int, help="held-out samples per side (default: the run's eval.n_samples)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")

    p = sub.add_parser("report", help="one self-contained HTML page comparing run directories", formatter_class=fmt)
    p.add_argument("runs", nargs="+", help="run directories (e.g. 1-RF, 2-RF and distilled runs, or two recipes)")
    p.add_argument("--out", "-o", default="report.html", help="output HTML file")
    p.add_argument("--title", default="rectflow report", help="page title")

    p = sub.add_parser("demo", help="1-RF on Gaussian -> circle and Gaussian -> moons, with table and plots", formatter_class=fmt)
    p.add_argument("--out", "-o", default="runs/demo", help="output directory")
    p.add_argument("--steps", type=int, default=3000, help="training steps per task")
    p.add_argument("--n-eval", type=int, default=2000, help="held-out points per side for W2")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    return parser


def _version() -> str:
    from . import __version__

    return __version__


def _cmd_train(args: argparse.Namespace) -> int:
    from .config import load_config
    from .evaluation import format_table
    from .experiment import evaluate_run, load_run, plot_run, train_run

    overrides = list(args.overrides) + (["train.progress=false"] if args.quiet else [])
    cfg = load_config(args.config, overrides)
    train_run(cfg, args.run, resume=not args.fresh)
    if not args.no_eval:
        run = load_run(args.run)
        print(format_table(evaluate_run(run), ["solver", "nfe", "w2", "energy"]))
        plot_run(run)
    print(f"run saved in {args.run}")
    return 0


def _cmd_sample(args: argparse.Namespace) -> int:
    import numpy as np
    import torch

    from .errors import ConfigError
    from .experiment import load_run
    from .io import atomic_path
    from .sampling import sample_model

    if args.n < 1:
        raise ConfigError(f"--n must be >= 1, got {args.n}")
    if args.solver != "dopri5" and args.steps < 1:
        raise ConfigError(f"--steps (NFE) must be >= 1, got {args.steps}")
    run = load_run(args.run, ema=not args.raw)
    x0 = run.source.sample(args.n, generator=torch.Generator().manual_seed(args.seed))
    res = sample_model(run.model, x0, method=args.solver, steps=args.steps, rtol=args.rtol, atol=args.atol, return_trajectory=bool(args.trajectory))
    for path, arr in [(args.out, res.x), (args.trajectory, res.trajectory)]:
        if path:
            with atomic_path(path) as tmp:
                with open(tmp, "wb") as f:
                    np.save(f, arr.numpy())
    print(f"wrote {args.n} samples to {args.out} ({args.solver}, NFE {res.nfe})")
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from .evaluation import format_table
    from .experiment import evaluate_run, load_run

    run = load_run(args.run)
    solvers = [s.strip() for s in args.solvers.split(",") if s.strip()] if args.solvers else None
    if solvers is not None:
        from .sampling import parse_solver_spec

        for s in solvers:
            parse_solver_spec(s)
    rows = evaluate_run(run, n=args.n, solvers=solvers)
    print(json.dumps(rows, indent=2) if args.json else format_table(rows, ["solver", "nfe", "w2", "energy"]))
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(args.out, steps=args.steps, n_eval=args.n_eval, progress=not args.quiet)
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from .report import build_report

    print(f"wrote {build_report(args.runs, args.out, title=args.title)}")
    return 0


_COMMANDS = {"train": _cmd_train, "sample": _cmd_sample, "eval": _cmd_eval, "demo": _cmd_demo, "report": _cmd_report}


def main(argv: list[str] | None = None) -> int:
    from .errors import RectflowError

    args = build_parser().parse_args(argv)
    try:
        return _COMMANDS[args.command](args)
    except KeyboardInterrupt:
        print("interrupted (the last checkpoint is kept; run the same command again to resume)", file=sys.stderr)
        return 130
    except (RectflowError, ValueError, FloatingPointError, FileNotFoundError) as e:
        print(f"rectflow {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
