"""PeRFlow vs teacher DDIM vs 2-RF (InstaFlow-style) on 8x8 digits, CPU (SPEC 5).

1. Trains a teacher: tiny UNetVelocity predicting v (default; --parameterization eps|v|x0) on DDPM's
   linear schedule (DiffusionObjective).  eps-prediction is a poor few-step teacher here: at t = 0
   alpha = 0.006, so DDIM's x-hat = (z - sigma eps-hat) / alpha amplifies eps errors ~160x (no clipping).
2. For each step count K in --steps: the teacher's DDIM with K uniform steps; a PeRFlow student with K
   uniform windows (initialised from the teacher, its output kind kept on the window path), trained
   --student-steps steps with --window-solver-steps teacher DDIM steps per window solve, sampled with one
   Euler step per window (NFE = K).
3. 2-RF at equal teacher compute: pairs (noise, teacher DDIM with --full-ode-steps steps), as many
   as PeRFlow's teacher NFE budget buys (budget / full-ode-steps), a K = 1 student (same init) trained
   the same number of steps, sampled with K uniform Euler steps.
FD is the Frechet distance in pixel space (64-D) to --n-eval real digits; "error to teacher ODE" is
E||x - x_ref||^2 (sum over pixels) to the teacher's --full-ode-steps DDIM sample from the same noise
(what an accelerator should reproduce); "cost" is teacher NFE spent
per method on training data (per example, summed).  Writes benchmarks/results/perflow.{json,md}.

    nice -n 10 python benchmarks/perflow.py [--teacher-steps 1000] [--student-steps 200] [--steps 2 4 8]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from rectflow import perflow
from rectflow.couplings import IndependentCoupling
from rectflow.data.images import ImageDataset, ImageGaussian, load_digits_images
from rectflow.image_metrics import feature_statistics, frechet_distance
from rectflow.models.unet import UNetVelocity
from rectflow.schedules import DDPMSchedule
from rectflow.training import TrainConfig, Trainer
from rectflow.weighting import DiffusionObjective

OUT = Path(__file__).parent / "results"


def pixel_fd(x: torch.Tensor, stats) -> float:
    mu, sig = feature_statistics(x.flatten(1).double())
    return float(frechet_distance(mu, sig, *stats))


def cfg(steps: int, batch: int, lr: float, seed: int) -> TrainConfig:
    return TrainConfig(steps=steps, batch_size=batch, lr=lr, ema_decay=0.0, device="cpu", progress=False,
                       ckpt_every=10**9, log_every=max(steps // 4, 1), seed=seed, grad_clip=1.0, workers=0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--teacher-steps", type=int, default=1000)
    ap.add_argument("--student-steps", type=int, default=200)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, nargs="+", default=[2, 4, 8])
    ap.add_argument("--window-solver-steps", type=int, default=4)
    ap.add_argument("--full-ode-steps", type=int, default=32)
    ap.add_argument("--n-eval", type=int, default=1000)
    ap.add_argument("--channels", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--parameterization", default="v", choices=["eps", "v", "x0"])
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t_start = time.time()

    data = ImageDataset(load_digits_images())
    real = data.sample(args.n_eval, generator=torch.Generator().manual_seed(123))
    stats = feature_statistics(real.flatten(1).double())
    floor = pixel_fd(data.sample(args.n_eval, generator=torch.Generator().manual_seed(7)), stats)
    noise = torch.randn(args.n_eval, 1, 8, 8, generator=torch.Generator().manual_seed(99))

    # 1. teacher: eps-prediction on DDPM's linear schedule
    sch = DDPMSchedule()
    torch.manual_seed(0)
    net = UNetVelocity(in_channels=1, image_size=8, channels=args.channels, channel_mult=(1, 2), num_res_blocks=1,
                       attention_resolutions=(), dropout=0.0, head_channels=16)
    coupling = IndependentCoupling(ImageGaussian((1, 8, 8)), data)
    t0 = time.time()
    obj = DiffusionObjective(coupling, sch, args.parameterization)
    Trainer(net, obj, cfg(args.teacher_steps, args.batch, 2e-3, 0)).fit(resume=False)
    net.eval()
    teacher = perflow.Teacher(net, sch, args.parameterization, time_map=sch.t_to_timestep)
    teacher_time = time.time() - t0
    print(f"teacher trained in {teacher_time:.0f}s", flush=True)

    rows = []
    with torch.no_grad():
        ref = perflow.teacher_ddim_sample(teacher, noise, args.full_ode_steps)
    def err(x: torch.Tensor) -> float:  # mean squared distance to the teacher's fine ODE solution, same noise
        return float((x - ref.x).square().flatten(1).sum(1).mean())

    rows.append(dict(method=f"teacher DDIM ({args.full_ode_steps} steps, reference)", nfe=ref.nfe,
                     fd=pixel_fd(ref.x, stats), ode_err=0.0, teacher_nfe_train=0, train_s=0.0))
    for k in args.steps:
        with torch.no_grad():
            r = perflow.teacher_ddim_sample(teacher, noise, k)
        rows.append(dict(method="teacher DDIM", nfe=r.nfe, fd=pixel_fd(r.x, stats), ode_err=err(r.x), teacher_nfe_train=0, train_s=0.0))

        # PeRFlow student with K windows
        t0 = time.time()
        windows = perflow.make_windows(k)
        student = perflow.PeRFlowStudent.from_teacher(teacher, windows)
        pobj = perflow.PeRFlowObjective(teacher, data, windows, solver_steps=args.window_solver_steps)
        Trainer(student, pobj, cfg(args.student_steps, args.batch, 2e-4, 1)).fit(resume=False)
        student.eval()
        with torch.no_grad():
            s = perflow.sample(student, noise, windows)
        budget = pobj.teacher_nfe
        rows.append(dict(method=f"PeRFlow K={k}", nfe=s.nfe, fd=pixel_fd(s.x, stats), ode_err=err(s.x), teacher_nfe_train=budget,
                         train_s=time.time() - t0))
        print(rows[-2], rows[-1], flush=True)

        # 2-RF at equal teacher compute: full-ODE pairs
        t0 = time.time()
        n_pairs = max(budget // args.full_ode_steps, 1)
        z0 = torch.randn(n_pairs, 1, 8, 8, generator=torch.Generator().manual_seed(1000 + k))
        with torch.no_grad():
            z1 = torch.cat([perflow.teacher_ddim_sample(teacher, c, args.full_ode_steps).x for c in z0.split(512)])
        one = perflow.make_windows(1)
        rf2 = perflow.PeRFlowStudent.from_teacher(teacher, one)
        Trainer(rf2, perflow.PairsObjective(z0, z1), cfg(args.student_steps, args.batch, 2e-4, 2)).fit(resume=False)
        rf2.eval()
        with torch.no_grad():
            s2 = perflow.sample(rf2, noise, one, steps_per_window=k)
        rows.append(dict(method=f"2-RF ({n_pairs} full-ODE pairs)", nfe=s2.nfe, fd=pixel_fd(s2.x, stats), ode_err=err(s2.x),
                         teacher_nfe_train=n_pairs * args.full_ode_steps, train_s=time.time() - t0))
        print(rows[-1], flush=True)

    result = dict(config=vars(args) | {"out": str(args.out)}, data_floor_fd=floor, teacher_train_s=teacher_time,
                  total_s=time.time() - t_start, rows=rows,
                  notes="pixel-space FD (64-D) to real digits; ode_err = E||x - teacher full-ODE sample||^2 from the same noise; teacher_nfe_train = teacher evaluations per example "
                        "summed over the training draws (the compute spent on the teacher)")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "perflow.json").write_text(json.dumps(result, indent=2))
    lines = ["# PeRFlow on 8x8 digits (CPU)", "",
             f"Pixel-space FD to {args.n_eval} real digits (data floor {floor:.3f}); teacher: {args.parameterization}-prediction on DDPM linear "
             f"schedule, {args.teacher_steps} steps; students: {args.student_steps} steps, batch {args.batch}; "
             f"PeRFlow window solves: {args.window_solver_steps} DDIM steps; 2-RF pairs: {args.full_ode_steps}-step DDIM. "
             f"Total {result['total_s']:.0f}s.", "",
             "| method | NFE | pixel FD | error to teacher ODE | teacher NFE spent (training) | train s |", "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['nfe']} | {r['fd']:.3f} | {r['ode_err']:.3f} | {r['teacher_nfe_train']} | {r['train_s']:.0f} |")
    (args.out / "perflow.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
