"""One-step generation on the 8x8 digits at matched compute: 1-RF, 2-RF, 2-RF + distillation,
MeanFlow and shortcut, each sampled at 1, 2 and 4 steps, FD in classifier features to real digits
with its data floor, two seeds (issue 17; the 2-D table is benchmarks/one_step.py).

Every method trains the same small UNet (benchmarks/_digits.py, the perflow.py network; MeanFlow and
shortcut its two-time variant) through the library's ``Trainer`` and objectives, from N(0, I) noise:

1. 1-RF: ``FlowMatchingObjective`` (independent coupling, uniform t), ``--steps`` steps at ``--lr``;
2. ``--pairs`` pairs (Z0, Z1) of the 1-RF by ``generate_pairs`` (``--pair-solver``; NFE counted);
3. 2-RF: flow matching on those pairs, from the 1-RF's EMA weights, ``--reflow-steps`` at ``--student-lr``;
4. as many pairs of the 2-RF; distillation (``DistillationObjective``, pseudo-Huber) from the 2-RF's
   weights, ``--distill-steps`` steps;
5. MeanFlow and shortcut (one_step.py's SETTINGS, MeanFlow with p = 1: DIGITS_SETTINGS), from scratch at ``--lr``, given as many steps as
   make their compute equal to the whole chain's.

Compute units are one_step.py's UNITS (network passes per sample: flow matching 3 per step, MeanFlow
4, shortcut 3.5, one teacher evaluation of a pair 1).  Evaluation: ``--n-eval`` fixed noise draws,
Euler steps (MeanFlow / shortcut: their own jumps), clipped to [-1, 1], FD to ``--n-eval`` real digits;
the data floor is a second real draw.  Also reported: the FD of the pairs' endpoints (the 1-RF's and
2-RF's ODE solutions: what the one-step models imitate).  Resumable per seed (partial JSONL under
``--out``/tmp); writes ``--out``/``--name``.{json,md}.

Speed on one core of the 2-core dev machine (loaded by two other jobs), batch 128, 16 channels:
flow matching ~24 steps/s, shortcut ~21, MeanFlow ~8 (the forward-mode JVP costs 3x a flow-matching
step on the CPU, more than its 4/3 compute units); one UNet evaluation ~7,300 samples/s; dopri5 at
tol 1e-4 took ~100 NFE per 1-RF pair and ~70 per 2-RF pair in the smoke run.  The defaults then cost
~4.8M units per chain (3.1M training + 1.7M pairs): 1-RF ~3 min, pairs ~4 min, 2-RF and distillation
~1.5 min each, MeanFlow ~9,300 steps ~19 min, shortcut ~10,600 steps ~9 min, evaluation ~1 min:
about 40 min per seed on that loaded core (less on a quiet one).

    .venv/bin/python benchmarks/one_step_digits.py                       # 2 seeds, about 80 min on one core
    .venv/bin/python benchmarks/one_step_digits.py --seeds 1 & .venv/bin/python benchmarks/one_step_digits.py --first-seed 1   # one core each
    .venv/bin/python benchmarks/one_step_digits.py --seeds 1 --steps 200 --reflow-steps 100 --distill-steps 100 \\
        --pairs 500 --n-eval 500 --out /tmp/osd --name smoke             # smoke test, ~2 min
"""

from __future__ import annotations

import argparse
import copy
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from _bench import append_rows, bench_args, resumable_rows, write_results
from _digits import SHAPE, DigitsFD, fit, make_unet, train_config
from _machine import machine_info, machine_line
from one_step import AVERAGE, REVISION, SETTINGS, STEPS, UNITS
from rectflow.engine.io import read_jsonl
from rectflow.flow.couplings import IndependentCoupling
from rectflow.flow.losses import FlowMatchingObjective
from rectflow.flow.meanflow import MeanFlowObjective, ShortcutObjective, sample_mean_flow
from rectflow.flow.sampling import sample_model
from rectflow.reflow.distill import DistillationObjective, make_distill_loss
from rectflow.reflow.pairs import PairCoupling, PairOptions, generate_pairs

