"""Why MLPVelocity makes dopri5 expensive (issue 16, item 6): dopri5 NFE per pair, pairs/s and W2 of the
3x256 MLP with its time features at different top frequencies, and of a plain [x, t] MLP, trained
identically (the toy2d recipe) on 2-D tasks.

``SinusoidalTimeEmbedding`` multiplies t in [0, 1] by ``scale`` (1000, as diffusion models do for
integer steps), so its fastest feature turns 1000 radians over the unit interval; a velocity field
built on it can wiggle in t, and an adaptive solver pays for every wiggle.

    .venv/bin/python benchmarks/mlp_time_features.py --tasks gauss-moons,gauss-8gauss --steps 3000

Rows are appended to ``results/tmp/<name>_partial.jsonl`` as they finish; a rerun with the same
arguments skips them (resumable after a kill).
"""

from __future__ import annotations

import statistics
import sys
import time

import torch
from torch import Tensor, nn

from _bench import append_rows, bench_args, resumable_rows, write_results
from _machine import machine_info, machine_line
from rectflow.data import make_distribution
from rectflow.engine.trainer import TrainConfig, Trainer
from rectflow.flow.couplings import IndependentCoupling
from rectflow.flow.losses import FlowMatchingObjective
from rectflow.flow.metrics import wasserstein2
from rectflow.flow.sampling import sample_model
from rectflow.models import MLPVelocity
from toy2d import RECIPE, TASKS


class PlainMLP(nn.Module):
    """v(x, t) = MLP([x, t]): the time as one raw input."""

    def __init__(self, dim: int = 2, width: int = 256, depth: int = 3) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Linear(dim + 1, width), nn.SiLU()]
        for _ in range(depth - 1):
            layers += [nn.Linear(width, width), nn.SiLU()]
        self.net = nn.Sequential(*layers, nn.Linear(width, dim))

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        return self.net(torch.cat([x, t.reshape(-1, 1).to(x.dtype)], dim=1))


def make(kind: str) -> nn.Module:
    if kind == "plain":
        return PlainMLP()
    return MLPVelocity(2, time_scale=float(kind.split("=")[1]))


def main(argv: list[str] | None = None) -> int:
    ap = bench_args(__doc__.split("\n\n")[0], "mlp_time_features")
    ap.add_argument("--tasks", default="gauss-moons,gauss-8gauss")
    ap.add_argument("--models", default="scale=1000,scale=100,scale=10,plain", help="time-feature scales of MLPVelocity, and the plain [x, t] MLP")
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--seeds", default="0", help="training seeds, comma-separated (the evaluation points are the same for all)")
    ap.add_argument("--pairs", type=int, default=2000, help="dopri5 solves (rtol = atol = 1e-5) per model")
    ap.add_argument("--note", default="", help="a paragraph added under the tables (e.g. what else ran on the machine)")
    args = ap.parse_args(argv)
    partial, rows = resumable_rows(args.out, args.name, from_committed=False)
    done = {(r["task"], r["model"], r.get("seed", 0), r.get("steps")) for r in rows}
    seeds = [int(s) for s in args.seeds.split(",")]
    for task in args.tasks.split(","):
        src, tgt = make_distribution(TASKS[task]["source"]), make_distribution(TASKS[task]["target"])
        g = torch.Generator().manual_seed(12345)
        x0, ref = src.sample(args.pairs, generator=g), tgt.sample(args.pairs, generator=g)
        for kind, seed in [(k, sd) for sd in seeds for k in args.models.split(",")]:
            if (task, kind, seed, args.steps) in done:
                continue
            torch.manual_seed(seed)
            model = make(kind)
            cfg = TrainConfig(**{**RECIPE["train"], "steps": args.steps, "seed": seed, "progress": False, "log_every": 500, "ckpt_every": 10**9, "device": "cpu"})
            t0 = time.perf_counter()
            tr = Trainer(model, FlowMatchingObjective(IndependentCoupling(src, tgt)), cfg).fit()
            train_s = time.perf_counter() - t0
            m = tr.eval_model
            with torch.no_grad():
                t0 = time.perf_counter()
                res = sample_model(m, x0, method="dopri5", rtol=1e-5, atol=1e-5)
                secs = time.perf_counter() - t0
                e100 = sample_model(m, x0, method="euler", steps=100).x
            row = {"task": task, "model": kind, "seed": seed, "steps": args.steps, "dopri5_nfe": res.nfe, "pairs_per_s": args.pairs / secs, "w2_dopri5": wasserstein2(res.x, ref),
                   "w2_euler100": wasserstein2(e100, ref), "train_s": train_s}
            rows.append(row)
            append_rows(partial, [row])
            print(row, flush=True)
    rows = [r for r in rows if r.get("steps") == args.steps and r.get("seed", 0) in seeds and r["task"] in args.tasks.split(",")]
    machine = machine_info()
    md = ["# dopri5 cost of the MLP's time features", "", machine_line(machine), "",
          f"{args.steps} training steps (toy2d recipe, independent coupling, seeds {args.seeds}); {args.pairs} dopri5 solves at rtol = atol = 1e-5 in one batch; "
          f"W2 against {args.pairs} fresh target points.", "",
          "| task | model | dopri5 NFE | pairs/s | W2 dopri5 | W2 Euler 100 |", "|---|---|---|---|---|---|"]
    md += [f"| {r['task']} | {r['model']} | {r['dopri5_nfe']} | {r['pairs_per_s']:.0f} | {r['w2_dopri5']:.3f} | {r['w2_euler100']:.3f} |" for r in rows]
    if len(seeds) > 1:
        md += ["", f"Mean ± standard deviation over the {len(seeds)} seeds:", "",
               "| task | model | dopri5 NFE | pairs/s | W2 dopri5 | W2 Euler 100 |", "|---|---|---|---|---|---|"]
        groups: dict[tuple[str, str], list[dict]] = {}
        for r in rows:
            groups.setdefault((r["task"], r["model"]), []).append(r)

        def ms(rs: list[dict], key: str, fmt: str) -> str:
            v = [r[key] for r in rs]
            return f"{statistics.fmean(v):{fmt}} ± {statistics.stdev(v):{fmt}}" if len(v) > 1 else f"{v[0]:{fmt}}"

        md += [f"| {t} | {k} | {ms(rs, 'dopri5_nfe', '.0f')} | {ms(rs, 'pairs_per_s', '.0f')} | {ms(rs, 'w2_dopri5', '.3f')} | {ms(rs, 'w2_euler100', '.3f')} |"
               for (t, k), rs in groups.items()]
    if args.note:
        md += ["", args.note]
    text = "\n".join(md)
    write_results(args.out, args.name, {"machine": machine, "rows": rows, "args": {k: str(v) for k, v in vars(args).items()}}, text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
