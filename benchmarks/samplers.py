"""W2 vs NFE of deterministic and stochastic samplers on one trained 2-D flow model (theory §3, 6).

For each task, trains one 1-RF velocity field (Gaussian -> task, MLPVelocity, FlowMatchingObjective),
then samples the same 5,000 source points with Euler / Heun / dopri5 (rectflow.flow.solvers) and
DDIM / DDPM / churn / flow SDE at several noise levels (rectflow.diffusion.samplers, the velocity model read
on the flow-matching schedule), and reports the exact W2 to 5,000 held-out data points.  The
"data floor" row is the W2 between two held-out data sets of that size (the best any sampler can
show).  On this schedule DDIM is the flow's Euler sampler, so those two rows agree (theory §6).
Writes benchmarks/results/samplers.{json,md}.

    python benchmarks/samplers.py [--tasks 8gaussians moons] [--train-steps 2000] [--nfe 4 16 64]
                                  [--noise-levels 0.5 1 2] [--n-eval 5000]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Callable

import torch

from rectflow import FlowMatchingObjective, IndependentCoupling, MLPVelocity, TrainConfig, Trainer, solve, wasserstein2
from rectflow.data import Gaussian, make_distribution
from rectflow.diffusion.samplers import churn, ddim, ddpm, flow_sde, sigma_noise_level
from rectflow.diffusion.schedules import FlowMatchingSchedule
from rectflow.flow.solvers import SolveResult, time_grid
from rectflow.runs.machine import describe, machine_info

PATH = FlowMatchingSchedule()  # the 1-RF straight line as a diffusion schedule: alpha_s = 1 - s, sigma_s = s


def samplers(nfes: list[int], noise_levels: list[float], tolerances: list[float], seed: int):
    """(name, noise level or None, nominal NFE, run(model, x0) -> SolveResult) for every cell of the table."""
    gen = lambda: torch.Generator().manual_seed(seed + 17)  # noqa: E731 - every stochastic run draws the same noise
    cells: list[tuple[str, float | None, int, Callable]] = []
    for n in nfes:
        cells.append(("euler", None, n, lambda m, x, n=n: solve(m, x, method="euler", steps=n)))
        if n % 2 == 0:
            cells.append(("heun", None, n, lambda m, x, n=n: solve(m, x, method="heun", steps=n // 2)))
        cells.append(("ddim", None, n, lambda m, x, n=n: ddim(m, x, time_grid(n), path=PATH, parameterization="velocity")))
        cells.append(("ddpm", None, n, lambda m, x, n=n: ddpm(m, x, time_grid(n), path=PATH, generator=gen())))
        cells.append(("churn 0.5", None, n, lambda m, x, n=n: churn(m, x, time_grid(n), path=PATH, churn=0.5, generator=gen())))
        for c in noise_levels:
            cells.append(("sde", c, n, lambda m, x, n=n, c=c: flow_sde(m, x, time_grid(n), path=PATH,
                                                                         noise_level=sigma_noise_level(PATH, c), generator=gen())))
    for tol in tolerances:
        cells.append((f"dopri5 tol={tol:g}", None, 0, lambda m, x, tol=tol: solve(m, x, method="dopri5", rtol=tol, atol=tol)))
    return cells


def run_task(task: str, args) -> dict:
    torch.manual_seed(args.seed)
    data = make_distribution(task)
    model = MLPVelocity(2, width=args.width, depth=args.depth)
    cfg = TrainConfig(steps=args.train_steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed, progress=False, device=args.device)
    t = time.perf_counter()
    trainer = Trainer(model, FlowMatchingObjective(IndependentCoupling(Gaussian(2), data)), cfg).fit()
    train_s = time.perf_counter() - t
    net = trainer.eval_model.cpu()
    held_out = data.sample(args.n_eval, generator=torch.Generator().manual_seed(args.seed + 1001))
    floor = wasserstein2(data.sample(args.n_eval, generator=torch.Generator().manual_seed(args.seed + 1002)), held_out)
    x0 = torch.randn(args.n_eval, 2, generator=torch.Generator().manual_seed(args.seed + 1003))
    rows = []
    with torch.no_grad():
        for name, noise, nominal, fn in samplers(args.nfe, args.noise_levels, args.tolerances, args.seed):
            t = time.perf_counter()
            out: SolveResult = fn(net, x0)
            sample_s = time.perf_counter() - t
            rows.append({"sampler": name, "noise_level": noise, "nfe": out.nfe, "w2": wasserstein2(out.x, held_out),
                         "sample_seconds": sample_s})
            label = name + (f" (e={noise:g} sigma)" if noise is not None else "")
            print(f"  {task:>10s}  {label:<22s} NFE {out.nfe:4d}  W2 {rows[-1]['w2']:.4f}", flush=True)
    return {"task": task, "train_seconds": train_s, "data_floor_w2": floor, "rows": rows}


def markdown(results: list[dict], nfes: list[int]) -> str:
    lines = []
    for res in results:
        lines += [f"### {res['task']}  (W2 to held-out data; data floor {res['data_floor_w2']:.4f})", ""]
        lines += ["| sampler | " + " | ".join(f"NFE {n}" for n in nfes) + " |", "|---|" + "---|" * len(nfes)]
        table: dict[str, dict[int, float]] = {}
        adaptive = []
        for r in res["rows"]:
            if r["sampler"].startswith("dopri5"):
                adaptive.append(f"{r['sampler']}: W2 {r['w2']:.4f} at NFE {r['nfe']}")
                continue
            label = r["sampler"] + (f", noise e(t) = {r['noise_level']:g} sigma(t)" if r["noise_level"] is not None else "")
            table.setdefault(label, {})[r["nfe"]] = r["w2"]
        for label, cells in table.items():
            lines.append(f"| {label} | " + " | ".join(f"{cells[n]:.4f}" if n in cells else "-" for n in nfes) + " |")
        lines += ["", "Adaptive: " + "; ".join(adaptive) + ".", ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", nargs="+", default=["8gaussians", "moons"])
    ap.add_argument("--train-steps", type=int, default=2000)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--depth", type=int, default=3)
    ap.add_argument("--nfe", type=int, nargs="+", default=[4, 16, 64])
    ap.add_argument("--noise-levels", type=float, nargs="+", default=[0.5, 1.0, 2.0],
                    help="flow-SDE noise levels c of e(t) = c sigma(t)")
    ap.add_argument("--tolerances", type=float, nargs="+", default=[1e-2, 1e-4], help="dopri5 rtol = atol values")
    ap.add_argument("--n-eval", type=int, default=5000, help="generated and held-out points for W2")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args()

    t0 = time.perf_counter()
    results = [run_task(task, args) for task in args.tasks]
    machine = machine_info()
    md = (f"# Samplers: W2 vs NFE from one trained flow model\n\nMachine: {describe(machine)}. "
          f"Training: {args.train_steps} steps, batch {args.batch_size}, MLP {args.depth}x{args.width}; "
          f"W2 on {args.n_eval} vs {args.n_eval} points; total {time.perf_counter() - t0:.0f} s.\n\n"
          + markdown(results, args.nfe))
    print("\n" + md)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "samplers.json").write_text(json.dumps({"machine": machine, "args": vars(args), "results": results}, indent=1) + "\n")
    (out / "samplers.md").write_text(md + "\n")


if __name__ == "__main__":
    main()