# one_step.py's settings, but MeanFlow with the paper's adaptive weight p = 1, the measured best on images
# (benchmarks/results/meanflow_screen_digits.md: one-step FD 100 at p = 1 vs 200 at p = 0 after 2000 steps)
DIGITS_SETTINGS = {"MeanFlow": {**SETTINGS["MeanFlow"], "adaptive_power": 1.0}, "shortcut": SETTINGS["shortcut"]}
SIZES = ("steps", "reflow_steps", "distill_steps", "pairs", "batch", "channels", "lr", "student_lr", "pair_solver", "pair_tol",
         "huber_c", "n_eval", "eval_seed")


def fds(sampler, noise: torch.Tensor, fd: DigitsFD) -> dict[str, float]:
    """FD at 1, 2 and 4 steps of ``sampler(noise, steps) -> samples``."""
    return {f"fd@{k}": fd(sampler(noise, k)) for k in STEPS}


def euler(model) -> Any:
    return lambda x, k: sample_model(model, x, method="euler", steps=k, batch_size=1000).x


def make_pairs(model, fd: DigitsFD, out: Path, seed: int, args) -> tuple[PairCoupling, float, float]:
    """The pairs of ``model``'s flow, their mean NFE and the FD of their endpoints (first n-eval)."""
    store = generate_pairs(model, fd.source, out, args.pairs, PairOptions(seed=seed, shard_size=args.pairs, solver=args.pair_solver,
                           rtol=args.pair_tol, atol=args.pair_tol, device="cpu"), progress=False)
    coupling = PairCoupling(store, shape=SHAPE)
    return coupling, float(store.manifest["stats"]["nfe_mean"]), fd(store.load()[1][: args.n_eval])


def train_chain(seed: int, args, fd: DigitsFD, noise: torch.Tensor, work: Path) -> list[dict[str, Any]]:
    """1-RF -> pairs -> 2-RF -> pairs -> distillation; one row per stage, compute counted up to it."""
    b, t0 = args.batch, time.perf_counter()
    torch.manual_seed(seed)
    rf1 = fit(make_unet(args.channels), FlowMatchingObjective(IndependentCoupling(fd.source, fd.data)),
              train_config(args.steps, b, args.lr, seed))
    t1 = time.perf_counter()
    pairs1, nfe1, pfd1 = make_pairs(rf1, fd, work / "pairs_1rf", seed, args)
    t2 = time.perf_counter()
    rf2 = fit(copy.deepcopy(rf1), FlowMatchingObjective(pairs1), train_config(args.reflow_steps, b, args.student_lr, seed))
    t3 = time.perf_counter()
    pairs2, nfe2, pfd2 = make_pairs(rf2, fd, work / "pairs_2rf", seed, args)
    t4 = time.perf_counter()
    loss = make_distill_loss("pseudo_huber", c=args.huber_c)
    dist = fit(copy.deepcopy(rf2), DistillationObjective(pairs2, loss), train_config(args.distill_steps, b, args.student_lr, seed))
    t5 = time.perf_counter()
    c1 = UNITS["fm"] * b * args.steps
    c2 = c1 + args.pairs * nfe1 + UNITS["fm"] * b * args.reflow_steps
    c3 = c2 + args.pairs * nfe2 + UNITS["fm"] * b * args.distill_steps
    stages = [("1-RF", rf1, c1, args.steps, t1 - t0, {}),
              ("2-RF", rf2, c2, args.reflow_steps, t3 - t2, {"pair_nfe": nfe1, "pair_s": t2 - t1, "pairs_fd": pfd1}),
              ("2-RF + distill", dist, c3, args.distill_steps, t5 - t4, {"pair_nfe": nfe2, "pair_s": t4 - t3, "pairs_fd": pfd2})]
    return [{"seed": seed, "method": name, "compute": c, "train_steps": n, "train_s": s, **extra, **fds(euler(m), noise, fd)}
            for name, m, c, n, s, extra in stages]


