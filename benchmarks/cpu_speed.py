"""Training speed of our CIFAR-10 CPU UNet against TorchCFM's, on this CPU's own ISA and on AVX2 (emulated where the CPU has
more, with ``ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2``), plus where the time of one step goes (torch.profiler).

Each ISA runs in its own process (the ISA is fixed when torch loads).  Inside it the variants alternate in rounds of a few
timed steps after warm-up, and each is scored by its best round (best of ``--rounds``): training img/s at batch 64 of the
``configs/cifar10-cpu.yaml`` UNet (1.06M parameters at 16x16) and of TorchCFM's UNet at the same width and depth, fp32 and
bf16 autocast, and ours channels-last.  One thread by default so it can run beside other work on a 2-core machine (ratios,
not absolute times, are the result).

    python benchmarks/cpu_speed.py                      # native + avx2, writes benchmarks/results/cpu_speed.{md,json}

TorchCFM is a peer used here only: ``pip install --no-deps torchcfm``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from _bench import bench_args, write_results
from _machine import isa_note, machine_info, machine_line
from cifar10_cpu import CONFIG, PeerVelocity, peer_unet
from rectflow.runs.config import load_config
from rectflow.runs.experiment import build_model, model_config

AVX2_ENV = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}
VARIANTS = [("ours", "fp32", False), ("peer", "fp32", False), ("ours", "bf16", False), ("peer", "bf16", False), ("ours", "fp32", True), ("ours", "bf16", True)]


def make(impl: str, size: int) -> torch.nn.Module:
    cfg = load_config(CONFIG)
    torch.manual_seed(0)
    if impl == "ours":
        return build_model(model_config(cfg, 3 * size * size, (3, size, size)))
    return PeerVelocity(peer_unet(size, cfg.model))


def step_fn(model: torch.nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, t: torch.Tensor, bf16: bool):
    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = (model(x, t) - x).float().square().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def worker(a: argparse.Namespace) -> dict:
    torch.set_num_threads(a.threads)
    size, batch = 16, 64
    x, t = torch.randn(batch, 3, size, size), torch.rand(batch)
    runs = {}
    for impl, prec, cl in VARIANTS:
        model = make(impl, size)
        xx = x
        if cl:
            model, xx = model.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
        opt = torch.optim.Adam(model.parameters(), 1e-4, foreach=True)
        fn = step_fn(model, opt, xx, t, prec == "bf16")
        for _ in range(a.warmup):
            fn()
        runs[(impl, prec, cl)] = (fn, sum(p.numel() for p in model.parameters()))
    best: dict[tuple, float] = {}
    for _ in range(a.rounds):
        for key, (fn, _) in runs.items():
            times = []
            for _ in range(a.steps):
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
            times.sort()
            best[key] = min(best.get(key, float("inf")), times[len(times) // 2])
    rows = [{"impl": k[0], "precision": k[1], "channels_last": k[2], "params": runs[k][1], "s_per_step": v, "img_per_s": batch / v} for k, v in best.items()]
    prof = profile(a) if a.profile else None
    return {"rows": rows, "machine": machine_info(), "threads": a.threads, "env": {k: os.environ.get(k) for k in AVX2_ENV}, "profile": prof}


def profile(a: argparse.Namespace) -> dict:
    """Self CPU time of one fp32 training step of each UNet, grouped: convolutions, normalisation, activations, attention,
    the optimizer, other."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    groups = {"convolution": ("conv", "mkldnn_convolution"), "group norm": ("group_norm", "native_group_norm"), "activation": ("silu", "gelu", "relu"),
              "attention": ("bmm", "softmax", "scaled_dot_product", "_efficient_attention", "_flash_attention", "baddbmm"),
              "linear": ("addmm", "mm", "linear"), "optimizer": ("_foreach", "adam")}
    out = {}
    x, t = torch.randn(64, 3, 16, 16), torch.rand(64)
    for impl in ("ours", "peer"):
        model = make(impl, 16)
        opt = torch.optim.Adam(model.parameters(), 1e-4, foreach=True)
        fn = step_fn(model, opt, x, t, False)
        for _ in range(3):
            fn()
        with torch_profile(activities=[ProfilerActivity.CPU]) as p:
            for _ in range(3):
                fn()
        tot: dict[str, float] = {}
        for ev in p.key_averages():
            name = ev.key.lower()
            g = next((k for k, pats in groups.items() if any(s in name for s in pats)), "other")
            tot[g] = tot.get(g, 0.0) + ev.self_cpu_time_total / 3 / 1e3  # ms per step
        out[impl] = tot
    return out


