"""The K = 4 PeRFlow student on 8x8 digits against its training length (issue 15: "measure FD against
student steps, to 30k+, in the background"), one long resumable run per seed.

The setting of ``benchmarks/perflow.py`` (same cached teacher, start fraction 0.8, x0 loss space,
batch 128, lr 1e-3 with cosine decay over the whole run, EMA 0.999) with ``--solver-steps`` teacher
DDIM steps per window solve (default 24, the measured lever of perflow_levers.md and the job's
default), trained for ``--steps`` with checkpoints under ``--runs``/s<seed>-n<steps>-k<solver steps>;
at each of ``--eval-at`` the EMA student samples the 5000 evaluation noises with one step per window
and its FD (digits classifier features, as perflow.py) is appended to ``--out``/perflow_long.json
with the ratio to the teacher's 50-step DDIM FD.  A kill loses at most ``--ckpt-every`` steps: rerun
the same command.  The points of one run share its cosine schedule (FD at 10k of a 30k run is not a
10k run's FD), so the table has one block per (run length, solver steps).

Cost: the teacher's window solve dominates a step (``solver_steps`` no-grad UNet calls on the batch
against one forward + backward of the student); on one core of the 2-core dev machine a step at 24
solver steps took 0.5-0.65 s (10k steps in 84-110 min, evaluations included), so 30k steps are 4-5 h:
rerun the same command in later sessions (it resumes from the last checkpoint while ``--runs`` is
kept) or use a GPU (``--device cuda``).  ``--compile`` compiles the teacher (steps about 1.2x faster
on this CPU); a run may be resumed with or without it (rounding-level differences only).

    nohup nice .venv/bin/python benchmarks/perflow_long.py --seed 1 --steps 10000 --eval-at 3000 5000 10000 &
    .venv/bin/python benchmarks/perflow_long.py --seed 1 --device cuda            # 30k steps on a GPU
    .venv/bin/python benchmarks/perflow_long.py --report-only
"""

from __future__ import annotations

import fcntl
import json
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from _bench import bench_args, write_results
from _digits import DigitsFD, train_config
from _machine import machine_info, machine_line
from perflow import teacher_net
from rectflow import perflow
from rectflow.diffusion.schedules import DDPMSchedule
from rectflow.engine.trainer import Trainer

HERE = Path(__file__).resolve().parent
# the teacher of benchmarks/perflow.py's defaults (same cache key, so its cached weights are reused)
TEACHER = dict(teacher_steps=4000, teacher_lr=2e-3, batch=128, channels=16, parameterization="v", teacher_ema=0.999)


def run_key(r: dict) -> tuple[int, int]:
    """(run length, solver steps) of a row; rows written before those were recorded: (30000, 12)."""
    return r.get("run_steps", 30000), r.get("solver_steps", 12)


def render(res: dict) -> str:
    rows, ref = res["rows"], res["teacher_fd_50"]
    lines = ["# PeRFlow K = 4 on 8x8 digits against training length", "", machine_line(res["machine"]), "",
             "One run per seed and setting (cosine lr over the whole run, so the points of a run share one schedule); "
             f"the EMA student's 4-step FD on {res.get('n_eval', 5000)} samples (digits classifier features). Teacher 50-step DDIM FD {ref:.3f}; "
             f"goal: ratio <= 1.10 (FD <= {1.1 * ref:.3f}).  Spread: half the range over seeds."]
    for n, k in sorted({run_key(r) for r in rows}):
        block = [r for r in rows if run_key(r) == (n, k)]
        seeds = sorted({r["seed"] for r in block})
        lines += ["", f"## runs of {n} steps, {k} teacher steps per window solve", "",
                  "| student steps | " + " | ".join(f"FD seed {s}" for s in seeds) + " | mean FD | spread | mean FD / teacher |",
                  "|---:|" + "---:|" * (len(seeds) + 3)]
        for step in sorted({r["step"] for r in block}):
            at = {r["seed"]: r["fd"] for r in block if r["step"] == step}
            cells = [f"{at[s]:.3f}" if s in at else "" for s in seeds]
            mean = sum(at.values()) / len(at)
            spread = (max(at.values()) - min(at.values())) / 2
            lines.append(f"| {step} | " + " | ".join(cells) + f" | {mean:.3f} | {spread:.3f} | {mean / ref:.3f} |")
    return "\n".join(lines)


