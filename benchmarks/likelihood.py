"""Log-likelihood of held-out data under trained 2-D flows (issue 17): the library's solvers and
divergence estimators against a float64 dopri5 reference at rtol = atol = 1e-7 (exact divergence).

For each task with a Gaussian source (a flow from a non-Gaussian source has no known log p0, so its
likelihood is not defined: the row says so), a 1-RF is trained with the 2-D recipe (independent
coupling, ``--steps``), then ``rectflow.flow.likelihood.log_likelihood`` is evaluated on ``--n``
held-out target points with each setting.  Reported: mean NLL in nats, the mean and the largest
per-point difference from the reference, NFE (velocity evaluations per point; exact divergence adds
D = 2 backward passes to each) and seconds.  Goal: mean NLL within 0.02 of the reference.

    .venv/bin/python benchmarks/likelihood.py
"""

from __future__ import annotations

import copy
import sys
import time

import torch

from _bench import bench_args, write_results
from _machine import machine_info, machine_line
from rectflow.data import make_distribution
from rectflow.engine.trainer import TrainConfig, Trainer
from rectflow.flow.couplings import IndependentCoupling
from rectflow.flow.likelihood import log_likelihood
from rectflow.flow.losses import FlowMatchingObjective
from rectflow.models import MLPVelocity
from toy2d import RECIPE, TASKS

SETTINGS = {  # label -> keyword arguments of log_likelihood
    "dopri5 1e-5, exact": {"method": "dopri5", "rtol": 1e-5, "atol": 1e-5},
    "dopri5 1e-3, exact": {"method": "dopri5", "rtol": 1e-3, "atol": 1e-3},
    "rk4 25 steps, exact": {"method": "rk4", "steps": 25},
    "euler 100 steps, exact": {"method": "euler", "steps": 100},
    "dopri5 1e-5, Hutchinson 1 probe": {"method": "dopri5", "rtol": 1e-5, "atol": 1e-5, "estimator": "hutchinson", "probes": 1},
    "dopri5 1e-5, Hutchinson 16 probes": {"method": "dopri5", "rtol": 1e-5, "atol": 1e-5, "estimator": "hutchinson", "probes": 16},
}
GOAL = 0.02


def main(argv: list[str] | None = None) -> int:
    ap = bench_args(__doc__.split("\n\n")[0], "likelihood")
    ap.add_argument("--tasks", default=",".join(TASKS))
    ap.add_argument("--steps", type=int, default=5000, help="1-RF training steps")
    ap.add_argument("--n", type=int, default=1000, help="held-out target points")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    rows, undefined = [], []
    for task in args.tasks.split(","):
        source, target = make_distribution(TASKS[task]["source"]), make_distribution(TASKS[task]["target"])
        if not callable(getattr(source, "log_prob", None)):
            undefined.append(task)
            print(f"{task}: source {TASKS[task]['source']} has no known density; likelihood not defined", flush=True)
            continue
        torch.manual_seed(args.seed)
        cfg = TrainConfig(**{**RECIPE["train"], "steps": args.steps, "seed": args.seed, "progress": False, "log_every": 500, "ckpt_every": 10**9, "device": "cpu"})
        model = Trainer(MLPVelocity(2), FlowMatchingObjective(IndependentCoupling(source, target)), cfg).fit().eval_model.eval()
        x1 = target.sample(args.n, generator=torch.Generator().manual_seed(12345))
        t0 = time.perf_counter()
        ref = log_likelihood(copy.deepcopy(model).double(), x1.double(), source, method="dopri5", rtol=1e-7, atol=1e-7)
        ref_s = time.perf_counter() - t0
        ref_nll = -ref.log_prob
        rows.append({"task": task, "setting": "reference: float64 dopri5 1e-7, exact", "nll": float(ref_nll.mean()), "mean_diff": 0.0, "max_diff": 0.0,
                     "nfe": ref.nfe, "seconds": ref_s})
        for label, kw in SETTINGS.items():
            t0 = time.perf_counter()
            res = log_likelihood(model, x1, source, generator=torch.Generator().manual_seed(1), **kw)
            secs = time.perf_counter() - t0
            nll = -res.log_prob.double()
            rows.append({"task": task, "setting": label, "nll": float(nll.mean()), "mean_diff": float(nll.mean() - ref_nll.mean()),
                         "max_diff": float((nll - ref_nll).abs().max()), "nfe": res.nfe, "seconds": secs})
        for r in rows[-len(SETTINGS) - 1:]:
            print(r, flush=True)
    machine = machine_info()
    md = ["# Log-likelihood of held-out 2-D data: solvers and divergence estimators vs a float64 reference", "", machine_line(machine), "",
          f"1-RF per task ({args.steps} steps, 2-D recipe, independent coupling, seed {args.seed}); NLL in nats, mean over {args.n} held-out "
          f"target points; differences against the float64 dopri5 reference at rtol = atol = 1e-7 with the exact divergence.  Goal: "
          f"|mean difference| <= {GOAL}.", "",
          "| task | setting | NLL (nats) | mean diff | max per-point diff | NFE | seconds | goal |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ok = "reference" if r["setting"].startswith("reference") else ("met" if abs(r["mean_diff"]) <= GOAL else "missed")
        md.append(f"| {r['task']} | {r['setting']} | {r['nll']:.4f} | {r['mean_diff']:+.4f} | {r['max_diff']:.4f} | {r['nfe']} | {r['seconds']:.1f} | {ok} |")
    if undefined:
        md += ["", f"Not defined (the source has no known density, so log p0 and hence log p1 are unknown): {', '.join(undefined)}."]
    text = "\n".join(md)
    write_results(args.out, args.name, {"machine": machine, "rows": rows, "undefined": undefined, "goal": GOAL,
                                        "args": {k: str(v) for k, v in vars(args).items()}}, text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