def render(results: dict[str, dict], a: argparse.Namespace) -> str:
    lines = ["# Training speed on the CPU: rectflow's CIFAR-10 UNet vs TorchCFM's, by ISA", ""]
    for isa, r in results.items():
        m = r["machine"]
        lines += [f"## {isa}" + (" (emulated: ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 on a CPU with more)" if isa == "avx2" and a.emulated else ""), "",
                  machine_line(m) + f" {r['threads']} thread(s) per process.", "",
                  f"Batch 64 at 16x16, Adam, best of {a.rounds} alternating rounds of {a.steps} steps (median of each round).", "",
                  "| UNet | params | precision | layout | ms / step | train img/s |", "|---|---:|---|---|---:|---:|"]
        for row in r["rows"]:
            lines.append(f"| {'rectflow' if row['impl'] == 'ours' else 'TorchCFM'} | {row['params'] / 1e6:.2f}M | {row['precision']} | "
                         f"{'channels-last' if row['channels_last'] else 'contiguous'} | {1e3 * row['s_per_step']:.1f} | {row['img_per_s']:.0f} |")
        get = {(x["impl"], x["precision"], x["channels_last"]): x["img_per_s"] for x in r["rows"]}
        fp = get[("ours", "fp32", False)] / get[("peer", "fp32", False)]
        best_ours = max(v for (i, p, _), v in get.items() if i == "ours" and p == "fp32")
        lines += ["", f"- fp32 vs fp32, both eager contiguous: rectflow / TorchCFM = **{fp:.2f}x**; our best fp32 layout: "
                  f"{best_ours / get[('peer', 'fp32', False)]:.2f}x (goal >= 1.3x: {'met' if best_ours / get[('peer', 'fp32', False)] >= 1.3 else 'NOT met'}).",
                  f"- bf16 vs fp32 for our UNet: {get[('ours', 'bf16', False)] / get[('ours', 'fp32', False)]:.2f}x "
                  f"({isa_note(m)}); TorchCFM bf16 vs its fp32: {get[('peer', 'bf16', False)] / get[('peer', 'fp32', False)]:.2f}x.", ""]
        if r.get("profile"):
            lines += ["Where one fp32 step's time goes (torch.profiler, self CPU ms per step):", "", "| group | rectflow | TorchCFM |", "|---|---:|---:|"]
            keys = sorted(set(r["profile"]["ours"]) | set(r["profile"]["peer"]), key=lambda k: -r["profile"]["ours"].get(k, 0))
            lines += [f"| {k} | {r['profile']['ours'].get(k, 0):.1f} | {r['profile']['peer'].get(k, 0):.1f} |" for k in keys]
            lines += [""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = bench_args(__doc__.split("\n")[0], "cpu_speed", threads=1)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=4)
    ap.add_argument("--isa", nargs="+", default=["native", "avx2"], choices=["native", "avx2"])
    ap.add_argument("--profile", action="store_true", default=True)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        print(json.dumps(worker(a)))
        return 0
    results = {}
    native_cap = torch.backends.cpu.get_cpu_capability()
    a.emulated = native_cap not in ("AVX2", "DEFAULT")
    for isa in a.isa:
        env = {**os.environ, "OMP_NUM_THREADS": str(a.threads), **(AVX2_ENV if isa == "avx2" else {})}
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "--threads", str(a.threads), "--rounds", str(a.rounds), "--steps", str(a.steps),
               "--warmup", str(a.warmup)]
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
        results[isa if isa == "avx2" else f"native ({native_cap})"] = json.loads(out.strip().splitlines()[-1])
        print(f"{isa} done", file=sys.stderr)
    write_results(a.out, a.name, {"results": results}, render(results, a))
    print(render(results, a))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