def report(out: Path) -> None:
    path = out / "perflow_long.json"
    if not path.is_file():
        print("no results yet")
        return
    res = json.loads(path.read_text())
    write_results(out, "perflow_long", res, render(res))
    print(render(res))


def main() -> None:
    ap = bench_args(__doc__.split("\n\n")[0], threads=1, report_only="write the report from the finished runs; train nothing")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--steps", type=int, default=30000)
    ap.add_argument("--eval-at", type=int, nargs="+", default=[3000, 5000, 10000, 20000, 30000])
    ap.add_argument("--ckpt-every", type=int, default=1000)
    ap.add_argument("--n-eval", type=int, default=5000)
    ap.add_argument("--solver-steps", type=int, default=24, help="teacher DDIM steps per window solve")
    ap.add_argument("--compile", action="store_true", help="torch.compile the teacher's network (window solves 0.80x the eager time, perflow_step_cost.md)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (training and sampling; FD features stay on the CPU)")
    ap.add_argument("--cache", type=Path, default=HERE.parent / ".runs" / "perflow", help="perflow.py's teacher cache")
    ap.add_argument("--runs", type=Path, default=HERE.parent / ".runs" / "perflow_long")
    ap.add_argument("--teacher-steps", type=int, default=TEACHER["teacher_steps"], help="(smoke tests: a smaller teacher)")
    args = ap.parse_args()
    if args.report_only:
        report(args.out)
        return
    torch.set_num_threads(args.threads)
    args.cache.mkdir(parents=True, exist_ok=True)
    fd = DigitsFD(args.n_eval)
    noise = torch.randn(args.n_eval, 1, 8, 8, generator=torch.Generator().manual_seed(99))  # perflow.py's evaluation noise
    net, _, _ = teacher_net(SimpleNamespace(**{**TEACHER, "teacher_steps": args.teacher_steps, "cache": args.cache}), fd.data)
    dev = torch.device(args.device)
    noise = noise.to(dev)
    teacher = perflow.Teacher(net.to(dev), DDPMSchedule(), TEACHER["parameterization"])
    with torch.no_grad():
        ref = fd(perflow.teacher_ddim_sample(teacher, noise, 50).x.cpu())
    path = args.out / "perflow_long.json"
    res = json.loads(path.read_text()) if path.is_file() else {"rows": []}
    res.update(machine=machine_info(), teacher_fd_50=ref, n_eval=args.n_eval)
    res.pop("steps", None)  # now per row (run_steps)
    key = (args.steps, args.solver_steps)
    have = {(r["seed"], r["step"]) for r in res["rows"] if run_key(r) == key}

    windows = perflow.make_windows(4)
    student = perflow.PeRFlowStudent.from_teacher(teacher, windows)
    obj = perflow.PeRFlowObjective(teacher.compiled() if args.compile else teacher, fd.data, windows, solver_steps=args.solver_steps, start_fraction=0.8, loss_space="x0")
    cfg = train_config(args.steps, TEACHER["batch"], 1e-3, args.seed, 0.999)
    cfg.ckpt_every, cfg.keep_checkpoints, cfg.device = args.ckpt_every, 2, args.device
    t0 = time.time()

    def evaluate(trainer: Trainer, step: int) -> None:
        if step not in args.eval_at or (args.seed, step) in have:
            return
        with torch.no_grad():
            x = perflow.sample_perflow(trainer.eval_model, noise, windows).x.cpu()
        trainer.model.train()
        score = fd(x)
        row = dict(seed=args.seed, step=step, run_steps=args.steps, solver_steps=args.solver_steps, device=args.device, compiled_teacher=args.compile,
                   fd=score, ratio=score / ref, wall_s_this_process=time.time() - t0)
        (args.out / "tmp").mkdir(parents=True, exist_ok=True)
        with open(args.out / "tmp" / "perflow_long.lock", "a") as lock:  # runs of other seeds append to the same file
            fcntl.flock(lock, fcntl.LOCK_EX)
            if path.is_file():
                res["rows"] = json.loads(path.read_text())["rows"]
            res["rows"].append(row)
            write_results(args.out, "perflow_long", res, render(res))
        have.add((args.seed, step))
        print(row, flush=True)

    run_dir = args.runs / f"s{args.seed}-n{args.steps}-k{args.solver_steps}"
    Trainer(student, obj, cfg, run_dir, callbacks=[evaluate]).fit(resume=True)
    report(args.out)


if __name__ == "__main__":
    main()
