"""One-step generation, every method under one trainer, one metric and one compute budget: 1-RF,
2-RF, 2-RF + distillation, MeanFlow and shortcut models on the four 2-D tasks, each sampled at 1, 2
and 4 steps, exact W2 against 5k held-out target points with the task's finite-sample floor, two seeds.

Compute is counted in network passes per training sample: a forward pass is 1, a backward pass 2
(the usual FLOP ratio), a forward-mode Jacobian-vector product 2 (primal and tangent), and one
teacher evaluation while generating a reflow pair 1.  Per training step and sample:

    flow matching (1-RF, 2-RF, distillation)   3
    MeanFlow                                   4    (jvp 2 + backward 2)
    shortcut (25 % self-consistency rows)      3.5  (those rows add 2 no-grad forwards)

The reflow chain's total, 3 B (N_1rf + N_2rf + N_distill) + pairs x mean teacher NFE (both stages),
is measured first; MeanFlow and shortcut then get as many steps as make their total equal to it
(within 1 %).  The 1-RF and 2-RF rows report the compute spent up to that stage.  The chain runs
through the library's jobs (``train_run``, ``train_reflow``, ``train_distill``) with the measured 2-D
recipe of ``toy2d.py``; MeanFlow and shortcut through the same ``Trainer`` with the same recipe and
:class:`rectflow.models.MLPAverageVelocity` (same width and depth as the flow's MLP).

    .venv/bin/python benchmarks/one_step.py                              # all tasks, 2 seeds (about 1.5 h on 2 cores)
    .venv/bin/python benchmarks/one_step.py --tasks gauss-moons --seeds 1 --steps 500 --pairs 2000 --distill-steps 500 --name one_step_smoke
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from _bench import append_rows, bench_args, resumable_rows, write_results, write_rows
from _machine import machine_info, machine_line
from rectflow.data import make_distribution
from rectflow.engine.trainer import TrainConfig, Trainer
from rectflow.flow.couplings import IndependentCoupling
from rectflow.flow.meanflow import MeanFlowObjective, ShortcutObjective, sample_mean_flow
from rectflow.flow.metrics import wasserstein2
from rectflow.flow.sampling import sample_model
from rectflow.models import MLPAverageVelocity
from rectflow.reflow.pairs import PairOptions, PairStore
from rectflow.runs.config import config_from_dict
from rectflow.runs.distill_job import train_distill
from rectflow.runs.experiment import load_run, train_run
from rectflow.runs.lineage import default_pairs_dir
from rectflow.runs.reflow_job import train_reflow
from toy2d import RECIPE, TASKS, noise_floor

UNITS = {"fm": 3.0, "meanflow": 4.0, "shortcut": 3.0 * 0.75 + 5.0 * 0.25}
# The average-velocity objectives' settings, recorded in their rows: a row made with other settings
# is trained again (only that method) on the next run, from the chain's recorded budget.
SETTINGS = {"MeanFlow": {"adaptive_power": 0.0, "equal_fraction": 0.25}, "shortcut": {"levels": 7, "consistency_fraction": 0.25}}
AVERAGE = (("meanflow", "MeanFlow"), ("shortcut", "shortcut"))
LEGACY = {"MeanFlow": {"adaptive_power": 1.0, "equal_fraction": 0.25}, "shortcut": SETTINGS["shortcut"]}  # rows before settings were recorded
# The objectives' code revision, recorded beside the settings: rows of an older revision are retrained too.
# 2: MeanFlow's s = t rows at the noisier draw; shortcut's smallest half jumps queried at gap 0 (review of 2026-12-02).
REVISION = 2


def recorded_settings(label: str) -> dict[str, Any]:
    """What a MeanFlow / shortcut row records: its objective's settings and the code revision."""
    return {**SETTINGS[label], "revision": REVISION}
STEPS = (1, 2, 4)
WIDTH, DEPTH = 256, 3


