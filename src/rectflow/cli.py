"""The ``rectflow`` command line: a thin layer over the Python API.

Exit codes: 0 success, 2 bad input (config, data, checkpoint, a path that cannot be read or
written), 130 interrupted, 1 anything else.  Bad input is reported as one line naming the file or
config key, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from rectflow.data.image_sets import make_image_distribution
from rectflow.diffusion.specs import SPECS, parse_spec, sample, spec_label
from rectflow.engine.distributed import destroy, init_from_env, is_main_process, planned_world_size
from rectflow.engine.hardware import resolve_device
from rectflow.engine.io import atomic_path, check_writable, save_json
from rectflow.engine.trainer import TrainConfig
from rectflow.errors import ConfigError, RectflowError, check_fraction
from rectflow.flow.guidance import guidance_nfe
from rectflow.images.generate import sample_images, write_named_images
from rectflow.perflow.guidance_modes import GUIDANCE_MODES
from rectflow.reflow.pairs import PairOptions
from rectflow.runs.config import check_int_range, load_config, read_config_file
from rectflow.runs.demo import run_demo, run_pipeline
from rectflow.runs.diagnose import diagnose_runs, format_stage_table
from rectflow.runs.distill_job import train_distill
from rectflow.runs.evaluation import evaluate_nll, evaluate_run, evaluation_record, evaluation_reference, format_reference, format_table, save_evaluation
from rectflow.runs.experiment import load_run, one_step_warning, sampling_steps, train_run
from rectflow.runs.lineage import generate_run_pairs
from rectflow.runs.perflow_job import (
    DEFAULT_BATCH,
    DEFAULT_LORA_RANK,
    DEFAULT_LR,
    DEFAULT_PIPELINE_BATCH,
    DEFAULT_PIPELINE_LR,
    DEFAULT_PROMPTS,
    DEFAULT_STEPS,
    ExportOptions,
    LatentDataOptions,
    PeRFlowSettings,
    exported_windows,
    is_latent_pipeline,
    is_pipeline_job,
    sample_exported_pipeline,
    train_perflow,
)
from rectflow.runs.plots import plot_run
from rectflow.runs.recipes import RECIPES, get_recipe
from rectflow.runs.reflow_job import reflow_chain, train_reflow
from rectflow.runs.report import build_report, collect_run
from rectflow.runs.transfer import TransferInputs, load_transfer_inputs
from rectflow.runs.tune import render_table, tune, write_overrides
from rectflow.version import __version__

__all__ = ["apply_perflow_config", "build_parser", "main"]


def _add_sample_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--solver", default="euler", help="euler | midpoint | heun | rk4 | dopri5 | dpm++2m | dpm++3m | edm (default: %(default)s)")
    p.add_argument("--steps", "--nfe", dest="steps", type=int, help="steps of a fixed-step solver; Euler NFE = steps (default: what the run was trained for: 1 for a distilled one-step map, else 100; an exported PeRFlow pipeline: its K windows, any steps >= K)")
    p.add_argument("--rtol", type=float, default=1e-5, help="dopri5 relative tolerance (default: %(default)s)")
    p.add_argument("--atol", type=float, default=1e-5, help="dopri5 absolute tolerance (default: %(default)s)")


def build_parser() -> argparse.ArgumentParser:
    fmt = argparse.ArgumentDefaultsHelpFormatter
    parser = argparse.ArgumentParser(prog="rectflow", description="Rectified flow: train, sample and evaluate flows between distributions.")
    parser.add_argument("--version", action="version", version=f"rectflow {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train", help="train a 1-rectified flow from a YAML config", formatter_class=fmt)
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. train.steps=2000 target=moons")
    p.add_argument("--config", "-c", action="append", help="YAML config file (defaults apply to missing keys); repeat to layer files, "
                                                             "later ones winning (e.g. -c configs/cifar10-cpu.yaml -c tuned.yaml)")
    p.add_argument("--run", "-r", required=True, help="run directory (created, or resumed if it holds the same run)")
    p.add_argument("--fresh", action="store_true", help="refuse to resume: fail if the run directory already has checkpoints")
    _add_recipe_arg(p, "its teacher settings go under the config file and overrides")
    p.add_argument("--no-eval", action="store_true", help="skip the evaluation table and plots after training")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")

    p = sub.add_parser("sample", help="sample a trained run to a .npy file, or an exported PeRFlow text-to-image pipeline to PNGs", formatter_class=fmt)
    p.add_argument("run", help="run directory, or an exported PeRFlow text-to-image pipeline folder (OUT/diffusers of rectflow perflow, or OUT itself)")
    p.add_argument("--n", type=int, default=None, help="number of samples (default: 1000; an exported pipeline: one per --prompt)%(default).0s")
    p.add_argument("--seed", type=int, default=0, help="seed of the source samples")
    p.add_argument("--out", "-o", required=True, help="output .npy file (N x d); for image runs a directory that gets samples.npz (uint8) and grid.png; "
                                                       "for an exported pipeline a directory that gets sample_*.png, grid.png and samples.json")
    p.add_argument("--trajectory", help="also save the trajectory (K x N x d) to this .npy file")
    p.add_argument("--from", dest="inputs", metavar="PATH",
                   help="map these source samples instead of drawing them (domain transfer of your own data): an image folder, a .zip of one, "
                        ".npz or .npy for image runs (the run's source shape; OUT gets samples.npz with inputs and outputs, an input -> output "
                        "grid.png and outputs/NAME.png), a .npy (N x d) for vector runs")
    p.add_argument("--raw", action="store_true", help="use the raw weights instead of the EMA weights")
    p.add_argument("--guidance", type=float, help="classifier-free guidance scale w (class-conditional runs: default the run's guidance.scale; "
                                                  "an exported pipeline: default the scale its student was trained to sample with)")
    p.add_argument("--label", type=int, help="class of every sample (class-conditional runs; default: the classes in turn)")
    p.add_argument("--prompt", action="append", metavar="TEXT", help="an exported pipeline: a prompt (repeat for several; used in turn)")
    p.add_argument("--batch-size", type=int, default=None, help="samples per batch (default: 1000 for image runs, 4 for an exported pipeline)%(default).0s")
    _add_sample_args(p)

    p = sub.add_parser("eval", help="W2 / energy distance vs NFE table for a run", formatter_class=fmt)
    p.add_argument("run", help="run directory")
    p.add_argument("--solvers", help="comma-separated solver specs, e.g. euler:1,euler:8,heun:4,dopri5,dpm++2m:8,edm:4 (default: the run's eval.solvers)")
    p.add_argument("--n", type=int, help="held-out samples per side (default: the run's eval.n_samples)")
    p.add_argument("--json", action="store_true", help="print eval.json's content (reference, finite-sample floor and rows) instead of a table")
    p.add_argument("--nll", action="store_true", help="also the negative log-likelihood of the held-out points (nats; bits/dim for images), by the change of variables")
    p.add_argument("--nll-estimator", choices=["exact", "hutchinson"], help="divergence: exact (default up to 16 dimensions) or Hutchinson")
    p.add_argument("--probes", type=int, default=1, help="Hutchinson probes per sample (default 1)")

    p = sub.add_parser("report", help="one self-contained HTML page comparing run directories", formatter_class=fmt)
    p.add_argument("runs", nargs="+", help="run directories (e.g. 1-RF, 2-RF and distilled runs, or two recipes)")
    p.add_argument("--out", "-o", default="report.html", help="output HTML file")
    p.add_argument("--title", default="rectflow report", help="page title")

    p = sub.add_parser("demo", help="1-RF on Gaussian -> circle and -> moons, then reflow + distillation on moons: tables and plots", formatter_class=fmt)
    p.add_argument("--out", "-o", default="runs/demo", help="output directory")
    p.add_argument("--steps", type=int, default=3000, help="training steps per task")
    p.add_argument("--n-eval", type=int, default=2000, help="held-out points per side for W2")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    p.add_argument("--no-pipeline", action="store_true", help="only the 1-RF part: skip reflow + distillation on the moons task")
    p.add_argument("--pairs", type=int, default=10_000, help="reflow / distillation pairs in the pipeline part")
    _add_reflow_parsers(sub, fmt)
    _add_perflow_parser(sub, fmt)
    _add_tune_parser(sub, fmt)
    return parser


def _add_perflow_parser(sub, fmt) -> None:
    """theory §5: piecewise reflow of a pretrained run or diffusers folder."""
    d, t = PeRFlowSettings(), TrainConfig()  # one source of defaults: the library's
    p = sub.add_parser("perflow", help="accelerate a trained image flow or a local diffusers model with PeRFlow (K-step student)", formatter_class=fmt,
                       description="Every option below can also come from a YAML file (--config; its keys are the options' names, "
                                   "e.g. 'solver_steps: 12') or a KEY=VALUE after the options; the command line wins over a file.")
    p.add_argument("teacher", help="a rectflow image run directory, a local diffusers folder (unet/ + scheduler/), or a local text-to-image "
                                   "pipeline folder (Stable Diffusion 1.x / 2.x: model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/; "
                                   "SDXL also text_encoder_2/, tokenizer_2/; SD3: transformer/ instead of unet/, both CLIP pairs, optionally text_encoder_3/, tokenizer_3/)")
    p.add_argument("--out", "-o", required=True, help="output directory (created, or resumed if it holds the same job)")
    p.add_argument("--data", help="real training images: 'digits', an image folder, a .zip of one, or .npy/.npz (default: the run's target; required for diffusers teachers); "
                                  "a text-to-image pipeline: a folder of captioned images (metadata.jsonl with file_name and text, or a .txt beside each image)")
    p.add_argument("--windows", "-K", type=int, default=d.windows, help="number of time windows K (= sampling steps)")
    p.add_argument("--spacing", default=d.spacing, choices=["time", "log_snr", "teacher"],
                   help="window boundaries uniform in time, uniform in the teacher's log-SNR, or on the teacher scheduler's own K-step grid "
                        "(SD3: its shifted grid, where the exported stock FlowMatchEuler config is exact at K steps; DDPM family: uniform in time)")
    p.add_argument("--solver-steps", type=int, default=d.solver_steps, help="teacher DDIM steps across one window per training example")
    p.add_argument("--start-fraction", type=float, default=d.start_fraction, help="share of training points at window starts, where K-step sampling reads the student (0 = the paper's uniform t)")
    p.add_argument("--loss-space", default=d.loss_space, choices=["native", "velocity", "x0", "eps", "v"], help="space of the student's MSE (native = the teacher's output kind)")
    p.add_argument("--guidance", type=float, default=d.guidance, help="class-conditional and text-to-image teachers: classifier-free guidance scale w")
    p.add_argument("--guidance-mode", default=d.guidance_mode, metavar="{teacher,student}",
                   help="teacher: guide the teacher's window solve, the student samples at w = 1 (K NFE); student: teacher at w = 1, the student samples with CFG at w (2K NFE)")
    p.add_argument("--p-uncond", type=float, default=None,  # '%(default).0s' prints nothing: keeps the formatter from adding "(default: None)"
                   help="class-conditional and text-to-image teachers: condition dropout of the student's training (default: 0.1 with --guidance-mode student, else 0)%(default).0s")
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS, help="training steps")
    p.add_argument("--batch-size", type=int, default=None,
                   help=f"training batch size (default: {DEFAULT_BATCH}; text-to-image pipelines: {DEFAULT_PIPELINE_BATCH})%(default).0s")
    p.add_argument("--lr", type=float, default=None,
                   help=f"peak learning rate, cosine decay after min(100, steps/10) warmup steps (default: {DEFAULT_LR:g}; "
                        f"text-to-image pipelines: {DEFAULT_PIPELINE_LR:g}, not tuned here)%(default).0s")
    p.add_argument("--ema", type=float, default=t.ema_decay, help="EMA decay of the student weights (0 disables)")
    p.add_argument("--seed", type=int, default=t.seed, help="seed of the training draws")
    p.add_argument("--device", default=t.device, help="auto | cpu | cuda[:N] | mps")
    p.add_argument("--compile", action="store_true", help="torch.compile the teacher's network (its window solve is most of a step: 0.80x the eager "
                                                          "time on the digits UNet, benchmarks/results/perflow_step_cost.md) and the student; "
                                                          "a resumed job takes the same choice")
    p.add_argument("--export-diffusers", action="store_true", help="diffusers teachers: also write OUT/diffusers (a diffusers folder of the student; "
                                                                     "text-to-image pipelines always write it)")
    p.add_argument("--lora-rank", type=int, default=None,
                   help=f"text-to-image pipelines: rank of the LoRA written to OUT/lora beside the full delta (default: {DEFAULT_LORA_RANK}; 0: none)%(default).0s")
    p.add_argument("--prompt", action="append", metavar="TEXT",
                   help=f"text-to-image pipelines: a prompt of the K-step sample grid OUT/samples.png (repeat for several; default: the first {DEFAULT_PROMPTS} distinct captions)")
    p.add_argument("--caption-column", default=None,
                   help="text-to-image pipelines: the caption key of metadata.jsonl (default: text)%(default).0s")
    p.add_argument("--latent-mode", default=None, metavar="{mean,sample}",
                   help="text-to-image pipelines: cache the VAE posterior mean or one seeded draw per image (default: mean)%(default).0s")
    p.add_argument("--cache-dtype", default=None, metavar="{float32,float16,bfloat16}",
                   help="text-to-image pipelines: the latent cache's stored dtype (float16 halves its size; default: float32)%(default).0s")
    p.add_argument("--stock-scheduler", action="store_true",
                   help="OUT/diffusers names the stock scheduler exact at K steps (DDIM / FlowMatchEuler: no custom code to trust, other step "
                        "counts sample wrong) in model_index.json and keeps PeRFlowScheduler in scheduler_perflow/; refused where none is exact")
    p.add_argument("--lora-bias", action="store_true", help="text-to-image pipelines: the LoRA also carries the bias changes (peft lora_bias)")
    p.add_argument("--precision", default=t.precision, choices=["auto", "fp32", "bf16"],
                   help="autocast of the teacher's window solve and the student's training step (auto: bf16 where it is native on the device)")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    p.add_argument("--config", "-c", action="append", default=[], metavar="FILE",
                   help="YAML file of this command's options by name (windows: 4, guidance: 4.5, steps: 10000, prompt: [...]); repeat to "
                        "layer files (a later file wins); options given on the command line win over every file")
    p.set_defaults(overrides=[])  # KEY=VALUE after the options: the same names, applied last


_PERFLOW_NOT_IN_CONFIG = ("help", "out", "config")  # the output folder is named on the command line, always


def _subparser(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[name]


def apply_perflow_config(args: argparse.Namespace) -> None:
    """Fill ``args`` from the ``--config`` files and the KEY=VALUE overrides of ``rectflow perflow``: strict keys (the
    command's own option names), each value checked against its option's type and choices (one line naming the key and
    the file); an option given on the command line wins over a file, an override over both."""
    if not args.config and not args.overrides:
        return
    parser = _subparser(build_parser(), "perflow")
    options = {a.dest: a for a in parser._actions if a.option_strings and a.dest not in _PERFLOW_NOT_IN_CONFIG}
    for a in parser._actions:  # which options the command line gave: parse it again with every default suppressed
        a.default = argparse.SUPPRESS
    given, _ = parser.parse_known_args(args.argv[1:])
    layers: list[tuple[str, list[tuple[Any, Any]]]] = [(str(f), list(read_config_file(Path(f)).items())) for f in args.config]
    over = []
    for item in args.overrides:  # text as the flag would take it; numbers and true / false as YAML reads them
        key, _, raw = item.partition("=")
        action = options.get(key.strip().replace("-", "_"))
        textual = action is not None and action.type is None and not isinstance(action, argparse._StoreTrueAction)
        try:
            over.append((key.strip(), raw if textual else yaml.safe_load(raw) if raw else ""))
        except yaml.YAMLError:
            over.append((key.strip(), raw))
    layers.append(("the command line", over))
    appended: set[str] = set()  # options like --prompt: repeated overrides add up, as the flag does
    for where, values in layers:
        for key, value in values:
            dest = str(key).replace("-", "_")
            if dest not in options:
                raise ConfigError(f"{where}: unknown key {key!r}; the keys are rectflow perflow's options: {', '.join(sorted(options))}")
            if where != "the command line" and dest in vars(given):
                continue  # the command line wins over a file
            value = _option_value(options[dest], value, f"{where}: key {key!r}")
            if where == "the command line" and isinstance(options[dest], argparse._AppendAction):
                value = [*(getattr(args, dest) if dest in appended else []), *value]
                appended.add(dest)
            setattr(args, dest, value)


def _option_value(action: argparse.Action, value: Any, where: str) -> Any:
    """``value`` from a config file as the option ``action`` would have parsed it; ConfigError naming ``where``."""
    if value is None and action.default is None:
        return None  # the option's own default
    if isinstance(action, argparse._StoreTrueAction):
        if not isinstance(value, bool):
            raise ConfigError(f"{where} must be true or false, got {value!r}")
        return value
    if isinstance(action, argparse._AppendAction):
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list) or not items or not all(isinstance(v, str) for v in items):
            raise ConfigError(f"{where} must be a string or a list of strings, got {value!r}")
        return list(items)
    if action.type in (int, float) and isinstance(value, str):  # as the flag parses its text (YAML reads 1e-4 as a string)
        try:
            value = action.type(value)
        except ValueError:
            pass
    if action.type is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where} must be an integer, got {value!r}")
    elif action.type is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where} must be a number, got {value!r}")
        value = float(value)
    elif not isinstance(value, str):
        raise ConfigError(f"{where} must be a string, got {value!r}")
    if action.choices is not None and value not in action.choices:
        raise ConfigError(f"{where} must be one of {', '.join(map(str, action.choices))}, got {value!r}")
    return value


def _add_pair_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--solver", default="dopri5", help="solver spec for the pairs: dopri5 or e.g. euler:100, rk4:25, dpm++2m:20")
    p.add_argument("--rtol", type=float, help="dopri5 relative tolerance of the pairs (default: the run's eval.rtol)")
    p.add_argument("--atol", type=float, help="dopri5 absolute tolerance of the pairs (default: the run's eval.atol)")
    p.add_argument("--pair-seed", type=int, default=0, help="seed of Z0: shard s draws from (seed, s)")
    p.add_argument("--shard-size", type=int, default=65536, help="pairs per shard (the unit of resumption)")
    p.add_argument("--solve-batch", type=int, default=None, help="pairs integrated together inside a shard (default: 2^22 numbers' worth, e.g. 1365 images of 3x32x32)")
    p.add_argument("--device", default="auto", help="device for pair generation: auto | cpu | cuda[:N]")


def _add_recipe_arg(p: argparse.ArgumentParser, what: str) -> None:
    names = ", ".join(f"{r.name}: {r.summary}" for r in RECIPES.values())
    p.add_argument("--recipe", choices=sorted(RECIPES), help=f"a measured recipe ({names}); {what}")


def _add_stage_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides of the new run(s), e.g. train.lr=3e-4")
    p.add_argument("--init", default="previous", choices=["previous", "scratch"], help="start from the parent's (EMA) weights or from scratch")
    p.add_argument("--steps", type=int, help="training steps (default: the recipe's with --recipe, else the parent's train.steps)")
    p.add_argument("--no-eval", action="store_true", help="skip the evaluation table and plots after training")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bars")


def _add_reflow_parsers(sub, fmt) -> None:
    """Subcommands of theory §4: pairs, reflow, distill, diagnose, pipeline."""
    p = sub.add_parser("pairs", help="generate (or resume) a reflow pair store (Z0, Flow(Z0)) from a run", formatter_class=fmt)
    p.add_argument("run", help="run directory of the k-RF")
    p.add_argument("--n", "--num-pairs", dest="n", type=int, required=True, help="number of pairs (spell it --num-pairs under torchrun, whose own --n... options clash)")
    p.add_argument("--out", "-o", help="store directory (default: RUN/pairs/<solver>-n<N>-seed<S>)")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    _add_pair_args(p)

    p = sub.add_parser("reflow", help="train the (k+1)-RF (and further stages) on pairs of a k-RF run", formatter_class=fmt)
    p.add_argument("run", help="run directory of the k-RF")
    p.add_argument("--pairs", type=int, help="pairs generated from each stage (required without --recipe)")
    p.add_argument("--stages", type=int, default=1, help="number of reflows: 2 runs 1-RF -> 2-RF -> 3-RF")
    p.add_argument("--out", "-o", help="run directory of the new flow (one stage only; default RUN-<k+1>rf)")
    p.add_argument("--prefix", help="stage j goes to PREFIX-<k+j>rf (default: RUN without a -<n>rf suffix)")
    p.add_argument("--pairs-dir", help="use this existing pair store instead of generating (one stage only)")
    _add_recipe_arg(p, "its reflow steps and pair count apply where --steps / --pairs are not given")
    _add_stage_args(p)
    _add_pair_args(p)

    p = sub.add_parser("distill", help="distill a run's flow into a one-step map (regression at t = 0)", formatter_class=fmt)
    p.add_argument("run", help="run directory of the k-RF teacher")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--pairs", type=int, help="generate (or reuse) this many pairs of the flow")
    src.add_argument("--pairs-dir", help="use this existing pair store")
    src.add_argument("--random", action="store_true", help="distill the independent coupling instead (learns E[X1|X0]: the failure case)")
    p.add_argument("--loss", choices=["l2", "pseudo_huber"], help="distillation loss (default: the recipe's with --recipe, else l2)")
    p.add_argument("--huber-c", type=float, help="pseudo-Huber scale c (default: the recipe's with --recipe, else 0 = 0.00054 sqrt(D), D values per sample)")
    _add_recipe_arg(p, "its distillation steps, loss and Huber scale apply where --steps / --loss / --huber-c are not given")
    p.add_argument("--out", "-o", help="run directory of the one-step model (default RUN-distill)")
    _add_stage_args(p)
    _add_pair_args(p)

    p = sub.add_parser("diagnose", help="stage table: W2 vs NFE, straightness, transport cost, crossings", formatter_class=fmt)
    p.add_argument("runs", nargs="+", help="run directories of one task (e.g. 1-RF, 2-RF, distilled)")
    p.add_argument("--out", "-o", help="write table.md, rows.json and the plots here")
    p.add_argument("--n", type=int, help="held-out points per side (default: the first run's eval.n_samples)")
    p.add_argument("--solvers", default="euler:1,euler:2,euler:4,euler:8,euler:100,dopri5", help="W2 columns")
    p.add_argument("--no-independent", action="store_true", help="leave out the row of the independent coupling")
    p.add_argument("--json", action="store_true", help="print JSON rows instead of the table")

    p = sub.add_parser("pipeline", help="1-RF -> pairs -> 2-RF -> distill on a 2-D task, with one table and plots", formatter_class=fmt)
    p.add_argument("--out", "-o", default="runs/pipeline", help="output directory")
    p.add_argument("--source", default="gaussian", help="pi0")
    p.add_argument("--target", default="moons", help="pi1")
    p.add_argument("--steps", type=int, default=3000, help="1-RF training steps")
    p.add_argument("--reflow-steps", type=int, help="steps per reflow (default: --steps)")
    p.add_argument("--distill-steps", type=int, help="distillation steps (default: --steps / 2)")
    p.add_argument("--stages", type=int, default=1, help="number of reflows before distillation")
    p.add_argument("--pairs", type=int, default=10_000, help="pairs generated from each k-RF")
    p.add_argument("--pair-solver", default="dopri5", help="solver spec for the pairs")
    p.add_argument("--pair-tol", type=float, default=1e-4, help="dopri5 rtol = atol for the pairs")
    p.add_argument("--n-eval", type=int, default=2000, help="held-out points per side")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bars")


def _version() -> str:
    return __version__


def _cmd_train(args: argparse.Namespace) -> int:
    overrides = list(args.overrides) + (["train.progress=false"] if args.quiet else [])
    cfg = load_config(args.config, overrides, defaults=get_recipe(args.recipe).teacher_sections() if args.recipe else None)
    train_run(cfg, args.run, resume=not args.fresh)

    main_process = is_main_process()
    destroy()  # under torchrun: leave the process group; only rank 0 evaluates and reports
    if not main_process:
        return 0
    if not args.no_eval:
        _eval_and_plot(args.run, "train")
    print(f"run saved in {args.run}")
    return 0


def _cmd_sample(args: argparse.Namespace) -> int:
    if Path(args.run).is_dir() and (is_latent_pipeline(args.run) or is_pipeline_job(args.run)):
        return _sample_pipeline(args)
    if args.prompt:
        raise ConfigError(f"--prompt needs an exported PeRFlow text-to-image pipeline folder (OUT/diffusers of rectflow perflow); {args.run} is not one")
    if args.inputs is not None and args.n is not None:
        raise ConfigError("--n does not apply with --from (every input is mapped once)")
    args.n = 1000 if args.n is None else args.n
    args.batch_size = 1000 if args.batch_size is None else args.batch_size
    if args.n < 1:
        raise ConfigError(f"--n must be >= 1, got {args.n}")
    if args.solver != "dopri5" and args.steps is not None and args.steps < 1:
        raise ConfigError(f"--steps (NFE) must be >= 1, got {args.steps}")
    run = load_run(args.run, ema=not args.raw)
    args.steps = sampling_steps(run.config) if args.steps is None else args.steps
    inputs = load_transfer_inputs(args.inputs, run.source) if args.inputs is not None else None
    if inputs is not None:
        args.n = inputs.x.shape[0]
    if args.solver not in SPECS or SPECS[args.solver].mean_flow:  # runs train velocity fields: no mean-flow jumps
        raise ConfigError(f"--solver {args.solver!r} is not a sampler of this run; choose one of {[n for n, e in SPECS.items() if not e.mean_flow]}")
    spec = spec_label(args.solver, None if SPECS[args.solver].min_steps is None else args.steps)
    parse_spec(spec)  # too few steps for the sampler (edm needs 2): refused before any work
    _warn("sample", one_step_warning(run.config, [spec]))
    if args.guidance is not None and not math.isfinite(args.guidance):
        raise ConfigError(f"--guidance must be a finite number, got {args.guidance}")
    if (args.guidance is not None or args.label is not None) and run.config.model.num_classes < 1:  # before the output path is looked at
        raise ConfigError("--guidance/--label need a class-conditional run (model.num_classes > 0); this run is unconditional")
    if len(getattr(run.source, "shape", ())) == 3 or args.guidance is not None or args.label is not None:
        check_writable(args.out, directory=True)  # before sampling, not after
        run.model.to(resolve_device("auto"))  # images: sample on the GPU when there is one
        return _sample_images(args, run, inputs)
    for path in (args.out, args.trajectory):
        if path:
            check_writable(path)
    x0 = run.source.sample(args.n, generator=torch.Generator().manual_seed(args.seed)) if inputs is None else inputs.x
    res = sample(run.model, x0, spec, trajectory=bool(args.trajectory), rtol=args.rtol, atol=args.atol)
    for path, arr in [(args.out, res.x), (args.trajectory, res.trajectory)]:
        if path:
            with atomic_path(path) as tmp, open(tmp, "wb") as f:
                np.save(f, arr.numpy())
    print(f"wrote {args.n} samples to {args.out} ({args.solver}, NFE {res.nfe})")
    return 0


def _sample_images(args: argparse.Namespace, run, inputs: TransferInputs | None = None) -> int:
    """Image (or class-conditional) runs: batched sampling to OUT/samples.npz and OUT/grid.png."""
    k = run.config.model.num_classes
    w = run.config.guidance.scale if args.guidance is None else args.guidance
    if k < 1 and (args.guidance is not None or args.label is not None):
        raise ConfigError("--guidance/--label need a class-conditional run (model.num_classes > 0); this run is unconditional")
    if args.label is not None and not 0 <= args.label < max(k, 1):
        raise ConfigError(f"--label must lie in [0, {k}), got {args.label}")
    labels = None if k < 1 else (torch.full((args.n,), args.label) if args.label is not None else torch.arange(args.n) % k)
    if args.trajectory:
        raise ConfigError("--trajectory is for vector data; image runs write samples.npz and grid.png")
    images, summary = sample_images(run.model, run.source, args.n, args.out, method=args.solver, steps=args.steps, labels=labels, guidance=w,
                                    batch_size=args.batch_size, seed=args.seed, rtol=args.rtol, atol=args.atol,
                                    x0=inputs.x if inputs is not None else None)
    if inputs is not None:
        write_named_images(images, inputs.names, Path(args.out) / "outputs")
        print(f"mapped {args.n} inputs of {args.inputs} to {args.out}: samples.npz (inputs and outputs), grid.png (input -> output), "
              f"outputs/*.png ({args.solver}, NFE {summary['nfe']})")
        return 0
    print(f"wrote {args.n} samples to {args.out}/samples.npz and grid.png ({args.solver}, NFE {summary['nfe']})")
    return 0


def _sample_pipeline(args: argparse.Namespace) -> int:
    """An exported PeRFlow text-to-image pipeline (or its job directory): K-step (or more) samples as PNGs."""
    for flag, given in (("--trajectory", args.trajectory), ("--label", args.label is not None), ("--raw", args.raw)):
        if given:
            raise ConfigError(f"{flag} does not apply to a text-to-image pipeline ({args.run})")
    if args.solver != "euler":
        raise ConfigError(f"--solver {args.solver}: an exported PeRFlow pipeline samples with Euler steps on its windows; leave --solver at euler")
    if not args.prompt:
        raise ConfigError(f"--prompt is required to sample the text-to-image pipeline {args.run} (repeat it for several prompts)")
    n = len(args.prompt) if args.n is None else args.n
    if n < 1:
        raise ConfigError(f"--n must be >= 1, got {n}")
    batch = 4 if args.batch_size is None else args.batch_size
    if batch < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {batch}")
    if args.guidance is not None and not (math.isfinite(args.guidance) and args.guidance >= 0):
        raise ConfigError(f"--guidance must be a finite number >= 0, got {args.guidance}")
    k = exported_windows(args.run)
    if args.steps is not None and args.steps < k:
        raise ConfigError(f"--steps {args.steps} is fewer than the {k} windows of {args.run}: an exported PeRFlow pipeline samples in at least K = {k} steps")
    s = sample_exported_pipeline(args.run, args.prompt, args.out, n=n, steps=args.steps, guidance=args.guidance, seed=args.seed, batch_size=batch)
    print(f"wrote {n} images to {args.out}: sample_*.png, grid.png, samples.json ({s['steps']} steps, guidance {s['guidance']:g}, NFE {s['nfe']})")
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    if args.nll and args.probes < 1:  # every option is checked before any work
        raise ConfigError(f"--probes must be >= 1, got {args.probes}")
    run = load_run(args.run)
    solvers = [s.strip() for s in args.solvers.split(",") if s.strip()] if args.solvers else None
    if solvers is not None:
        for s in solvers:
            parse_spec(s)
    _warn("eval", one_step_warning(run.config, solvers or run.config.eval.solvers))
    rows = evaluate_run(run, n=args.n, solvers=solvers, write=False)
    ref = evaluation_reference(run, args.n)
    if args.json:
        print(json.dumps(evaluation_record(run, rows, ref["n_samples"], ref), indent=2), flush=True)
    else:
        print(format_table(rows, ["solver", "nfe", "w2", "energy"]) + "\n" + format_reference(ref), flush=True)
    save_evaluation(run, rows, ref["n_samples"], ref)  # after printing: a read-only run still shows its table
    if args.nll:
        if args.probes < 1:
            raise ConfigError(f"--probes must be >= 1, got {args.probes}")
        nll = evaluate_nll(run, n=args.n, estimator=args.nll_estimator, probes=args.probes, rtol=run.config.eval.rtol, atol=run.config.eval.atol)
        line = f"NLL {nll['nll_nats']:.4f} nats" + (f" ± {nll['nll_se']:.4f}" if nll["nll_se"] is not None else "")
        if "bits_per_dim" in nll:
            line += f", {nll['bits_per_dim']:.4f} bits/dim"
        print(json.dumps(nll) if args.json else f"{line} ({nll['n']} held-out points, {nll['estimator']} divergence, NFE {nll['nfe']})", flush=True)
        save_json(run.path / "nll.json", {"step": run.step, **nll})
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    run_demo(args.out, steps=args.steps, n_eval=args.n_eval, progress=not args.quiet, pipeline=not args.no_pipeline, n_pairs=args.pairs)
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    check_writable(args.out)
    runs = [collect_run(p) for p in args.runs]
    out = build_report(runs, args.out, title=args.title)
    for r in runs:  # also listed on the page
        for problem in r.problems:
            print(f"rectflow report: warning: {r.path}: {problem}", file=sys.stderr)
    print(f"wrote {out}")
    return 0


def _add_tune_parser(sub, fmt) -> None:
    p = sub.add_parser("tune", help="measure which precision / channels-last / compile / thread settings train this config fastest here",
                       formatter_class=fmt)
    p.add_argument("config", help="YAML config file (the model and batch to time)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. train.batch_size=128")
    p.add_argument("--seconds", type=float, default=60.0, help="time budget after the first round of candidates")
    p.add_argument("--steps", type=int, default=4, help="timed training steps per candidate and round")
    p.add_argument("--compile", action="store_true", help="also time torch.compile (its warm-up takes tens of seconds per candidate)")
    p.add_argument("--threads", type=int, action="append", help="thread counts to time (repeatable; default: 1 and all usable cores)")
    p.add_argument("--write", metavar="YAML", help="write the winner's train settings to this file (pass it as a second --config)")


def _cmd_tune(args: argparse.Namespace) -> int:
    if args.threads and any(t < 1 for t in args.threads):
        raise ConfigError(f"--threads must be >= 1, got {args.threads}")
    cfg = load_config(args.config, list(args.overrides))
    result = tune(cfg, seconds=args.seconds, steps=args.steps, compile=args.compile, threads=args.threads,
                  log=lambda m: print(m, file=sys.stderr))
    print(render_table(result))
    w = result["winner"]
    print(f"\nfastest: {w['label']} ({w['speedup']:.2f}x fp32); overrides: train.precision={w['precision']} "
          f"train.channels_last={str(w['channels_last']).lower()} train.compile={str(w['compile']).lower()} train.threads={w['threads']}")
    print(f"precision auto picks {result['auto_precision']} here ({result['cpu_capability']}, bf16 {'native' if result['bf16_native'] else 'emulated'})")
    if args.write:
        over = " ".join(args.overrides)
        print(f"wrote {write_overrides(args.write, result)} (rectflow train -c {args.config} -c {args.write}{' ' + over if over else ''} ...: "
              "the overrides it was timed with are not in the file)")
    return 0


_COMMANDS = {"train": _cmd_train, "sample": _cmd_sample, "eval": _cmd_eval, "demo": _cmd_demo, "report": _cmd_report}



def _pair_kwargs(args: argparse.Namespace) -> dict:
    parse_spec(args.solver)
    if args.shard_size < 1:
        raise ConfigError(f"--shard-size must be >= 1, got {args.shard_size}")
    if args.solve_batch is not None and args.solve_batch < 1:
        raise ConfigError(f"--solve-batch must be >= 1, got {args.solve_batch}")
    return {"options": PairOptions(seed=args.pair_seed, solver=args.solver, rtol=args.rtol, atol=args.atol, shard_size=args.shard_size,
                                   device=args.device, solve_batch=args.solve_batch)}


def _eval_and_plot(run_dir, command: str) -> None:
    """The evaluation table (with what it was measured against, and the floor) and the plots of a new run."""
    run = load_run(run_dir)
    _warn(command, one_step_warning(run.config, run.config.eval.solvers))
    rows = evaluate_run(run, write=False)
    ref = evaluation_reference(run)
    print(format_table(rows, ["solver", "nfe", "w2", "energy"]) + "\n" + format_reference(ref), flush=True)
    save_evaluation(run, rows, ref["n_samples"], ref)
    plot_run(run)


def _cmd_pairs(args: argparse.Namespace) -> int:
    if args.n < 1:
        raise ConfigError(f"--n (number of pairs) must be >= 1, got {args.n}")
    kw = _pair_kwargs(args)

    if planned_world_size() > 1:  # under torchrun: rank r makes shards r, r + N, ...
        init_from_env(device=None if kw.get("device", "auto") == "auto" else kw["device"])
    store = generate_run_pairs(args.run, args.n, args.out, progress=None if not args.quiet else False, **kw)
    main_process = is_main_process()
    destroy()
    if not main_process:
        return 0
    st = store.manifest.get("stats", {})
    rate = st.get("last_session_pairs_per_s")
    print(f"{len(store)} pairs in {store.path} ({store.settings.solver}, mean NFE {st.get('nfe_mean', 0):.1f}" + (f", {rate:.0f} pairs/s)" if rate else ")"))
    return 0


def _cmd_reflow(args: argparse.Namespace) -> int:
    if args.recipe:
        recipe = get_recipe(args.recipe)
        args.pairs = recipe.n_pairs if args.pairs is None and not args.pairs_dir else args.pairs
        args.steps = recipe.reflow_steps if args.steps is None else args.steps
    if args.pairs is None and not args.pairs_dir:
        raise ConfigError("--pairs is required (or --pairs-dir, or --recipe for its pair count)")
    if args.pairs is not None and args.pairs < 1:
        raise ConfigError(f"--pairs must be >= 1, got {args.pairs}")
    if args.stages < 1:
        raise ConfigError(f"--stages must be >= 1, got {args.stages}")
    if args.stages > 1 and (args.out or args.pairs_dir):
        raise ConfigError("--out and --pairs-dir apply to a single stage; with --stages > 1 use --prefix")
    kw = dict(n_pairs=args.pairs, init=args.init, steps=args.steps, overrides=args.overrides, progress=None if not args.quiet else False, **_pair_kwargs(args))
    if args.stages == 1 and (args.out or args.pairs_dir):
        outs = [train_reflow(args.run, args.out, pairs=args.pairs_dir, **kw)]
    else:
        outs = reflow_chain(args.run, args.stages, prefix=args.prefix, **kw)
    for out in outs:
        if not args.no_eval:
            print(f"== {out}")
            _eval_and_plot(out, "reflow")
    print("runs saved in " + ", ".join(str(o) for o in outs))
    return 0


def _cmd_distill(args: argparse.Namespace) -> int:
    recipe = get_recipe(args.recipe) if args.recipe else None
    if recipe is not None:
        args.steps = recipe.distill_steps if args.steps is None else args.steps
        args.loss = args.loss or recipe.distill_loss
        if args.huber_c is None and args.loss == "pseudo_huber":  # the recipe's scale belongs to its loss
            args.huber_c = recipe.huber_c
    args.loss, args.huber_c = args.loss or "l2", args.huber_c or 0.0
    out = train_distill(
        args.run,
        args.out,
        n_pairs=args.pairs,
        pairs=args.pairs_dir,
        coupling="independent" if args.random else "pairs",
        loss=args.loss,
        huber_c=args.huber_c,
        init=args.init,
        steps=args.steps,
        overrides=args.overrides,
        progress=None if not args.quiet else False,
        **_pair_kwargs(args),
    )
    if not args.no_eval:
        _eval_and_plot(out, "distill")
    print(f"run saved in {out}")
    return 0


def _cmd_diagnose(args: argparse.Namespace) -> int:
    solvers = [s.strip() for s in args.solvers.split(",") if s.strip()]
    if args.out:
        check_writable(args.out, directory=True)
    rows = diagnose_runs(args.runs, n=args.n, solvers=solvers, include_independent=not args.no_independent, plots_dir=args.out)
    table = format_stage_table(rows, solvers)
    if args.out:
        save_json(Path(args.out) / "rows.json", {"rows": rows})
        with atomic_path(Path(args.out) / "table.md") as tmp:
            tmp.write_text(table + "\n")
    print(json.dumps(rows, indent=2) if args.json else table)
    return 0


def _cmd_pipeline(args: argparse.Namespace) -> int:
    for name in ("steps", "pairs", "stages", "n_eval"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if not (math.isfinite(args.pair_tol) and args.pair_tol > 0):  # before the 1-RF trains, not after
        raise ConfigError(f"--pair-tol must be a finite number > 0, got {args.pair_tol}")
    parse_spec(args.pair_solver)
    run_pipeline(
        args.out,
        source=args.source,
        target=args.target,
        steps=args.steps,
        reflow_steps=args.reflow_steps,
        distill_steps=args.distill_steps,
        stages=args.stages,
        n_pairs=args.pairs,
        pair_solver=args.pair_solver,
        pair_tol=args.pair_tol,
        n_eval=args.n_eval,
        progress=not args.quiet,
    )
    return 0


def _perflow_data(spec: str | None, pipeline: bool = False):
    if spec is None or pipeline:  # a text-to-image pipeline takes the caption folder itself (train_perflow caches it)
        return spec, None

    if spec == "digits":
        return make_image_distribution({"name": "digits"}), "digits"
    return make_image_distribution({"name": "images", "path": spec}), str(Path(spec).resolve())


def _perflow_guidance_flags(args: argparse.Namespace) -> float:
    """Check --guidance, --guidance-mode and --p-uncond (one line naming the flag); returns p_uncond."""
    if not math.isfinite(args.guidance):
        raise ConfigError(f"--guidance must be a finite number, got {args.guidance}")
    if args.guidance_mode not in GUIDANCE_MODES:
        raise ConfigError(f"--guidance-mode must be one of {', '.join(GUIDANCE_MODES)}, got {args.guidance_mode!r}")
    p = args.p_uncond if args.p_uncond is not None else (0.1 if args.guidance_mode == "student" else 0.0)
    p = check_fraction(p, "--p-uncond")
    if args.guidance_mode == "student" and args.guidance != 1.0 and p == 0.0:
        raise ConfigError("--p-uncond must be > 0 with --guidance-mode student (condition dropout keeps the student's unconditional branch for guidance)")
    return p


def _perflow_pipeline_flags(args: argparse.Namespace, pipeline: bool) -> dict:
    """Check the text-to-image flags (one line naming the flag); returns train_perflow's keyword arguments for them."""
    flags = {"--lora-rank": args.lora_rank, "--prompt": args.prompt, "--caption-column": args.caption_column, "--latent-mode": args.latent_mode,
             "--cache-dtype": args.cache_dtype, "--lora-bias": args.lora_bias or None}
    if not pipeline:
        given = [f for f, v in flags.items() if v is not None]
        if given:
            raise ConfigError(f"{given[0]} needs a text-to-image pipeline teacher (model_index.json and text_encoder/); {args.teacher} is not one")
        return {}
    if args.lora_rank is not None and args.lora_rank < 0:
        raise ConfigError(f"--lora-rank must be >= 0 (0: no LoRA), got {args.lora_rank}")
    if args.latent_mode is not None and args.latent_mode not in ("mean", "sample"):
        raise ConfigError(f"--latent-mode must be mean or sample, got {args.latent_mode!r}")
    if args.cache_dtype is not None and args.cache_dtype not in ("float32", "float16", "bfloat16"):
        raise ConfigError(f"--cache-dtype must be float32, float16 or bfloat16, got {args.cache_dtype!r}")
    if args.caption_column is not None and not args.caption_column:
        raise ConfigError("--caption-column must not be empty")
    if args.data is None:
        raise ConfigError(f"--data is required for the text-to-image pipeline {args.teacher}: a folder of captioned images "
                          "(metadata.jsonl with file_name and text, or a .txt beside each image)")
    opts = LatentDataOptions(caption_column=args.caption_column or "text", latent_mode=args.latent_mode or "mean",
                             dtype=args.cache_dtype or "float32")
    return {"latent": opts, "lora_rank": args.lora_rank, "prompts": args.prompt}


def _cmd_perflow(args: argparse.Namespace) -> int:
    p_uncond = _perflow_guidance_flags(args)
    pipeline = Path(args.teacher).is_dir() and is_latent_pipeline(args.teacher)
    extra = _perflow_pipeline_flags(args, pipeline)
    batch = args.batch_size if args.batch_size is not None else (DEFAULT_PIPELINE_BATCH if pipeline else DEFAULT_BATCH)
    lr = args.lr if args.lr is not None else (DEFAULT_PIPELINE_LR if pipeline else DEFAULT_LR)
    data, data_name = _perflow_data(args.data, pipeline)
    settings = PeRFlowSettings(windows=args.windows, spacing=args.spacing, solver_steps=args.solver_steps,
                               start_fraction=args.start_fraction, loss_space=args.loss_space,
                               guidance=args.guidance, p_uncond=p_uncond, guidance_mode=args.guidance_mode)
    train = TrainConfig(steps=args.steps, batch_size=batch, lr=lr, lr_schedule="cosine", warmup_steps=min(100, args.steps // 10),
                        ema_decay=args.ema, seed=args.seed, device=args.device, progress=not args.quiet, workers=0, compile=args.compile,
                        log_every=max(1, min(100, args.steps // 10)), ckpt_every=max(1, min(500, args.steps)), precision=args.precision)
    exp = ExportOptions(stock_scheduler=args.stock_scheduler, lora_bias=args.lora_bias, command=shlex.join(["rectflow", *args.argv]))
    out = train_perflow(args.teacher, args.out, settings=settings, train=train, data=data, data_name=data_name, export=args.export_diffusers,
                        export_options=exp, **extra)
    guided = settings.guidance_mode == "student" and settings.guidance != 1.0
    nfe = f" with guidance {settings.guidance:g}: {guidance_nfe(settings.guidance) * args.windows} NFE" if guided else ""
    if pipeline:
        record = json.loads((Path(out) / "perflow.json").read_text())
        lora = "" if args.lora_rank == 0 else ", lora/"
        official = ", official/ (the official repository's delta format)" if (record.get("official") or {}).get("written") else ""
        files = f"diffusers/ (the pipeline; rectflow sample {out}/diffusers --prompt ...), delta.safetensors{lora}{official}, samples.png"
        gap = record.get("lora") or {}
        if "lora_gap" in gap:
            print(f"LoRA (rank {gap.get('rank')}) vs the full delta on a fixed batch of K-step latents: |dz|/|z| = {gap['lora_gap']:.4f}; "
                  f"it misses {100 * gap['lora_missed_share']:.1f} % of the delta's effect (lora/README.md)")
    else:
        files = "student.safetensors, delta.safetensors, samples.png"
    print(f"PeRFlow student ({args.windows} windows, {args.windows}-step sampling{nfe}) saved in {out}: {files}")
    return 0


_COMMANDS.update({"tune": _cmd_tune, "perflow": _cmd_perflow, "pairs": _cmd_pairs, "reflow": _cmd_reflow, "distill": _cmd_distill, "diagnose": _cmd_diagnose, "pipeline": _cmd_pipeline})


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # KEY=VALUE overrides placed after options (argparse takes positionals in one chunk)
        if hasattr(args, "overrides") and all("=" in a and not a.startswith("-") for a in extra):
            args.overrides = [*args.overrides, *extra]
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.argv = list(sys.argv[1:] if argv is None else argv)  # the command line, quoted where a job records how it was made
    try:
        if args.command == "perflow":
            apply_perflow_config(args)
        _check_number_options(parser, args)
        return _COMMANDS[args.command](args)
    except KeyboardInterrupt:
        print("interrupted (the last checkpoint is kept; run the same command again to resume)", file=sys.stderr)
        return 130
    except (RectflowError, ValueError, FloatingPointError, FileNotFoundError) as e:
        _error(args.command, str(e))
        return 2
    except OSError as e:  # a path that cannot be read or written, not caught where it was used
        _error(args.command, f"{e.filename}: {e.strerror or e}" if e.filename else str(e))
        return 2


def _check_number_options(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Every integer option of the command in range (:func:`check_int_range`) and every float option finite, each refused in one
    line naming the option, before the command runs: a huge ``--n`` or ``--seed`` would otherwise fail later with an
    OverflowError or a TypeError traceback, a NaN tolerance after hours of work."""
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[args.command]
    for action in sub._actions:
        if action.type not in (int, float):
            continue
        name = action.option_strings[-1] if action.option_strings else action.dest
        value = getattr(args, action.dest, None)
        for v in value if isinstance(value, list) else [value]:
            if action.type is int and isinstance(v, int):
                check_int_range(v, name)
            elif action.type is float and isinstance(v, float) and not math.isfinite(v):
                raise ConfigError(f"{name} must be a finite number, got {v}")


def _warn(command: str, message: str | None) -> None:
    """Print ``message`` (when there is one) as the one line ``rectflow COMMAND: warning: ...`` on stderr."""
    if message:
        print(f"rectflow {command}: warning: {message}", file=sys.stderr)


def _error(command: str, message: str) -> None:
    """Print ``message`` as the one line ``rectflow COMMAND: error: ...`` on stderr."""
    one_line = "; ".join(part.strip() for part in message.strip().splitlines() if part.strip())
    print(f"rectflow {command}: error: {one_line}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
