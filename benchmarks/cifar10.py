"""CIFAR-10 at GPU speed: 1-RF on a fixed time budget, then reflow (2-RF) and one-step
distillation, each on its own budget; Frechet distances vs NFE in one table (needs CUDA).

Recipe: ``configs/cifar10.yaml`` (35.7M UNet, logit-normal time, bf16, channels-last, compile),
with the power EMA (suits short runs) and an open-ended step count stopped by
:class:`rectflow.engine.trainer.TimeBudget`.  Stages:

1. 1-RF, N(0, I) -> CIFAR-10 train (JPEG copy), ``--budget-1rf`` seconds (default 360, the
   issue's "6-minute H100 budget"); FD at Euler 1/2/4/10/100 and dopri5.
2. Reflow: ``--pairs`` pairs (Z0, Flow_1(Z0)) by dopri5, then the 2-RF initialised from the
   1-RF with U-shaped time sampling, ``--budget-reflow`` seconds; FD at Euler 1/2/4/10.
3. Distillation of the 2-RF (pairs of the 2-RF, pseudo-Huber loss, initialised from the 2-RF),
   ``--budget-distill`` seconds; FD at one step.

Goal: the distilled one-step FD at least as good as the 1-RF's 100-step FD.  The training budgets
include compilation; pair generation and evaluation are timed separately.

FD features: no pretrained weights can be fetched, so the script first trains a small CIFAR-10
classifier (``--clf-seconds``) and uses its 256-d penultimate features (FD is then comparable
within this table only).  With ``--inception PATH`` (the local ``inception-2015-12-05.pt``
TorchScript) FID is reported too.  FD is computed between ``--n-fd`` generated images and the
50,000 training images.  Peak GPU memory is reported per stage.

    .venv/bin/python benchmarks/cifar10.py                       # CUDA; about an hour with the defaults
    .venv/bin/python benchmarks/cifar10.py --cpu-smoke           # tiny everything on the CPU: checks the script
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch

from _bench import ROOT, bench_args, write_results
from _cifar10 import FeatureStats, evaluate_model
from _machine import machine_info, machine_line
from rectflow.data.image_sets import load_images, to_unit_range
from rectflow.engine.trainer import TimeBudget
from rectflow.images.classifier_features import train_cifar_classifier
from rectflow.images.quality import inception_network
from rectflow.reflow.pairs import PairOptions
from rectflow.runs.config import load_config
from rectflow.runs.experiment import load_run, train_run
from rectflow.runs.lineage import child_config, generate_run_pairs

DATA = ROOT.parent / "shared" / "data" / "cifar10-jpeg"


# ----- sampling and FD (the classifier: rectflow.images.classifier_features; the FD rows: _cifar10.py) ----------------------


def evaluate(run_dir: Path, solvers: list[str], args, device: torch.device, feats: list[FeatureStats], grid_dir: Path) -> list[dict]:
    """FD (and FID) of ``args.n_fd`` samples of a run for each solver spec."""
    run = load_run(run_dir, device=str(device))
    fast = torch.compile(run.model, dynamic=False) if device.type == "cuda" and not args.no_compile else run.model
    with _tf32(device):
        return evaluate_model(run.model, run.source, solvers, stage=run_dir.name, n=args.n_fd, feats=feats, device=device, grid_dir=grid_dir,
                              grid_specs=tuple(solvers), bf16=device.type == "cuda", fast_model=fast, batch_size=args.sample_batch, rtol=args.rtol)


class _tf32:
    def __init__(self, device: torch.device) -> None:
        self.on = device.type == "cuda"

    def __enter__(self) -> None:
        if self.on:
            self.old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True

    def __exit__(self, *exc: Any) -> None:
        if self.on:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = self.old


# ----- stages ----------------------------------------------------------------------------------


def _peak_reset(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _peak(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def train_stage(cfg, run_dir: Path, budget: float, device: torch.device) -> dict:
    if run_dir.exists():
        shutil.rmtree(run_dir)  # the benchmark's own output: every stage starts fresh
    _peak_reset(device)
    t0 = time.perf_counter()
    trainer = train_run(cfg, run_dir, callbacks=[TimeBudget(budget, every=20)])
    secs = time.perf_counter() - t0
    return {"stage": run_dir.name, "steps": trainer.step, "train_s": secs, "train_img_per_s": trainer.step * cfg.train.batch_size / secs, "train_peak_gib": _peak(device)}


def make_pairs(run_dir: Path, args, device: torch.device) -> tuple[Path, dict]:
    out = run_dir / "pairs"
    _peak_reset(device)
    t0 = time.perf_counter()
    with _tf32(device):
        store = generate_run_pairs(run_dir, args.pairs, out, options=PairOptions(solver=args.pair_solver, rtol=args.rtol, atol=args.rtol,
                                   shard_size=args.shard_size, device=str(device)), progress=not args.quiet)
    stats = store.manifest.get("stats", {})
    return out, {"pairs": args.pairs, "pairs_s": time.perf_counter() - t0, "pairs_nfe_mean": stats.get("nfe_mean"), "pairs_peak_gib": _peak(device)}


def _latest(run_dir: Path) -> Path:
    return sorted((run_dir / "checkpoints").glob("step_*.safetensors"))[-1]


def stage_overrides(args) -> list[str]:
    train_zip = args.train_zip
    over = [
        f"target.path={train_zip}", "train.steps=1000000000", "train.ckpt_every=1000000000", "train.log_every=200",
        "train.sample_every=0", "train.ema_kind=power", "train.warmup_steps=200", f"train.batch_size={args.batch}",
        f"train.lr={args.lr}", f"train.progress={'false' if args.quiet else 'true'}", f"eval.rtol={args.rtol}", f"eval.atol={args.rtol}",
    ]
    if args.no_compile:
        over.append("train.compile=false")
    if args.cpu_smoke:
        over += ["model.channels=16", "model.channel_mult=[1,2]", "model.num_res_blocks=1", "model.attention_resolutions=[16]",
                 "model.head_channels=16", "train.precision=fp32", "train.channels_last=false", "train.compile=false",
                 "target.device=cpu", "train.device=cpu", "train.log_every=5"]
    return over


def render(machine: dict, gpu: str, clf: dict, floor: dict, stages: list[dict], rows: list[dict], args, goal: str) -> str:
    def f(v: Any, fmt: str = ".2f") -> str:
        return "" if v is None else format(v, fmt) if isinstance(v, float) else str(v)

    has_fid = any("fid" in r for r in rows)
    out = [f"# CIFAR-10: 1-RF -> 2-RF -> distillation on time budgets ({'CPU smoke run: tiny, meaningless numbers' if args.cpu_smoke else gpu})", "",
           machine_line(machine), ""]
    out += [
        f"FD features: small CIFAR-10 classifier trained {clf['seconds']:.0f} s ({clf['steps']} steps), test accuracy "
        f"{100 * clf['test_accuracy']:.1f} %; 256-d penultimate features.  FD of {args.n_fd} generated images vs the "
        f"{floor['n_ref']} training images; floor (FD of the test images vs train): {floor['fd']:.3f}"
        + (f", FID floor {floor['fid']:.2f}" if "fid" in floor else "") + ".", "",
        "| stage | train steps | train s | train img/s | train peak GiB | pairs | pairs s | pair NFE (mean) | pairs peak GiB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for s in stages:
        out.append(f"| {s['stage']} | {s['steps']} | {s['train_s']:.0f} | {s['train_img_per_s']:.0f} | {f(s['train_peak_gib'])} | "
                   f"{f(s.get('pairs'))} | {f(s.get('pairs_s'), '.0f')} | {f(s.get('pairs_nfe_mean'), '.1f')} | {f(s.get('pairs_peak_gib'))} |")
    out += ["", "| stage | solver | NFE | FD | " + ("FID | " if has_fid else "") + "sampling img/s |", "|---|---|---|---|" + ("---|" if has_fid else "") + "---|"]
    for r in rows:
        out.append(f"| {r['stage']} | {r['solver']} | {r['nfe']} | {r['fd']:.3f} | " + (f"{f(r.get('fid'))} | " if has_fid else "") + f"{r['img_per_s']:.0f} |")
    out += ["", goal]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = bench_args(__doc__.split("\n\n")[0], "cifar10", formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train-zip", default=str(DATA / "train.zip"), help="CIFAR-10 training images (ZIP of class folders)")
    ap.add_argument("--test-zip", default=str(DATA / "test.zip"), help="CIFAR-10 test images (classifier accuracy, FD floor)")
    ap.add_argument("--budget-1rf", type=float, default=360.0, help="1-RF training seconds (default 360)")
    ap.add_argument("--budget-reflow", type=float, default=360.0, help="2-RF training seconds")
    ap.add_argument("--budget-distill", type=float, default=180.0, help="distillation training seconds")
    ap.add_argument("--clf-seconds", type=float, default=60.0, help="training seconds of the FD feature classifier")
    ap.add_argument("--pairs", type=int, default=50000, help="reflow / distillation pairs per stage")
    ap.add_argument("--pair-solver", default="dopri5", help="solver spec of the pairs (dopri5 or e.g. euler:100)")
    ap.add_argument("--shard-size", type=int, default=2000, help="pairs per shard (= sampling batch of pair generation)")
    ap.add_argument("--rtol", type=float, default=1e-3, help="dopri5 rtol = atol (pairs and the dopri5 row)")
    ap.add_argument("--n-fd", type=int, default=10000, help="generated images per FD")
    ap.add_argument("--solvers-1rf", default="euler:1,euler:2,euler:4,euler:10,euler:100,dopri5", help="solvers evaluated for the 1-RF")
    ap.add_argument("--solvers-2rf", default="euler:1,euler:2,euler:4,euler:10", help="solvers evaluated for the 2-RF")
    ap.add_argument("--batch", type=int, default=128, help="training batch")
    ap.add_argument("--lr", type=float, default=2e-4, help="learning rate of every stage")
    ap.add_argument("--sample-batch", type=int, default=1000, help="sampling batch")
    ap.add_argument("--inception", help="local inception-2015-12-05.pt TorchScript: also report FID")
    ap.add_argument("--no-compile", action="store_true", help="skip torch.compile")
    ap.add_argument("--quiet", action="store_true", help="no progress bars")
    ap.add_argument("--only-1rf", action="store_true", help="stop after the 1-RF and its FD rows (the short check of gpu_check.py)")
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny sizes on the CPU (test.zip only): checks that the script runs")
    args = ap.parse_args(argv)
    if args.cpu_smoke:
        torch.set_num_threads(1)
        args.train_zip = args.test_zip  # 10,000 images decode quickly
        args.budget_1rf = args.budget_reflow = args.budget_distill = 8.0
        args.clf_seconds, args.pairs, args.shard_size, args.n_fd = 5.0, 64, 32, 128
        args.batch, args.sample_batch, args.rtol, args.no_compile = 16, 64, 1e-2, True
        args.solvers_1rf, args.solvers_2rf = "euler:1,euler:4,dopri5", "euler:1,euler:2"
        args.name += "_cpu_smoke"
        device = torch.device("cpu")
    elif not torch.cuda.is_available():
        print("benchmarks/cifar10.py trains on a time budget meant for a GPU and needs a CUDA device, but none is available "
              "(run with --cpu-smoke to check the script on tiny sizes)", file=sys.stderr)
        return 2
    else:
        device = torch.device("cuda")
    for p in (args.train_zip, args.test_zip):
        if not Path(p).is_file():
            print(f"{p}: CIFAR-10 ZIP not found (see ../shared/data/cifar10-jpeg/README.md)", file=sys.stderr)
            return 2
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    machine = machine_info()
    work = args.out / f"{args.name}_runs"
    grids = args.out / f"{args.name}_grids"

    print("loading CIFAR-10 ...", flush=True)
    train, test = load_images(args.train_zip), load_images(args.test_zip)
    print(f"training the FD feature classifier ({args.clf_seconds:.0f} s) ...", flush=True)
    clf, clf_info = train_cifar_classifier(train, test, args.clf_seconds, device, batch=512 if device.type == "cuda" else 32, width=16 if args.cpu_smoke else 64)
    ref = to_unit_range(train.images)
    feats = [FeatureStats("fd", clf, ref, device)]
    floor = {"n_ref": len(ref), "fd": feats[0].fd(to_unit_range(test.images))}
    if args.inception:
        feats.append(FeatureStats("fid", inception_network(args.inception, device), ref, device, batch_size=250))
        floor["fid"] = feats[1].fd(to_unit_range(test.images))
    del ref

    base = load_config(ROOT / "configs" / "cifar10.yaml", stage_overrides(args))
    stages, rows = [], []
    # stage 1: 1-RF
    print(f"1-RF: training for {args.budget_1rf:.0f} s ...", flush=True)
    d1 = work / "cifar10-1rf"
    stages.append(train_stage(base, d1, args.budget_1rf, device))
    rows += evaluate(d1, args.solvers_1rf.split(","), args, device, feats, grids)
    if args.only_1rf:
        return finish(args, machine, gpu, clf_info, floor, stages, rows, work, grids)
    # stage 2: reflow
    print(f"reflow: {args.pairs} pairs, then {args.budget_reflow:.0f} s of training ...", flush=True)
    pairs1, pinfo = make_pairs(d1, args, device)
    parent = load_run(d1)
    cfg2 = child_config(parent, coupling={"kind": "pairs", "pairs": str(pairs1.resolve())}, stage=2, init=str(_latest(d1)),
                        overrides=["time.kind=u_shaped", "time.a=4.0", "train.warmup_steps=0"])
    d2 = work / "cifar10-2rf"
    stages.append({**train_stage(cfg2, d2, args.budget_reflow, device), **pinfo})
    rows += evaluate(d2, args.solvers_2rf.split(","), args, device, feats, grids)
    # stage 3: distillation of the 2-RF
    print(f"distillation: {args.pairs} pairs of the 2-RF, then {args.budget_distill:.0f} s of training ...", flush=True)
    pairs2, pinfo = make_pairs(d2, args, device)
    cfg3 = child_config(load_run(d2), coupling={"kind": "pairs", "pairs": str(pairs2.resolve())}, stage=2, init=str(_latest(d2)),
                        distill=True, distill_loss="pseudo_huber", overrides=["train.warmup_steps=0"])
    d3 = work / "cifar10-2rf-distill"
    stages.append({**train_stage(cfg3, d3, args.budget_distill, device), **pinfo})
    rows += evaluate(d3, ["euler:1"], args, device, feats, grids)

    return finish(args, machine, gpu, clf_info, floor, stages, rows, work, grids)


def finish(args, machine: dict, gpu: str, clf_info: dict, floor: dict, stages: list[dict], rows: list[dict], work: Path, grids: Path) -> int:
    """Write the table and JSON; the goal line compares the distilled one-step FD (when there is one)
    with the 1-RF's Euler-100 FD."""
    ref100 = next((r["fd"] for r in rows if r["stage"] == "cifar10-1rf" and r["solver"] == "euler:100"), None)
    one_step = next((r["fd"] for r in rows if r["stage"] == "cifar10-2rf-distill" and r["solver"] == "euler:1"), None)
    if one_step is None:
        goal = "1-RF only (--only-1rf): no distilled model to compare." if args.only_1rf else "No distilled row."
    elif ref100 is not None:
        goal = (f"Goal (one-step FD of the distilled 2-RF <= the 1-RF's Euler-100 FD): {one_step:.3f} vs {ref100:.3f}: "
                f"{'met' if one_step <= ref100 else 'NOT met'}.")
    else:
        goal = f"One-step FD of the distilled 2-RF: {one_step:.3f}."
    md = render(machine, gpu, clf_info, floor, stages, rows, args, goal)
    payload = {"machine": machine, "gpu": gpu, "classifier": clf_info, "floor": floor, "stages": stages, "rows": rows,
               "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}}
    js, mdp = write_results(args.out, args.name, payload, md)
    print(md)
    print(f"\nwrote {js} and {mdp}; runs in {work}, sample grids in {grids}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
