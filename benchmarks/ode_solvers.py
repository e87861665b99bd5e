"""Our ODE solvers vs torchdiffeq on the same trained velocity field (CPU or GPU).

Trains a small 1-RF (Gaussian -> moons) once, then integrates the same 5,000 source points with
rectflow.flow.solvers and torchdiffeq.odeint: wall time (median of repeats), NFE, the mean distance
E||x - x_ref|| of each to a reference (torchdiffeq dopri5 at rtol = atol = 1e-9; "err") and the largest
difference between the two results.  torchdiffeq's "rk4" is the 3/8-rule variant, ours the classic one.  Writes benchmarks/results/ode_solvers.{json,md}.

    python benchmarks/ode_solvers.py [--steps 1500] [--n 5000] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from rectflow import FlowMatchingObjective, IndependentCoupling, MLPVelocity, TrainConfig, Trainer, solve
from rectflow.data import make_distribution
from rectflow.runs.evaluation import format_table
from rectflow.runs.machine import describe, machine_info


def timed(fn, repeats: int):
    out, times = None, []
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return out, 1e3 * statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=1500, help="training steps of the 1-RF")
    ap.add_argument("--n", type=int, default=5000, help="points integrated")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args()

    src, tgt = make_distribution("gaussian"), make_distribution("moons")
    model = MLPVelocity(2)
    trainer = Trainer(model, FlowMatchingObjective(IndependentCoupling(src, tgt)), TrainConfig(steps=args.steps, progress=False))
    net = trainer.fit().eval_model
    x0 = src.sample(args.n, generator=torch.Generator().manual_seed(0))
    counter = {"n": 0}

    def f(x, t):
        counter["n"] += 1
        return net(x, t)

    try:
        import torchdiffeq
    except ImportError:
        torchdiffeq = None

    rows = []
    with torch.no_grad():
        # reference for both: a tight dopri5 (torchdiffeq's when installed, so it is not our own solver judging itself)
        if torchdiffeq is not None:
            ref = torchdiffeq.odeint(lambda t, x: net(x, t.expand(x.shape[0])), x0, torch.tensor([0.0, 1.0]), method="dopri5", rtol=1e-9, atol=1e-9)[-1]
        else:
            ref = solve(net, x0, method="dopri5", rtol=1e-9, atol=1e-9).x
        err = lambda x: float((x - ref).norm(dim=1).mean())  # noqa: E731
        for label, kw in [("dopri5 rtol=atol=1e-5", dict(method="dopri5", rtol=1e-5, atol=1e-5)), ("dopri5 rtol=atol=1e-3", dict(method="dopri5", rtol=1e-3, atol=1e-3)),
                          ("euler 100 steps", dict(method="euler", steps=100)), ("rk4 25 steps", dict(method="rk4", steps=25))]:
            ours, ms = timed(lambda: solve(f, x0, **kw), args.repeats)
            row = {"solver": label, "rectflow ms": ms, "rectflow NFE": ours.nfe, "rectflow err": err(ours.x)}
            if torchdiffeq is not None:
                t_span = torch.tensor([0.0, 1.0])
                tkw = {"rtol": kw["rtol"], "atol": kw["atol"]} if kw["method"] == "dopri5" else {"options": {"step_size": 1.0 / kw["steps"]}}
                fv = lambda t, x: f(x, t.expand(x.shape[0]))
                counter["n"] = 0
                theirs, tms = timed(lambda: torchdiffeq.odeint(fv, x0, t_span, method=kw["method"], **tkw)[-1], args.repeats)
                row.update({"torchdiffeq ms": tms, "torchdiffeq NFE": counter["n"] // args.repeats, "torchdiffeq err": err(theirs),
                            "max |diff|": float((theirs - ours.x).abs().max())})
            rows.append(row)

    machine = machine_info()
    table = format_table(rows)
    print(f"machine: {describe(machine)}\n\n{table}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "ode_solvers.json").write_text(json.dumps({"machine": machine, "args": vars(args), "rows": rows}, indent=2))
    (out / "ode_solvers.md").write_text(f"# ODE solvers: rectflow vs torchdiffeq\n\nMachine: {describe(machine)}\n\n{table}\n")


if __name__ == "__main__":
    main()
