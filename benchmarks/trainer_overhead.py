"""How much does rectflow's Trainer cost per step, and what does minibatch OT add? (CPU)

Part 1 -- Trainer overhead.  The same 3x256 MLP (``MLPVelocity(2, width=256, depth=3)``),
batch 256, N(0, I) -> 8gaussians, trained (a) by ``rectflow.Trainer`` with
``FlowMatchingObjective(IndependentCoupling)`` and (b) by a bare PyTorch loop doing the same
work: x0 ~ N(0, I), x1 from the library's EightGaussians sampler, t ~ U[0, 1], straight-line
target, Adam (foreach), global grad-norm clipping, EMA by ``torch._foreach_lerp_``.  The two
alternate within each repeat (order flipped every repeat); we report ms/step and the overhead
of the Trainer (goal <= 5 %).

Part 2 -- minibatch-OT cost.  ``MinibatchOTCoupling`` (exact EMD and Sinkhorn) vs the plain
independent coupling through the same Trainer, batch 256, in each of the Trainer's
configurations (``TrainConfig.workers`` 0 and 1, ``torch.set_num_threads`` 1 and 2); we report
ms/step and the ratio OT / independent (goal <= 2x).

Step times are steady-state: time stamps at every step (a callback for the Trainer, the same
list append in the bare loop), the first ``--warmup`` steps of each run dropped (DataLoader
start-up, allocator warm-up); a run's ms/step is its median step time, and the table gives the
minimum over repeats (on a shared machine interference only adds time) with medians in the
JSON.  Before each run the script waits (``--wait-quiet`` seconds at most) for other processes
to go quiet, and it records how much CPU they used during each run.  Timing is a benchmark,
never a test assertion.

    .venv/bin/python benchmarks/trainer_overhead.py            # 5-15 minutes on 2 shared cores
    .venv/bin/python benchmarks/trainer_overhead.py --quick    # a smoke run
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from pathlib import Path

import torch

from _bench import bench_args, write_results
from _machine import LoadMeter, machine_info, machine_line, wait_quiet
from rectflow.data import make_distribution
from rectflow.engine.trainer import TrainConfig, Trainer
from rectflow.flow.couplings import IndependentCoupling, MinibatchOTCoupling
from rectflow.flow.losses import FlowMatchingObjective
from rectflow.models import MLPVelocity

BATCH = 256
LR, CLIP, EMA_DECAY = 1e-3, 1.0, 0.999


def steady_ms(stamps: list[float], warmup: int) -> float:
    """Median ms/step over the steps after the first ``warmup`` (robust to the odd preemption
    by other processes; for a steady loop it equals the mean)."""
    s = stamps[warmup:]
    return 1e3 * statistics.median(b - a for a, b in zip(s, s[1:]))


QUIET = {"max_wait_s": 0.0}


def measured(fn, *a, **kw) -> tuple[list[float], float | None]:
    """Run ``fn`` after waiting (bounded) for the machine to be quiet; return its result and
    the CPU other processes used meanwhile (cores)."""
    if QUIET["max_wait_s"] > 0:
        wait_quiet(QUIET["max_wait_s"])
    with LoadMeter() as m:
        out = fn(*a, **kw)
    return out, m.foreign_cores


def make_model(seed: int = 0) -> MLPVelocity:
    torch.manual_seed(seed)
    return MLPVelocity(2, width=256, depth=3)


def bare_loop(steps: int, target, seed: int = 0) -> list[float]:
    """Plain PyTorch: the same work as Trainer + FlowMatchingObjective(IndependentCoupling)."""
    model = make_model(seed).train()
    params = list(model.parameters())
    ema = copy.deepcopy(model).eval()
    for p in ema.parameters():
        p.requires_grad_(False)
    src = [p.data for p in params] + [b for b in model.buffers() if b.is_floating_point()]
    dst = [p.data for p in ema.parameters()] + [b for b in ema.buffers() if b.is_floating_point()]
    opt = torch.optim.Adam(params, lr=LR, foreach=True)
    g = torch.Generator().manual_seed(seed)
    stamps: list[float] = []
    for k in range(steps):
        x0 = torch.randn(BATCH, 2, generator=g)
        x1 = target.sample(BATCH, generator=g)
        t = torch.rand(BATCH, generator=g)
        xt = torch.lerp(x0, x1, t[:, None])
        loss = (model(xt, t) - (x1 - x0)).square().sum(dim=1).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, CLIP, foreach=True)
        opt.step()
        with torch.no_grad():
            torch._foreach_lerp_(dst, src, 1 - min(EMA_DECAY, (1 + k) / (10 + k)))
        stamps.append(time.perf_counter())
    return stamps


def trainer_loop(steps: int, coupling, workers: int, seed: int = 0) -> list[float]:
    stamps: list[float] = []
    cfg = TrainConfig(
        steps=steps, batch_size=BATCH, lr=LR, grad_clip=CLIP, ema_decay=EMA_DECAY, seed=seed,
        workers=workers, device="cpu", progress=False, log_every=10**9,
    )
    Trainer(make_model(seed), FlowMatchingObjective(coupling), cfg, callbacks=[lambda tr, k: stamps.append(time.perf_counter())]).fit()
    return stamps


def part1(threads: list[int], repeats: int, steps: int, warmup: int) -> list[dict]:
    source, target = make_distribution("gaussian"), make_distribution("8gaussians")
    rows = []
    for nt in threads:
        torch.set_num_threads(nt)
        bare, trainer, ratios, foreign = [], [], [], []
        for r in range(repeats):
            order = ("bare", "trainer") if r % 2 == 0 else ("trainer", "bare")
            got = {}
            for which in order:
                if which == "bare":
                    stamps, fl = measured(bare_loop, steps + warmup, target, seed=r)
                else:
                    stamps, fl = measured(trainer_loop, steps + warmup, IndependentCoupling(source, target), 0, seed=r)
                got[which] = steady_ms(stamps, warmup)
                foreign.append(fl)
            bare.append(got["bare"])
            trainer.append(got["trainer"])
            ratios.append(got["trainer"] / got["bare"])
        mb, mt = min(bare), min(trainer)
        rows.append({
            "threads": nt, "repeats": repeats, "steps_timed": steps,
            "bare_ms": mb, "trainer_ms": mt,
            "bare_ms_median": statistics.median(bare), "trainer_ms_median": statistics.median(trainer),
            "overhead_pct": 100 * (mt / mb - 1),
            "overhead_pct_median": 100 * (statistics.median(trainer) / statistics.median(bare) - 1),
            "overhead_pct_paired_median": 100 * (statistics.median(ratios) - 1),
            "bare_ms_all": bare, "trainer_ms_all": trainer,
            "foreign_load_cores_median": _med(foreign),
        })
        print(f"  threads={nt}: bare {mb:.3f} ms/step, Trainer {mt:.3f} ms/step, overhead {rows[-1]['overhead_pct']:+.1f}%", flush=True)
    return rows


def part2(threads: list[int], workers_list: list[int], couplings: list[str], repeats: int, steps: int, warmup: int) -> list[dict]:
    source, target = make_distribution("gaussian"), make_distribution("8gaussians")
    make = {
        "independent": lambda: IndependentCoupling(source, target),
        "ot-exact": lambda: MinibatchOTCoupling(source, target, method="exact"),
        "ot-sinkhorn": lambda: MinibatchOTCoupling(source, target, method="sinkhorn"),
    }
    rows = []
    for nt in threads:
        torch.set_num_threads(nt)
        for w in workers_list:
            times: dict[str, list[float]] = {c: [] for c in couplings}
            foreign: dict[str, list] = {c: [] for c in couplings}
            for r in range(repeats):
                for c in couplings:  # interleaved, so slow drift of the machine's load hits all alike
                    stamps, fl = measured(trainer_loop, steps + warmup, make[c](), w, seed=r)
                    times[c].append(steady_ms(stamps, warmup))
                    foreign[c].append(fl)
            base = min(times["independent"])
            for c in couplings:
                m = min(times[c])
                rows.append({"threads": nt, "workers": w, "coupling": c, "ms_per_step": m, "ms_per_step_median": statistics.median(times[c]), "ratio_vs_independent": m / base, "ms_all": times[c], "foreign_load_cores_median": _med(foreign[c])})
                print(f"  threads={nt} workers={w} {c:12s} {m:7.3f} ms/step  x{m / base:.2f}", flush=True)
    # Also relate each row to the fastest independent configuration (what a user would pick without OT).
    best = min((r["ms_per_step"] for r in rows if r["coupling"] == "independent"), default=float("nan"))
    for r in rows:
        r["ratio_vs_best_independent"] = r["ms_per_step"] / best
    return rows


def _med(xs: list) -> float | None:
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def _fl(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.2f}"


def draw_times(threads: list[int], n: int = 30) -> list[dict]:
    """The bare cost of one coupling draw (batch 256), for reading part 2."""
    source, target = make_distribution("gaussian"), make_distribution("8gaussians")
    rows = []
    for nt in threads:
        torch.set_num_threads(nt)
        for name, c in [
            ("independent", IndependentCoupling(source, target)),
            ("ot-exact", MinibatchOTCoupling(source, target, method="exact")),
            ("ot-sinkhorn", MinibatchOTCoupling(source, target, method="sinkhorn")),
        ]:
            g = torch.Generator().manual_seed(0)
            if QUIET["max_wait_s"] > 0:
                wait_quiet(QUIET["max_wait_s"])
            c.sample(BATCH, generator=g)
            ts = []
            for _ in range(n):
                t0 = time.perf_counter()
                c.sample(BATCH, generator=g)
                ts.append(1e3 * (time.perf_counter() - t0))
            rows.append({"threads": nt, "coupling": name, "draw_ms": min(ts), "draw_ms_median": statistics.median(ts)})
    return rows


def render(machine: dict, p1: list[dict], p2: list[dict], draws: list[dict], args) -> str:
    out = ["# Trainer overhead and minibatch-OT cost (CPU)", "", machine_line(machine), ""]
    out += [
        f"3x256 MLP (`MLPVelocity(2, width=256, depth=3)`), batch {BATCH}, N(0, I) -> 8gaussians, Adam lr {LR}, "
        f"grad clip {CLIP}, EMA {EMA_DECAY}; steady-state ms/step = median step time of a run (first {args.warmup} steps "
        "dropped), then the minimum over repeats (the machine is shared: interference only ever adds time, so the "
        "minimum is the estimate of the intrinsic cost; medians are in the JSON).", "",
        f"## 1. Trainer vs a bare PyTorch loop (goal: overhead <= 5 %), {args.repeats} repeats x {args.steps} steps", "",
        "| torch threads | bare loop ms/step | Trainer ms/step | overhead (min / min) | overhead (median / median) | overhead (median of paired ratios) | other processes' load (cores) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in p1:
        out.append(f"| {r['threads']} | {r['bare_ms']:.3f} | {r['trainer_ms']:.3f} | {r['overhead_pct']:+.1f} % | {r['overhead_pct_median']:+.1f} % | {r['overhead_pct_paired_median']:+.1f} % | {_fl(r['foreign_load_cores_median'])} |")
    out += [
        "", f"## 2. Minibatch OT vs independent coupling, same Trainer (goal: <= 2x), {args.ot_repeats} repeats x {args.ot_steps} steps", "",
        "| torch threads | TrainConfig.workers | coupling | ms/step | ratio vs independent (same config) | ratio vs fastest independent | other processes' load (cores) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in p2:
        out.append(f"| {r['threads']} | {r['workers']} | {r['coupling']} | {r['ms_per_step']:.3f} | {r['ratio_vs_independent']:.2f}x | {r['ratio_vs_best_independent']:.2f}x | {_fl(r['foreign_load_cores_median'])} |")
    out += ["", "Cost of one coupling draw alone (batch 256, minimum of 30, in the main process):", "", "| torch threads | coupling | ms/draw |", "|---|---|---|"]
    for r in draws:
        out.append(f"| {r['threads']} | {r['coupling']} | {r['draw_ms']:.3f} |")
    out += [
        "", "\"Other processes' load\" is the CPU "
        "other processes used during the measurement (median over runs, in cores, from /proc/stat); on a 2-core machine "
        "anything above ~0.3 means the numbers, especially those with 2 torch threads, are inflated by contention.",
    ]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = bench_args(__doc__.split("\n\n")[0], "trainer_overhead", formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", default="1,2", help="torch.set_num_threads values, comma-separated (default 1,2)")
    ap.add_argument("--workers", default="0,1", help="TrainConfig.workers values for part 2 (default 0,1)")
    ap.add_argument("--repeats", type=int, default=11, help="part 1 repeats (default 11)")
    ap.add_argument("--steps", type=int, default=250, help="part 1 timed steps per run (default 250)")
    ap.add_argument("--ot-repeats", type=int, default=4, help="part 2 repeats (default 4)")
    ap.add_argument("--ot-steps", type=int, default=150, help="part 2 timed steps per run (default 150)")
    ap.add_argument("--couplings", default="independent,ot-exact,ot-sinkhorn", help="part 2 couplings (default: all three)")
    ap.add_argument("--warmup", type=int, default=50, help="steps dropped at the start of each run (default 50)")
    ap.add_argument("--wait-quiet", type=float, default=15.0, help="before each run, wait up to this many seconds for other processes to use < 0.3 cores (default 15; 0 = never wait)")
    ap.add_argument("--quick", action="store_true", help="smoke run: 2 repeats, 60 steps")
    args = ap.parse_args(argv)
    if args.quick:
        args.repeats = args.ot_repeats = 2
        args.steps = args.ot_steps = 60
        args.warmup = 10
    QUIET["max_wait_s"] = args.wait_quiet
    threads = [int(x) for x in args.threads.split(",")]
    workers = [int(x) for x in args.workers.split(",")]
    couplings = [c.strip() for c in args.couplings.split(",")]
    if "independent" not in couplings:
        couplings.insert(0, "independent")

    machine = machine_info()
    print(machine_line(machine), flush=True)
    t0 = time.perf_counter()
    print("part 1: Trainer vs bare loop", flush=True)
    p1 = part1(threads, args.repeats, args.steps, args.warmup)
    print("part 2: minibatch OT vs independent", flush=True)
    p2 = part2(threads, workers, couplings, args.ot_repeats, args.ot_steps, args.warmup)
    draws = draw_times(threads)
    machine["loadavg_end"] = machine_info()["loadavg_1_5_15"]
    md = render(machine, p1, p2, draws, args)
    payload = {
        "benchmark": "trainer_overhead", "machine": machine, "batch_size": BATCH,
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "trainer_vs_bare": p1, "ot_vs_independent": p2, "draw_ms": draws,
        "wall_s": time.perf_counter() - t0,
    }
    js, mdp = write_results(args.out, args.name, payload, md)
    print()
    print(md)
    print(f"\nwrote {js} and {mdp}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
