"""What one PeRFlow training step costs against the teacher's per-window solve steps (8x8 digits UNet,
K = 4, batch 128, one CPU thread): the teacher's window solve (``PeRFlowObjective.draw``, no
gradients) and the student's update (loss, backward, Adam step) timed separately, interleaved over
``--rounds`` rounds so every setting sees the same machine load; the table gives medians and each
setting's step time relative to 12 solver steps.  Solver steps 0 is the teacher-free objective
(``target="data"``): the draw without a network call.  ``--compile`` adds arms at ``--compile-steps``
solver steps whose teacher is ``torch.compile``d in each named mode (compile time reported apart).

    .venv/bin/python benchmarks/perflow_step_cost.py            # about 2 minutes
"""

from __future__ import annotations

import statistics
import time

import torch

from _bench import bench_args, write_results
from _digits import make_unet
from _machine import LoadMeter, machine_info, machine_line
from rectflow import perflow
from rectflow.data.image_sets import ImageDataset, load_digits_images
from rectflow.diffusion.schedules import DDPMSchedule


def main() -> None:
    ap = bench_args(__doc__.split("\n\n")[0])
    ap.add_argument("--solver-steps", type=int, nargs="+", default=[0, 4, 12, 24])
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps-per-round", type=int, default=10)
    ap.add_argument("--compile", nargs="*", default=["default", "max-autotune-no-cudagraphs"],
                    help="torch.compile modes of the teacher to add as arms (none: no compiled arm)")
    ap.add_argument("--compile-steps", type=int, default=24, help="solver steps of the compiled arms")
    args = ap.parse_args()
    torch.set_num_threads(1)
    data = ImageDataset(load_digits_images())
    teacher = perflow.Teacher(make_unet(16).eval(), DDPMSchedule(), "v")  # untrained: the cost does not depend on the weights
    windows = perflow.make_windows(4)
    student = perflow.PeRFlowStudent.from_teacher(teacher, windows)
    opt = torch.optim.Adam(student.parameters(), lr=1e-4)
    objs = {(k, "eager"): perflow.PeRFlowObjective(teacher, data, windows, solver_steps=max(k, 1), start_fraction=0.8, loss_space="x0",
                                                   target="data" if k == 0 else "teacher") for k in args.solver_steps}
    gen = torch.Generator().manual_seed(0)
    compile_s = {}
    for mode in [m for m in args.compile if m != "none"]:
        fast = perflow.Teacher(torch.compile(teacher.model, mode=None if mode == "default" else mode, dynamic=False), DDPMSchedule(), "v")
        objs[(args.compile_steps, mode)] = obj = perflow.PeRFlowObjective(fast, data, windows, solver_steps=args.compile_steps, start_fraction=0.8, loss_space="x0")
        t0 = time.perf_counter()
        obj.draw(args.batch, gen, "cpu")  # compiles
        compile_s[mode] = time.perf_counter() - t0
    times: dict[tuple[int, str], dict[str, list[float]]] = {k: {"draw": [], "update": []} for k in objs}
    meter = LoadMeter()
    with meter:
        for _ in range(args.rounds):
            for k, obj in objs.items():
                draw = update = 0.0
                for _ in range(args.steps_per_round):
                    t0 = time.perf_counter()
                    batch = obj.draw(args.batch, gen, "cpu")
                    t1 = time.perf_counter()
                    opt.zero_grad(set_to_none=True)
                    obj.loss(student, batch).loss.backward()
                    opt.step()
                    t2 = time.perf_counter()
                    draw, update = draw + t1 - t0, update + t2 - t1
                times[k]["draw"].append(1e3 * draw / args.steps_per_round)
                times[k]["update"].append(1e3 * update / args.steps_per_round)
    rows = [dict(solver_steps=k, teacher=mode, compile_s=compile_s.get(mode), draw_ms=statistics.median(v["draw"]),
                 update_ms=statistics.median(v["update"])) for (k, mode), v in times.items()]
    ref = next((r["draw_ms"] + r["update_ms"] for r in rows if (r["solver_steps"], r["teacher"]) == (12, "eager")), None)
    for r in rows:
        r["step_ms"] = r["draw_ms"] + r["update_ms"]
        r["vs_12"] = r["step_ms"] / ref if ref else None
    machine = machine_info()
    lines = ["# One PeRFlow training step against the teacher's per-window solve steps (8x8 digits, K = 4)", "", machine_line(machine), "",
             f"Batch {args.batch}, one thread, medians over {args.rounds} interleaved rounds of {args.steps_per_round} steps; "
             f"other processes used {'n/a' if meter.foreign_cores is None else f'{meter.foreign_cores:.1f}'} cores on average meanwhile "
             "(ratios within this run are the result, not the milliseconds).", "",
             "Teacher \"eager\": the plain module; otherwise `torch.compile(teacher, mode=..., dynamic=False)` (its one-off compile time in brackets).", "",
             "| solver steps per window | teacher | teacher solve ms | student update ms | step ms | step / step at 12 |", "|---:|---|---:|---:|---:|---:|"]
    for r in rows:
        vs = f"{r['vs_12']:.2f}" if r["vs_12"] else "-"
        how = r["teacher"] if r["compile_s"] is None else f"{r['teacher']} ({r['compile_s']:.0f} s)"
        lines.append(f"| {r['solver_steps'] or '0 (no teacher)'} | {how} | {r['draw_ms']:.0f} | {r['update_ms']:.0f} | {r['step_ms']:.0f} | {vs} |")
    md = "\n".join(lines)
    write_results(args.out, "perflow_step_cost", {"machine": machine, "rows": rows, "foreign_cores": meter.foreign_cores,
                                                  "args": {k: str(v) for k, v in vars(args).items()}}, md)
    print(md)


if __name__ == "__main__":
    main()
