"""Classifier-free guidance inside PeRFlow on class-conditional 8x8 digits, CPU (theory §5.5, issue 15).

Two ways to get a guided K-step student from a conditional teacher:

(a) "teacher": guidance baked into the teacher's window solve at scale w (2 network evaluations per
    solver step); the student is trained without condition dropout and sampled at w = 1: K NFE.
(b) "student": the teacher solves at w = 1 on conditions dropped with probability --p-uncond; one
    student per seed, sampled with CFG at every w: 2K NFE (K at w = 1).

1. Teacher: a class-conditional rectified-flow UNet (model.num_classes 10, label dropout 0.1)
   trained with rectflow.runs.experiment.train_run on the digits; a velocity on
   FlowMatchingSchedule (our straight path) as the PeRFlow teacher.  Cached in --cache.
2. Reference at each w: the teacher's own --ref-steps-step guided Euler (= DDIM on this path) from
   fixed noise, labels 0..9 in turn; baselines: the teacher's guided Euler at the students' NFE.
3. Students: K = --windows uniform windows, initialised from the teacher, --student-steps steps,
   --solver-steps teacher steps per window solve; seeds --seeds.
Metrics (samples clipped to [-1, 1]): FD to real digits and FD to the teacher's reference samples
at the same w, both in the 128-D features of a classifier trained on the digits; class accuracy
(that classifier's argmax = the requested label); E||x - x_ref||^2 to the reference from the same
noise and label.  Mean and half range over seeds.  Rows are appended to
results/tmp/perflow_guidance_partial.jsonl as they are measured and skipped when the script is run
again with the same settings; writes results/perflow_guidance.{json,md}.

    nice python benchmarks/perflow_guidance.py                    # <= 25 min on one CPU thread
    nice python benchmarks/perflow_guidance.py --smoke            # a minute: the plumbing only
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from pathlib import Path

import torch

from _bench import append_rows, bench_args, resumable_rows, write_results
from _machine import machine_info, machine_line
from rectflow import perflow
from rectflow.data.image_sets import ImageDataset, load_digits_images
from rectflow.diffusion.schedules import FlowMatchingSchedule
from rectflow.engine.io import load_tensors, save_tensors
from rectflow.engine.trainer import TrainConfig, Trainer
from rectflow.images.classifier_features import train_classifier_features
from rectflow.images.quality import extract_features, feature_statistics, frechet_distance
from rectflow.perflow.guidance_modes import LabelledData
from rectflow.runs.config import config_from_dict
from rectflow.runs.experiment import load_run, train_run

NAME = "perflow_guidance"
TEACHER_STEPS = (4, 8, 16, 50)  # the guided teacher baselines the issue names, besides the students' NFE


def teacher_run(args) -> Path:
    """Train (or find) the class-conditional teacher run; train_run resumes a finished run as a no-op."""
    cfg = {
        "source": {"name": "gaussian", "shape": [1, 8, 8]}, "target": {"name": "digits"},
        "model": {"kind": "unet", "channels": args.channels, "channel_mult": [1, 2], "num_res_blocks": 1, "attention_resolutions": [],
                  "dropout": 0.0, "head_channels": 16, "num_classes": 10},
        "guidance": {"p_uncond": 0.1},
        "train": {"steps": args.teacher_steps, "batch_size": args.batch, "lr": args.teacher_lr, "lr_schedule": "cosine",
                  "warmup_steps": min(100, args.teacher_steps // 10), "ema_decay": 0.999, "device": "cpu", "progress": False,
                  "ckpt_every": args.teacher_steps, "log_every": max(args.teacher_steps // 4, 1), "seed": 0, "workers": 0},
    }
    tag = hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:12]
    run = args.cache / f"teacher-{tag}"
    train_run(config_from_dict(cfg), run)
    return run


def student_cfg(args, seed: int) -> TrainConfig:
    return TrainConfig(steps=args.student_steps, batch_size=args.student_batch, lr=args.student_lr, lr_schedule="cosine",
                       warmup_steps=min(100, args.student_steps // 10), ema_decay=args.student_ema, device="cpu", progress=False,
                       ckpt_every=10**9, log_every=max(args.student_steps // 4, 1), seed=seed, grad_clip=1.0, workers=0)


def train_student(net, args, data, windows, *, teacher_w: float, p_uncond: float, seed: int):
    """A PeRFlow student of the teacher guided at ``teacher_w``; returns (student, teacher NFE spent, seconds)."""
    teacher = perflow.Teacher(net, FlowMatchingSchedule(), "velocity", guidance=teacher_w)
    student = perflow.PeRFlowStudent.from_teacher(teacher, windows)
    obj = perflow.PeRFlowObjective(teacher, data, windows, solver_steps=args.solver_steps, loss_space=args.loss_space,
                                   start_fraction=args.start_fraction, p_uncond=p_uncond)
    t0 = time.time()
    torch.manual_seed(seed)
    tr = Trainer(student, obj, student_cfg(args, seed)).fit(resume=False)
    if tr.ema is not None:
        student.load_state_dict(tr.ema.model.state_dict())
    return student.eval(), obj.teacher_nfe, time.time() - t0


def spread(values: list[float]) -> tuple[float, float]:
    """(mean, half range)."""
    return sum(values) / len(values), (max(values) - min(values)) / 2


def main() -> None:
    ap = bench_args(__doc__.split("\n")[0], threads=1, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--guidance", type=float, nargs="+", default=[1.0, 2.0, 4.0], help="guidance scales w")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--windows", type=int, default=4, help="K")
    ap.add_argument("--teacher-steps", type=int, default=2000)
    ap.add_argument("--teacher-lr", type=float, default=2e-3)
    ap.add_argument("--batch", type=int, default=128, help="teacher batch")
    ap.add_argument("--channels", type=int, default=16)
    ap.add_argument("--student-steps", type=int, default=500)
    ap.add_argument("--student-batch", type=int, default=64)
    ap.add_argument("--student-lr", type=float, default=1e-3)
    ap.add_argument("--student-ema", type=float, default=0.995)
    ap.add_argument("--solver-steps", type=int, default=3, help="teacher Euler steps across one window")
    ap.add_argument("--start-fraction", type=float, default=0.8)
    ap.add_argument("--loss-space", default="x0")
    ap.add_argument("--p-uncond", type=float, default=0.1, help="condition dropout of option (b)")
    ap.add_argument("--ref-steps", type=int, default=32, help="steps of the teacher's guided reference sampling")
    ap.add_argument("--n-eval", type=int, default=1000)
    ap.add_argument("--smoke", action="store_true", help="tiny steps and sample counts: checks the plumbing")
    ap.add_argument("--cache", type=Path, default=Path(__file__).resolve().parent.parent / ".runs" / NAME)
    args = ap.parse_args()
    if args.smoke:
        args.teacher_steps, args.student_steps, args.n_eval, args.ref_steps, args.seeds = 40, 6, 100, 8, args.seeds[:2]
        args.out = args.out / "tmp" / "smoke"
    torch.set_num_threads(args.threads)
    args.cache.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    machine = machine_info()
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k not in ("out", "cache", "threads")}
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    partial, done = resumable_rows(args.out, NAME, from_committed=False)
    rows = [r for r in done if r.get("key") == key]
    have = {r["unit"] for r in rows}

    def record(unit: str, new: list[dict]) -> None:
        for r in new:
            r.update(key=key, unit=unit)
        append_rows(partial, new)
        for r in new:
            print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items() if k not in ("key", "unit")}, flush=True)
        rows.extend(new)
        have.add(unit)

    t0 = time.time()
    run_dir = teacher_run(args)
    teacher_s = time.time() - t0
    net = load_run(run_dir).model.eval()
    print(f"teacher: {run_dir} ({teacher_s:.0f} s)", flush=True)

    digits = load_digits_images()
    data = ImageDataset(digits)
    feats, report = train_classifier_features(digits, seed=0)
    print(f"feature classifier: held-out accuracy {report.test_accuracy:.3f}", flush=True)
    real = data.sample(args.n_eval, generator=torch.Generator().manual_seed(123))
    real_stats = feature_statistics(extract_features(feats, real, device="cpu"))
    noise = torch.randn(args.n_eval, 1, 8, 8, generator=torch.Generator().manual_seed(99))
    labels = torch.arange(args.n_eval) % 10
    path = FlowMatchingSchedule()
    windows = perflow.make_windows(args.windows)
    k = args.windows

    refs: dict[float, tuple[torch.Tensor, tuple]] = {}
    with torch.no_grad():
        for w in args.guidance:
            cache = args.cache / f"ref-{key}-w{w:g}.safetensors"
            if cache.exists():
                x_ref = load_tensors(cache)[0]["x"]
            else:
                x_ref = perflow.teacher_ddim_sample(perflow.Teacher(net, path, "velocity", guidance=w), noise, args.ref_steps, cond=labels).x
                save_tensors(cache, {"x": x_ref.contiguous()})
            refs[w] = (x_ref, feature_statistics(extract_features(feats, x_ref.clamp(-1, 1), device="cpu")))

    def quality(x: torch.Tensor, w: float) -> dict[str, float]:
        x = x.clamp(-1, 1)  # what a saved image keeps
        f = extract_features(feats, x, device="cpu")
        st = feature_statistics(f)
        with torch.no_grad():
            acc = float((feats.head(f.float()).argmax(1) == labels).float().mean())
        x_ref, ref_stats = refs[w]
        return {"fd": frechet_distance(*st, *real_stats), "fd_ref": frechet_distance(*st, *ref_stats), "acc": acc,
                "err": float((x - x_ref.clamp(-1, 1)).square().flatten(1).sum(1).mean())}

    # the teacher: reference, the students' NFE, and the guided sampler at 4 / 8 / 16 / 50 steps
    for w in args.guidance:
        unit = f"teacher-w{w:g}-4-8-16-50"
        if unit in have:
            continue
        g = perflow.Teacher(net, path, "velocity", guidance=w)
        new = [dict(w=w, method=f"teacher, {args.ref_steps} guided Euler steps (reference)", option="reference", seed=None,
                    nfe=args.ref_steps * g.nfe_per_eval, teacher_nfe_per_example=0, train_s=0.0, **quality(refs[w][0], w))]
        with torch.no_grad():
            for steps in sorted({k // g.nfe_per_eval, k, *TEACHER_STEPS}):
                res = perflow.teacher_ddim_sample(g, noise, steps, cond=labels)
                new.append(dict(w=w, method=f"teacher, {steps} guided Euler steps", option="teacher", seed=None, nfe=res.nfe,
                                teacher_nfe_per_example=0, train_s=0.0, **quality(res.x, w)))
        record(unit, new)

    for seed in args.seeds:
        for w in args.guidance:  # (a): one student per w
            unit = f"a-w{w:g}-s{seed}"
            if unit in have:
                continue
            student, spent, secs = train_student(net, args, LabelledData(data), windows, teacher_w=w, p_uncond=0.0, seed=seed)
            with torch.no_grad():
                res = perflow.sample_perflow(student, noise, windows, cond=labels)
            per = args.solver_steps * (1 if w in (0.0, 1.0) else 2)
            record(unit, [dict(w=w, method="(a) guided teacher solve, student at w = 1", option="a", seed=seed, nfe=res.nfe,
                               teacher_nfe_per_example=per, teacher_nfe_spent=spent, train_s=secs, **quality(res.x, w))])
        unit = f"b-s{seed}"  # (b): one student, guided at sampling
        if unit in have:
            continue
        student, spent, secs = train_student(net, args, LabelledData(data), windows, teacher_w=1.0, p_uncond=args.p_uncond, seed=seed)
        new = []
        with torch.no_grad():
            for w in args.guidance:
                res = perflow.sample_perflow(student, noise, windows, cond=labels, guidance=w)
                new.append(dict(w=w, method=f"(b) dropout {args.p_uncond:g}, CFG on the student", option="b", seed=seed, nfe=res.nfe,
                                teacher_nfe_per_example=args.solver_steps, teacher_nfe_spent=spent, train_s=secs, **quality(res.x, w)))
        record(unit, new)

    summary = summarise(rows, args)
    total = time.time() - t_start
    result = {"config": settings, "machine": machine, "classifier_accuracy": report.test_accuracy, "teacher_run": str(run_dir),
              "total_s_this_session": total, "rows": rows, "summary": summary}
    md = markdown(summary, args, machine, report.test_accuracy, total, rows)
    write_results(args.out, NAME, result, md)
    print(md)


def summarise(rows: list[dict], args) -> list[dict]:
    """Rows grouped by (w, method): mean and half range over seeds."""
    out: dict[tuple, dict] = {}
    for r in rows:
        g = out.setdefault((r["w"], r["method"]), {"w": r["w"], "method": r["method"], "option": r["option"], "nfe": r["nfe"],
                                                   "teacher_nfe_per_example": r["teacher_nfe_per_example"], "runs": []})
        g["runs"].append(r)
    order = {"reference": 0, "teacher": 1, "a": 2, "b": 3}
    res = []
    for g in sorted(out.values(), key=lambda g: (g["w"], order[g["option"]], g["nfe"])):
        for m in ("fd", "fd_ref", "acc", "err", "train_s"):
            g[m], g[m + "_spread"] = spread([r[m] for r in g["runs"]])
        g["seeds"] = [r["seed"] for r in g["runs"]]
        del g["runs"]
        res.append(g)
    return res


def markdown(summary: list[dict], args, machine: dict, clf_acc: float, total: float, rows: list[dict]) -> str:
    def pm(g: dict, m: str, fmt: str, scale: float = 1.0) -> str:
        v = format(g[m] * scale, fmt)
        return v if len(g["seeds"]) < 2 or g["seeds"][0] is None else f"{v} ± {format(g[m + '_spread'] * scale, fmt)}"

    lines = [
        "# Classifier-free guidance inside PeRFlow: (a) guided teacher solve vs (b) CFG on the student (8x8 digits, CPU)", "",
        machine_line(machine), "",
        (f"Teacher: a class-conditional rectified-flow UNet ({args.channels} channels, label dropout 0.1, {args.teacher_steps} steps of batch "
        f"{args.batch}, EMA 0.999) trained with `train_run`, used as a velocity teacher on `FlowMatchingSchedule`.  Students: K = {args.windows} "
        f"uniform windows, {args.student_steps} steps of batch {args.student_batch}, lr {args.student_lr}, EMA {args.student_ema}, "
        f"{args.solver_steps} teacher Euler steps per window solve, loss in {args.loss_space} space, {args.start_fraction:g} of the points at window starts; "
        f"(a): teacher solve guided at w, no condition dropout, student sampled at w = 1; (b): teacher at w = 1 with condition dropout "
        f"{args.p_uncond:g}, one student sampled with CFG at each w.  Seeds {args.seeds}: mean ± half range."), "",
        (f"Metrics on {args.n_eval} samples (fixed noise, labels 0-9 in turn), clipped to [-1, 1]: FD to {args.n_eval} real digits and FD to the "
        f"teacher's {args.ref_steps}-step guided samples at the same w (\"FD to ref\"), both in the 128-D features of a classifier trained on the "
        f"digits (held-out accuracy {clf_acc:.3f}); class accuracy = that classifier's argmax equals the requested label; error = "
        f"E||x - x_ref||^2 to the reference sample from the same noise and label.  NFE counts network evaluations per sample (a guided "
        f"evaluation is 2).  Teacher NFE / example: the teacher's network evaluations per training example of the student."), "",
        "| w | method | NFE | FD to data | FD to ref | class acc. % | error to ref | teacher NFE / example | train s |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for g in summary:
        lines.append(f"| {g['w']:g} | {g['method']} | {g['nfe']} | {pm(g, 'fd', '.3f')} | {pm(g, 'fd_ref', '.3f')} | {pm(g, 'acc', '.1f', 100)} | "
                     f"{pm(g, 'err', '.3f')} | {g['teacher_nfe_per_example']} | {g['train_s']:.0f} |")
    lines += ["", f"Run time of the last session: {total:.0f} s (teacher training and reference samples are cached across sessions)."]
    lines += ["", "Reading:", ""] + [f"- {s}" for s in findings(summary, args)]
    return "\n".join(lines)


def findings(summary: list[dict], args) -> list[str]:
    """Plain comparisons of (a) and (b) at each w, from this run's numbers (reported, never asserted)."""
    out = []
    for w in args.guidance:
        a = next((g for g in summary if g["w"] == w and g["option"] == "a"), None)
        b = next((g for g in summary if g["w"] == w and g["option"] == "b"), None)
        ref = next((g for g in summary if g["w"] == w and g["option"] == "reference"), None)
        if a is None or b is None or ref is None:
            continue
        better = "(a)" if a["fd_ref"] < b["fd_ref"] else "(b)"
        out.append(f"w = {w:g}: FD to the guided teacher {a['fd_ref']:.3f} (a, {a['nfe']} NFE) vs {b['fd_ref']:.3f} (b, {b['nfe']} NFE), closer: {better}; "
                   f"class accuracy {100 * a['acc']:.1f} % vs {100 * b['acc']:.1f} % (teacher reference {100 * ref['acc']:.1f} %); "
                   f"FD to data {a['fd']:.3f} vs {b['fd']:.3f} (reference {ref['fd']:.3f}).")
    return out


if __name__ == "__main__":
    main()