def eval_sets(task: str, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Held-out source draws and the reference target set (the streams toy2d's noise floor uses)."""
    source, target = make_distribution(TASKS[task]["source"]), make_distribution(TASKS[task]["target"])
    g = torch.Generator().manual_seed(seed)
    return source.sample(n, generator=g), target.sample(n, generator=g)


def w2_rows(method: str, sampler, x0: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
    return {f"w2@{k}": wasserstein2(sampler(x0, k), ref) for k in STEPS} | {"method": method}


def flow_sampler(model):
    return lambda x0, k: sample_model(model, x0, method="euler", steps=k).x


def train_chain(task: str, seed: int, args, work: Path) -> tuple[dict[str, Any], list[tuple[str, Any, float]]]:
    cfg = config_from_dict({
        "source": TASKS[task]["source"], "target": TASKS[task]["target"], "model": {"kind": "mlp", "width": WIDTH, "depth": DEPTH},
        "time": dict(RECIPE["time"]),
        "train": {**RECIPE["train"], "steps": args.steps, "seed": seed, "progress": False, "log_every": 100, "ckpt_every": args.steps,
                  "keep_checkpoints": 1, "device": "cpu"},
        "eval": {"n_samples": 1000, "solvers": ["euler:1"]},
    })
    b = cfg.train.batch_size
    t0 = time.perf_counter()
    d1 = work / "1rf"
    train_run(cfg, d1)
    opts = PairOptions(seed=seed, solver="dopri5", rtol=1e-5, atol=1e-5, shard_size=args.pairs, device="cpu")
    d2 = Path(train_reflow(d1, work / "2rf", n_pairs=args.pairs, options=opts, steps=args.reflow_steps, progress=False))
    d3 = Path(train_distill(d2, work / "distill", n_pairs=args.pairs, loss="pseudo_huber", huber_c=0.05, steps=args.distill_steps, options=opts,
                            progress=False))
    secs = time.perf_counter() - t0
    nfe = [PairStore(default_pairs_dir(parent, args.pairs, "dopri5", seed)).manifest["stats"]["nfe_mean"] for parent in (d1, d2)]
    c1 = UNITS["fm"] * b * args.steps
    c2 = c1 + args.pairs * nfe[0] + UNITS["fm"] * b * args.reflow_steps
    c3 = c2 + args.pairs * nfe[1] + UNITS["fm"] * b * args.distill_steps
    stages = [("1-RF", load_run(d1).model, c1), ("2-RF", load_run(d2).model, c2), ("2-RF + distill", load_run(d3).model, c3)]
    return {"chain_s": secs, "pair_nfe": nfe, "batch": b}, stages


def train_average_velocity(task: str, seed: int, kind: str, budget: float, batch: int, args) -> tuple[Any, int, float]:
    steps = max(1, round(budget / (UNITS[kind] * batch)))
    coupling = IndependentCoupling(make_distribution(TASKS[task]["source"]), make_distribution(TASKS[task]["target"]))
    objective = MeanFlowObjective(coupling, **SETTINGS["MeanFlow"]) if kind == "meanflow" else ShortcutObjective(coupling, **SETTINGS["shortcut"])
    torch.manual_seed(seed)
    net = MLPAverageVelocity(2, width=WIDTH, depth=DEPTH)
    tc = {k: v for k, v in RECIPE["train"].items()}
    cfg = TrainConfig(**{**tc, "steps": steps, "seed": seed, "progress": False, "log_every": 100, "ckpt_every": 10**9, "device": "cpu"})
    t0 = time.perf_counter()
    trainer = Trainer(net, objective, cfg)
    trainer.fit()
    return trainer.eval_model, steps, time.perf_counter() - t0


def run_one(task: str, seed: int, args) -> list[dict[str, Any]]:
    work = Path(tempfile.mkdtemp(prefix=f"one_step_{task}_{seed}_"))
    try:
        info, stages = train_chain(task, seed, args, work)
        x0, ref = eval_sets(task, args.n_eval, args.eval_seed)
        rows = []
        for name, model, compute in stages:
            rows.append({"task": task, "seed": seed, "compute": compute, **w2_rows(name, flow_sampler(model), x0, ref)})
        budget = stages[-1][2]
        rows += [average_row(task, seed, kind, label, budget, info["batch"], args, x0, ref) for kind, label in AVERAGE]
        for r in rows:
            r["compute_ratio"] = r["compute"] / budget
        print(f"{task} seed {seed}: " + "; ".join(f"{r['method']} {r['w2@1']:.3f}/{r['w2@2']:.3f}/{r['w2@4']:.3f}" for r in rows), flush=True)
        return rows
    finally:
        shutil.rmtree(work, ignore_errors=True)


def average_row(task: str, seed: int, kind: str, label: str, budget: float, batch: int, args, x0: torch.Tensor, ref: torch.Tensor) -> dict[str, Any]:
    """Train the average-velocity method ``kind`` at the chain's ``budget`` and evaluate it."""
    model, steps, secs = train_average_velocity(task, seed, kind, budget, batch, args)
    return {"task": task, "seed": seed, "compute": UNITS[kind] * batch * steps, "train_steps": steps, "train_s": secs, "settings": recorded_settings(label),
            "compute_ratio": UNITS[kind] * batch * steps / budget, **w2_rows(label, lambda x, k, m=model: sample_mean_flow(m, x, steps=k).x, x0, ref)}


def refresh_stale(rows: list[dict[str, Any]], args, partial: Path) -> list[dict[str, Any]]:
    """Retrain the MeanFlow / shortcut rows made with other settings than :data:`SETTINGS` or an older
    :data:`REVISION` (from the chain's budget recorded in the same task and seed), rewriting the
    partial file after each."""
    for i, r in enumerate(rows):
        if r["method"] in SETTINGS and r.get("settings", LEGACY[r["method"]]) != recorded_settings(r["method"]):
            budget = next(c["compute"] for c in rows if c["task"] == r["task"] and c["seed"] == r["seed"] and c["method"] == "2-RF + distill")
            kind = next(k for k, label in AVERAGE if label == r["method"])
            x0, ref = eval_sets(r["task"], args.n_eval, args.eval_seed)
            rows[i] = average_row(r["task"], r["seed"], kind, r["method"], budget, RECIPE["train"]["batch_size"], args, x0, ref)
            print(f"{r['task']} seed {r['seed']}: {r['method']} retrained with {SETTINGS[r['method']]}: {rows[i]['w2@1']:.3f}", flush=True)
            write_rows(partial, rows)
    return rows


def render(rows: list[dict], floors: dict[str, dict], machine: dict, args) -> str:
    out = ["# One-step generation at matched compute: reflow chain vs MeanFlow vs shortcut (2-D tasks)", "", machine_line(machine), "",
           f"W2 at 1 / 2 / 4 Euler steps (MeanFlow and shortcut: their own 1 / 2 / 4 jumps) on {args.n_eval} held-out points, mean ± sd over "
           f"the seeds counted in each row.  Compute in network passes per sample (see the script's docstring), relative to the whole reflow chain's.", "",
           "| task | method | seeds | compute / chain | W2 1 step | W2 2 steps | W2 4 steps | W2 floor |", "|---|---|---|---|---|---|---|---|"]

    def agg(vals: list[float]) -> str:
        return f"{statistics.fmean(vals):.3f}" + (f" ± {statistics.stdev(vals):.3f}" if len(vals) > 1 else "")

    for task in dict.fromkeys(r["task"] for r in rows):
        for method in dict.fromkeys(r["method"] for r in rows if r["task"] == task):
            rs = [r for r in rows if r["task"] == task and r["method"] == method]
            fl = floors.get(task)
            floor = f"{fl['w2_mean']:.3f}" if fl else "-"
            out.append(f"| {task} | {method} | {len(rs)} | {statistics.fmean(r['compute_ratio'] for r in rs):.2f} | "
                       + " | ".join(agg([r[f"w2@{k}"] for r in rs]) for k in STEPS) + f" | {floor} |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = bench_args(__doc__.split("\n\n")[0], "one_step", threads=2, formatter_class=argparse.RawDescriptionHelpFormatter,
                    threads_help="torch threads (use 1 when another job shares the 2-core machine: with 2 threads "
                    "beside two other jobs, 8gauss-moons seed 1's shortcut stage took 3549 s against seed 0's 171 s)",
                    report_only="train nothing: tabulate the finished (task, seed) rows of the partial file (the table always holds them all)")
    ap.add_argument("--tasks", default=",".join(TASKS))
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5000, help="1-RF training steps (the toy2d standard)")
    ap.add_argument("--reflow-steps", type=int, default=5000)
    ap.add_argument("--distill-steps", type=int, default=20000)
    ap.add_argument("--pairs", type=int, default=20000, help="dopri5 pairs per reflow / distillation stage")
    ap.add_argument("--n-eval", type=int, default=5000)
    ap.add_argument("--eval-seed", type=int, default=12345)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    tasks = [t for t in args.tasks.split(",") if t]
    bad = [t for t in tasks if t not in TASKS]
    if bad:
        ap.error(f"unknown task(s) {bad}; choose from {list(TASKS)}")
    partial, rows = resumable_rows(args.out, args.name)  # finished rows are kept; a fresh clone resumes from the committed ones
    done = {(r["task"], r["seed"]) for r in rows}
    if not args.report_only:
        rows = refresh_stale(rows, args, partial)
    for seed in range(args.seeds):  # every task at seed 0 first: a cut-short run still covers them all
        for task in tasks:
            if (task, seed) in done or args.report_only:
                continue
            new = run_one(task, seed, args)
            append_rows(partial, new)
            rows += new
    # the table is every finished row of the partial file: --tasks / --seeds choose what to train, so a
    # run of one task adds to the committed table instead of replacing it
    tasks = [t for t in TASKS if any(r["task"] == t for r in rows)]
    rows = sorted(rows, key=lambda r: (tasks.index(r["task"]), r["seed"]))
    floors = {t: noise_floor(t, args.n_eval, 4, args.eval_seed) for t in tasks}
    machine = machine_info()
    md = render(rows, floors, machine, args)
    js, mdp = write_results(args.out, args.name, {"machine": machine, "rows": rows, "floors": floors, "units": UNITS, "args": {k: str(v) for k, v in vars(args).items()}}, md)
    print(md)
    print(f"\nwrote {js} and {mdp}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