def average_row(seed: int, kind: str, label: str, budget: float, args, fd: DigitsFD, noise: torch.Tensor) -> dict[str, Any]:
    """Train the average-velocity method ``kind`` (MeanFlow or shortcut) at the chain's ``budget``."""
    steps = max(1, round(budget / (UNITS[kind] * args.batch)))
    coupling = IndependentCoupling(fd.source, fd.data)
    objective = MeanFlowObjective(coupling, **DIGITS_SETTINGS["MeanFlow"]) if kind == "meanflow" else ShortcutObjective(coupling, **DIGITS_SETTINGS["shortcut"])
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    model = fit(make_unet(args.channels, average=True), objective, train_config(steps, args.batch, args.lr, seed))
    secs = time.perf_counter() - t0
    return {"seed": seed, "method": label, "compute": UNITS[kind] * args.batch * steps, "train_steps": steps, "train_s": secs,
            "settings": {**DIGITS_SETTINGS[label], "revision": REVISION}, **fds(lambda x, k: sample_mean_flow(model, x, steps=k).x, noise, fd)}


def run_seed(seed: int, args, fd: DigitsFD, noise: torch.Tensor) -> list[dict[str, Any]]:
    work = Path(tempfile.mkdtemp(prefix=f"one_step_digits_{seed}_"))
    try:
        rows = train_chain(seed, args, fd, noise, work)
        budget = rows[-1]["compute"]
        rows += [average_row(seed, kind, label, budget, args, fd, noise) for kind, label in AVERAGE]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    sizes = {k: getattr(args, k) for k in SIZES}
    for r in rows:
        r.update(compute_ratio=r["compute"] / budget, sizes=sizes)
    print(f"seed {seed}: " + "; ".join(f"{r['method']} {r['fd@1']:.2f}/{r['fd@2']:.2f}/{r['fd@4']:.2f} ({r['train_s']:.0f}s)" for r in rows), flush=True)
    return rows


def agg(vals: list[float], digits: int = 3) -> str:
    return f"{statistics.fmean(vals):.{digits}f}" + (f" ± {statistics.stdev(vals):.{digits}f}" if len(vals) > 1 else "")


