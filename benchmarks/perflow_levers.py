"""Which levers move the K = 4 PeRFlow student on 8x8 digits (issue 15, item 6), two seeds per arm.

Each arm is one run of ``benchmarks/perflow.py --windows 4 --budgets`` (same cached teacher, same
evaluation noise, FD in the digits classifier's features) with one change from the defaults:

* ``base``: the defaults (windows uniform in t, 12 teacher DDIM steps per window solve, start fraction 0.8);
* ``logsnr``: windows uniform in the teacher's log-SNR (the arm the window-boundary bug invalidated);
* ``solver24``: 24 teacher DDIM steps per window solve (96 in all: the target's cap moves past the 50-step reference);
* ``gap05``: window-aware time input (``--interior-gap 0.5``: inside window k the network sees
  t_k + (t - t_k) / 2, so the end of a window never shares a time input with the next window's start);
* ``sf10``: every training point at a window start (start fraction 1.0: no interior point, so no
  time is ever asked for two targets);
* ``sf10k24``: both of the last two (start fraction 1.0 with 24 teacher steps per window solve).

Runs are resumable: an arm whose JSON exists in --out is read, not rerun.  ``--seeds`` picks the
student seeds, so two processes can run different seeds side by side.  Writes <name of --out>.{json,md}
next to --out (default perflow_levers.{json,md})
(per arm: mean FD, the two seeds, their spread, the student/teacher ratio and the teacher NFE spent).

    nohup python benchmarks/perflow_levers.py --seeds 1 &      # ~1.5 h on one core
    python benchmarks/perflow_levers.py --report-only
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from _bench import RESULTS, bench_args, write_results
from _machine import machine_line

HERE = Path(__file__).resolve().parent
ARMS: dict[str, list[str]] = {
    "base": [],
    "logsnr": ["--window-spacing", "log_snr"],
    "solver24": ["--window-solver-steps", "24"],
    "gap05": ["--interior-gap", "0.5"],
    "sf10": ["--start-fraction", "1.0"],
    "sf10k24": ["--start-fraction", "1.0", "--window-solver-steps", "24"],
}


def run_arm(arm: str, seed: int, out: Path, extra: list[str]) -> Path:
    js = out / f"{arm}_s{seed}.json"
    if not js.exists():
        cmd = [sys.executable, str(HERE / "perflow.py"), "--windows", "4", "--budgets", "--seed", str(seed),
               "--out", str(out), "--name", f"{arm}_s{seed}", *ARMS[arm], *extra]
        print("running", " ".join(cmd[1:]), flush=True)
        subprocess.run(cmd, check=True)
    return js


def report(out: Path, seeds: list[int]) -> None:
    rows, machine = [], None
    for arm in ARMS:
        found = {s: json.loads((out / f"{arm}_s{s}.json").read_text()) for s in seeds if (out / f"{arm}_s{s}.json").exists()}
        if not found:
            continue
        per = {}
        for s, r in found.items():
            machine = machine or r["machine"]
            ref = r["rows"][0]["fd"]
            st = next(x for x in r["rows"] if x.get("windows") == 4)
            two = next((x for x in r["rows"] if x.get("windows_2spw") == 4), None)  # 2 Euler steps per window (runs since session 9)
            per[s] = dict(fd=st["fd"], fd_8=two["fd"] if two else None, ratio=st["fd"] / ref, ode_err=st["ode_err"], teacher_nfe=st["teacher_nfe_train"] / (r["config"]["student_steps"] * r["config"]["batch"]),
                          train_s=st["train_s"], ref_fd=ref)
        fds = [v["fd"] for v in per.values()]
        rows.append(dict(arm=arm, flags=" ".join(ARMS[arm]) or "(defaults)", seeds=per, fd_mean=sum(fds) / len(fds),
                         fd_spread=max(fds) - min(fds), ratio_mean=sum(v["ratio"] for v in per.values()) / len(per)))
    if not rows:
        print("no finished arm yet")
        return
    ref = next(iter(rows[0]["seeds"].values()))["ref_fd"]
    cfg = json.loads(next(out.glob("*_s*.json")).read_text())["config"]
    lines = ["# PeRFlow K = 4 on 8x8 digits: which levers move the student (two seeds per arm)", "",
             machine_line(machine), "",
             "Every arm is `benchmarks/perflow.py --windows 4 --budgets --seed S` plus its flags (student "
             f"{cfg['student_steps']} steps, lr {cfg['student_lr']:g}, batch {cfg['batch']}, EMA {cfg['student_ema']}; the same cached "
             f"teacher; {cfg['n_eval']} samples). Teacher 50-step DDIM FD: {ref:.3f}, "
             f"goal 1.1x = {1.1 * ref:.3f}. Spread = |seed 1 - seed 2|; a difference between arms smaller than the "
             "spreads is noise. Train s is wall clock with other benchmarks sharing the 2 cores.", "",
             "| arm | change | FD per seed | mean FD | spread | FD / teacher 50-step | FD at 8 steps (2 per window) | ODE error | teacher NFE / example | train s |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        per = r["seeds"]
        each = ", ".join(f"s{s}: {v['fd']:.3f}" for s, v in sorted(per.items()))
        fd8 = ", ".join(f"s{s}: {v['fd_8']:.3f}" for s, v in sorted(per.items()) if v.get("fd_8") is not None) or "-"
        lines.append(f"| {r['arm']} | `{r['flags']}` | {each} | "
                     f"{r['fd_mean']:.3f} | {r['fd_spread']:.3f} | {r['ratio_mean']:.3f} | {fd8} | "
                     f"{sum(v['ode_err'] for v in per.values()) / len(per):.3f} | "
                     f"{next(iter(per.values()))['teacher_nfe']:.0f} | "
                     f"{sum(v['train_s'] for v in per.values()) / len(per):.0f} |")
    write_results(out.parent, out.name, dict(machine=machine, rows=rows), "\n".join(lines))
    print("\n".join(lines))


def main() -> None:
    ap = bench_args(__doc__.split("\n")[0], out=RESULTS / "perflow_levers",
                    out_help="folder of the arms' perflow.py results; the table goes beside it, to FOLDER.{json,md}",
                    report_only="write the table from the finished runs; run nothing")
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    ap.add_argument("extra", nargs=argparse.REMAINDER, help="after --: passed to every perflow.py run (e.g. a smoke size)")
    args = ap.parse_args()
    extra = [a for a in args.extra if a != "--"]
    args.out.mkdir(parents=True, exist_ok=True)
    if not args.report_only:
        for arm in args.arms:
            for seed in args.seeds:
                run_arm(arm, seed, args.out, extra)
                report(args.out, [1, 2])
    report(args.out, [1, 2])


if __name__ == "__main__":
    main()
