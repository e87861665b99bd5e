"""MeanFlow's training options on one 2-D task (a screen, one seed): the adaptive loss weighting
power p, the share of rows with s = t, and the learning rate, each run the toy2d recipe otherwise.

One-step (and 2- and 4-jump) W2 on 2000 held-out points of N(0, I) -> 8 Gaussians after 3000 steps of
the 3x256 :class:`~rectflow.models.MLPAverageVelocity`.  Settings are ``name:equal_fraction:lr:p``.
``--task digits``: the 8x8 digits with the two-time 16-channel UNet of one_step_digits.py (batch 128,
its training config) and the classifier-feature FD on 2000 samples instead of W2.

    .venv/bin/python benchmarks/meanflow_screen.py
    .venv/bin/python benchmarks/meanflow_screen.py --task digits --steps 2000 --settings p1:0.25:0.002:1,p0:0.25:0.002:0 --name meanflow_screen_digits
"""

from __future__ import annotations

import sys
import time

import torch

from _bench import bench_args, write_results
from _digits import DigitsFD, make_unet, train_config
from _machine import machine_info, machine_line
from rectflow.data import make_distribution
from rectflow.engine.trainer import TrainConfig, Trainer
from rectflow.flow.couplings import IndependentCoupling
from rectflow.flow.meanflow import MeanFlowObjective, sample_mean_flow
from rectflow.flow.metrics import wasserstein2
from rectflow.models import MLPAverageVelocity
from toy2d import RECIPE, TASKS

DEFAULT = "paper-p1:0.25:0.005:1,p0.5:0.25:0.005:0.5,p0:0.25:0.005:0,p0-equal50:0.5:0.005:0,p1-lr1e-3:0.25:0.001:1,p0-lr1e-3:0.25:0.001:0"


def main(argv: list[str] | None = None) -> int:
    ap = bench_args(__doc__.split("\n\n")[0], "meanflow_screen")
    ap.add_argument("--task", default="gauss-8gauss")
    ap.add_argument("--settings", default=DEFAULT)
    ap.add_argument("--steps", type=int, default=3000)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(12345)
    if args.task == "digits":
        fd = DigitsFD(2000)
        src, tgt = fd.source, fd.data
        x0 = src.sample(2000, generator=g)
        metric, what = (lambda x: fd(x)), "FD (classifier features, floor %.3f) on 2000 samples" % fd.floor
        new_model = lambda: make_unet(16, average=True)  # noqa: E731
        new_cfg = lambda lr: train_config(args.steps, 128, lr, 0)  # noqa: E731
    else:
        src, tgt = make_distribution(TASKS[args.task]["source"]), make_distribution(TASKS[args.task]["target"])
        x0, ref = src.sample(2000, generator=g), tgt.sample(2000, generator=g)
        metric, what = (lambda x: wasserstein2(x, ref)), "W2 on 2000 held-out points"
        new_model = lambda: MLPAverageVelocity(2)  # noqa: E731
        new_cfg = lambda lr: TrainConfig(**{**RECIPE["train"], "lr": lr, "steps": args.steps, "seed": 0, "progress": False,  # noqa: E731
                                            "log_every": 500, "ckpt_every": 10**9, "device": "cpu"})
    rows = []
    for item in args.settings.split(","):
        name, ef, lr, p = item.split(":")
        torch.manual_seed(0)
        cfg = new_cfg(float(lr))
        t0 = time.perf_counter()
        objective = MeanFlowObjective(IndependentCoupling(src, tgt), equal_fraction=float(ef), adaptive_power=float(p))
        model = Trainer(new_model(), objective, cfg).fit().eval_model
        w2 = [metric(sample_mean_flow(model, x0, steps=k).x) for k in (1, 2, 4)]
        rows.append({"name": name, "equal_fraction": float(ef), "lr": float(lr), "p": float(p), "w2@1": w2[0], "w2@2": w2[1], "w2@4": w2[2],
                     "train_s": time.perf_counter() - t0})
        print(rows[-1], flush=True)
    machine = machine_info()
    md = ["# MeanFlow training options (screen, one seed)", "", machine_line(machine), "",
          (f"digits, {args.steps} steps of the two-time 16-channel UNet (batch 128, cosine lr, EMA 0.999)" if args.task == "digits" else
           f"{args.task}, {args.steps} steps of the 3x256 MLPAverageVelocity, toy2d recipe otherwise (cosine lr, warmup 200, EMA 0.999, batch 256)")
          + f"; {what} after 1 / 2 / 4 jumps (columns named w2 in the JSON).", "",
          "| setting | s = t share | lr | adaptive p | 1 jump | 2 jumps | 4 jumps |", "|---|---|---|---|---|---|---|"]
    md += [f"| {r['name']} | {r['equal_fraction']} | {r['lr']} | {r['p']} | {r['w2@1']:.3f} | {r['w2@2']:.3f} | {r['w2@4']:.3f} |" for r in rows]
    text = "\n".join(md)
    write_results(args.out, args.name, {"machine": machine, "rows": rows, "args": {k: str(v) for k, v in vars(args).items()}}, text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