def render(rows: list[dict], floor: float, accuracy: float, machine: dict, args) -> str:
    out = ["# One-step generation at matched compute on 8x8 digits: reflow chain vs MeanFlow vs shortcut", "", machine_line(machine), "",
           f"FD between {args.n_eval} samples (clipped to [-1, 1]) and {args.n_eval} real digits in the 128-D features of a classifier "
           f"trained on the digits (held-out accuracy {accuracy:.3f}); data floor (real vs real) {floor:.3f}.  1 / 2 / 4 Euler steps "
           "(MeanFlow and shortcut: their own jumps) from fixed noise; mean ± sd over the seeds in each row.  Compute in network passes "
           "per sample (one_step.py's units), relative to the whole reflow chain's.  "
           f"UNet {args.channels} channels, batch {args.batch}; 1-RF {args.steps} steps at lr {args.lr}, 2-RF {args.reflow_steps} and "
           f"distillation {args.distill_steps} steps at lr {args.student_lr} (pseudo-Huber c = {args.huber_c or 'auto'}), "
           f"{args.pairs} pairs per stage by {args.pair_solver}" + (f" (tol {args.pair_tol:g})" if args.pair_solver == "dopri5" else "") + ".", "",
           "| method | seeds | train steps | compute / chain | FD 1 step | FD 2 steps | FD 4 steps | FD floor |", "|---|---|---|---|---|---|---|---|"]
    for method in dict.fromkeys(r["method"] for r in rows):
        rs = [r for r in rows if r["method"] == method]
        out.append(f"| {method} | {len(rs)} | {round(statistics.fmean(r['train_steps'] for r in rs))} | "
                   f"{statistics.fmean(r['compute_ratio'] for r in rs):.2f} | " + " | ".join(agg([r[f"fd@{k}"] for r in rs]) for k in STEPS)
                   + f" | {floor:.3f} |")
    out += [""] + [f"Pairs of the {teacher} (what the {m} learns from): mean NFE {agg([r['pair_nfe'] for r in rows if r['method'] == m], 1)}, "
                   f"FD of their endpoints (the {teacher}'s ODE samples) {agg([r['pairs_fd'] for r in rows if r['method'] == m])}."
                   for m, teacher in (("2-RF", "1-RF"), ("2-RF + distill", "2-RF")) if any(r["method"] == m for r in rows)]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = bench_args(__doc__.split("\n\n")[0], "one_step_digits", threads=1, formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                    report_only="train nothing: tabulate the finished seeds of the partial file")
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=4000, help="1-RF training steps")
    ap.add_argument("--reflow-steps", type=int, default=2000)
    ap.add_argument("--distill-steps", type=int, default=2000)
    ap.add_argument("--pairs", type=int, default=10000, help="pairs per reflow / distillation stage")
    ap.add_argument("--pair-solver", default="dopri5", help="generate_pairs solver: dopri5 or e.g. euler:32")
    ap.add_argument("--pair-tol", type=float, default=1e-4, help="dopri5 rtol = atol")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--channels", type=int, default=16)
    ap.add_argument("--lr", type=float, default=2e-3, help="1-RF, MeanFlow and shortcut (from scratch)")
    ap.add_argument("--student-lr", type=float, default=1e-3, help="2-RF and distillation (from the previous stage's weights)")
    ap.add_argument("--huber-c", type=float, default=0.0, help="pseudo-Huber c (0: the library's image default)")
    ap.add_argument("--n-eval", type=int, default=5000)
    ap.add_argument("--eval-seed", type=int, default=99)
    ap.add_argument("--first-seed", type=int, default=0, help="train seeds first-seed .. seeds - 1 only (two processes can split the seeds; "
                    "then --report-only tabulates them all)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    partial, rows = resumable_rows(args.out, args.name)  # finished rows are kept; a fresh clone resumes from the committed ones
    sizes = {k: getattr(args, k) for k in SIZES}
    other = sorted({r["seed"] for r in rows if r["sizes"] != sizes})
    if other:
        ap.error(f"{partial} holds seeds {other} made with other sizes ({next(r['sizes'] for r in rows if r['sizes'] != sizes)}); "
                 "pass the same sizes or another --name")
    fd = DigitsFD(args.n_eval)
    print(f"feature classifier: held-out accuracy {fd.accuracy:.3f}; data floor FD {fd.floor:.3f}", flush=True)
    noise = fd.source.sample(args.n_eval, generator=torch.Generator().manual_seed(args.eval_seed))
    done = {r["seed"] for r in rows}
    for seed in range(args.first_seed, args.seeds):
        if seed in done or args.report_only:
            continue
        new = run_seed(seed, args, fd, noise)
        append_rows(partial, new)
        rows += new
    rows = read_jsonl(partial)  # with rows another process added meanwhile
    rows = sorted((r for r in rows if r["seed"] < args.seeds), key=lambda r: r["seed"])
    machine = machine_info()
    md = render(rows, fd.floor, fd.accuracy, machine, args)
    payload = {"machine": machine, "rows": rows, "floor": fd.floor, "classifier_accuracy": fd.accuracy, "units": UNITS, "settings": DIGITS_SETTINGS,
               "args": {k: str(v) for k, v in vars(args).items()}}
    js, mdp = write_results(args.out, args.name, payload, md)
    print(md)
    print(f"\nwrote {js} and {mdp}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
