"""The K = 4 PeRFlow student on 8x8 digits against its training length (issue 15: "measure FD against
student steps, to 30k+, in the background"), one long resumable run per seed.

The setting of ``benchmarks/perflow.py`` (same cached teacher, 12 teacher DDIM steps per window solve,
start fraction 0.8, x0 loss space, batch 128, lr 1e-3 with cosine decay over the whole run, EMA
0.999), trained for ``--steps`` with checkpoints under ``--runs``/s<seed>; at each of ``--eval-at``
the EMA student samples the 5000 evaluation noises with one step per window and its FD (digits
classifier features, as perflow.py) is appended to ``--out``/perflow_long.json with the ratio to the
teacher's 50-step DDIM FD.  A kill loses at most ``--ckpt-every`` steps: rerun the same command.
The points of one run share its cosine schedule (FD at 10k of a 30k run is not a 10k run's FD).

    nohup nice .venv/bin/python benchmarks/perflow_long.py --seed 1 &     # 30k steps: ~2-3 h on one core
    .venv/bin/python benchmarks/perflow_long.py --report-only
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _digits import DigitsFD, train_config  # noqa: E402
from _machine import machine_info, machine_line, write_results  # noqa: E402
from perflow import teacher_net  # noqa: E402

from rectflow import perflow  # noqa: E402
from rectflow.diffusion.schedules import DDPMSchedule  # noqa: E402
from rectflow.engine.trainer import Trainer  # noqa: E402

HERE = Path(__file__).resolve().parent
# the teacher of benchmarks/perflow.py's defaults (same cache key, so its cached weights are reused)
TEACHER = dict(teacher_steps=4000, teacher_lr=2e-3, batch=128, channels=16, parameterization="v", teacher_ema=0.999)


def render(res: dict) -> str:
    rows, ref = res["rows"], res["teacher_fd_50"]
    seeds = sorted({r["seed"] for r in rows})
    lines = ["# PeRFlow K = 4 on 8x8 digits against training length", "", machine_line(res["machine"]), "",
             f"One run per seed of {res['steps']} student steps (cosine lr over the whole run, so the points of a run share one schedule); "
             f"the EMA student's 4-step FD on {res.get('n_eval', 5000)} samples (digits classifier features). Teacher 50-step DDIM FD {ref:.3f}; "
             f"goal: ratio <= 1.10 (FD <= {1.1 * ref:.3f}).", "",
             "| student steps | " + " | ".join(f"FD seed {s}" for s in seeds) + " | mean FD / teacher |", "|---:|" + "---:|" * (len(seeds) + 1)]
    for step in sorted({r["step"] for r in rows}):
        at = {r["seed"]: r for r in rows if r["step"] == step}
        cells = [f"{at[s]['fd']:.3f}" if s in at else "" for s in seeds]
        lines.append(f"| {step} | " + " | ".join(cells) + f" | {sum(r['fd'] for r in at.values()) / len(at) / ref:.3f} |")
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
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--steps", type=int, default=30000)
    ap.add_argument("--eval-at", type=int, nargs="+", default=[3000, 5000, 10000, 20000, 30000])
    ap.add_argument("--ckpt-every", type=int, default=1000)
    ap.add_argument("--n-eval", type=int, default=5000)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--cache", type=Path, default=HERE.parent / ".runs" / "perflow", help="perflow.py's teacher cache")
    ap.add_argument("--runs", type=Path, default=HERE.parent / ".runs" / "perflow_long")
    ap.add_argument("--out", type=Path, default=HERE / "results")
    ap.add_argument("--teacher-steps", type=int, default=TEACHER["teacher_steps"], help="(smoke tests: a smaller teacher)")
    ap.add_argument("--report-only", action="store_true")
    args = ap.parse_args()
    if args.report_only:
        report(args.out)
        return
    torch.set_num_threads(args.threads)
    args.cache.mkdir(parents=True, exist_ok=True)
    fd = DigitsFD(args.n_eval)
    noise = torch.randn(args.n_eval, 1, 8, 8, generator=torch.Generator().manual_seed(99))  # perflow.py's evaluation noise
    net, _, _ = teacher_net(SimpleNamespace(**{**TEACHER, "teacher_steps": args.teacher_steps, "cache": args.cache}), fd.data)
    teacher = perflow.Teacher(net, DDPMSchedule(), TEACHER["parameterization"])
    with torch.no_grad():
        ref = fd(perflow.teacher_ddim_sample(teacher, noise, 50).x)
    path = args.out / "perflow_long.json"
    res = json.loads(path.read_text()) if path.is_file() else {"rows": []}
    res.update(machine=machine_info(), steps=args.steps, teacher_fd_50=ref, n_eval=args.n_eval)
    have = {(r["seed"], r["step"]) for r in res["rows"]}

    windows = perflow.make_windows(4)
    student = perflow.PeRFlowStudent.from_teacher(teacher, windows)
    obj = perflow.PeRFlowObjective(teacher, fd.data, windows, solver_steps=12, start_fraction=0.8, loss_space="x0")
    cfg = train_config(args.steps, TEACHER["batch"], 1e-3, args.seed, 0.999)
    cfg.ckpt_every, cfg.keep_checkpoints = args.ckpt_every, 2
    t0 = time.time()

    def evaluate(trainer: Trainer, step: int) -> None:
        if step not in args.eval_at or (args.seed, step) in have:
            return
        with torch.no_grad():
            x = perflow.sample_perflow(trainer.eval_model, noise, windows).x
        trainer.model.train()
        row = dict(seed=args.seed, step=step, fd=fd(x), ratio=fd(x) / ref, wall_s_this_process=time.time() - t0)
        res["rows"].append(row)
        have.add((args.seed, step))
        write_results(args.out, "perflow_long", res, render(res))
        print(row, flush=True)

    Trainer(student, obj, cfg, args.runs / f"s{args.seed}", callbacks=[evaluate]).fit(resume=True)
    report(args.out)


if __name__ == "__main__":
    main()
