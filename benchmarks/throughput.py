"""GPU throughput of the CIFAR-10 UNet (35.7M parameters, 32x32): training img/s, sampling
img*NFE/s, MFU, and where the step time goes.  Needs CUDA (goals are for one H100).

Training goes through the library's real ``Trainer`` (bf16 autocast, TF32, channels-last,
torch.compile, fused AdamW, grad-norm clipping, EMA, data drawn from uint8 images kept on the
GPU plus a Gaussian source), batch 128 and 512; goals >= 3,500 and >= 6,500 img/s.  The step
time is split by timing, on the same compiled model and batch, the model alone (forward +
backward), the data draw alone and the optimizer + clipping + EMA alone; "outside the model" is
1 - model / step.  MFU = (training FLOPs per image, counted by FlopCounterMode over forward +
backward) x img/s / peak bf16 FLOP/s of the GPU.

Sampling: one forward of the compiled model (bf16, no grad) at batch 1,000, in img*NFE/s
(goal >= 20,000), and the unrolled Euler-10 sampler compiled as one graph (FixedStepSampler).

    .venv/bin/python benchmarks/throughput.py                 # on a CUDA machine, ~5 minutes
    .venv/bin/python benchmarks/throughput.py --cpu-smoke     # tiny sizes on the CPU: checks the script only
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

from _bench import bench_args, write_results
from _machine import machine_info, machine_line
from rectflow.data.image_sets import ImageArray, ImageDataset, ImageGaussian, load_images
from rectflow.engine.trainer import TrainConfig, Trainer, step_generator
from rectflow.flow.couplings import IndependentCoupling
from rectflow.flow.losses import FlowMatchingObjective
from rectflow.images.generate import FixedStepSampler
from rectflow.models import UNetVelocity

CIFAR = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-jpeg" / "train.zip"
GOALS = {128: 3500.0, 512: 6500.0}
SAMPLING_GOAL = 20000.0
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "H800": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 70.0, "L4": 121.0}


def peak_tflops(name: str, override: float | None) -> float | None:
    """Dense bf16 peak of the GPU (SXM figures), None when unknown."""
    if override:
        return override
    for key, val in PEAK_BF16_TFLOPS.items():
        if key in name:
            return val * (756.0 / 989.0 if key == "H100" and "PCIe" in name else 1.0)
    return None


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, n: int, device: torch.device) -> float:
    """Median seconds of fn() over n runs (after one warm-up call)."""
    fn()
    ts = []
    for _ in range(n):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def make_model(args) -> UNetVelocity:
    torch.manual_seed(0)
    if args.cpu_smoke:
        return UNetVelocity(3, 32, channels=16, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(16,), head_channels=16)
    return UNetVelocity()  # the CIFAR-10 default, 35.7M parameters


def image_data(args, device: torch.device) -> ImageDataset:
    """CIFAR-10 train images as uint8 on the device (random uint8 images when the ZIP is absent:
    throughput does not depend on the pixels)."""
    if CIFAR.is_file() and not args.cpu_smoke:
        data = load_images(CIFAR)
    else:
        g = torch.Generator().manual_seed(0)
        data = ImageArray(torch.randint(0, 256, (5000, 3, 32, 32), generator=g, dtype=torch.uint8), source="random uint8")
    return ImageDataset(data, flip=True, storage_device=device)


def training_flops_per_image(model: torch.nn.Module, device: torch.device) -> float:
    """FLOPs of forward + backward for one 32x32 image (FlopCounterMode on a batch of 2)."""
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.randn(2, 3, 32, 32, device=device)
    t = torch.rand(2, device=device)
    counter = FlopCounterMode(display=False)
    with counter:
        model(x, t).square().mean().backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops() / 2


def bench_training(batch: int, args, device: torch.device, target: ImageDataset, peak: float | None) -> dict:
    model = make_model(args)
    cuda = device.type == "cuda"
    cfg = TrainConfig(
        steps=args.warmup + args.steps, batch_size=batch, lr=2e-4, optimizer="adamw", warmup_steps=0, grad_clip=1.0,
        ema_decay=0.9999, precision="bf16" if cuda else "fp32", channels_last=cuda, compile=cuda and not args.no_compile,
        tf32=True, workers=0, log_every=10**9, ckpt_every=10**9, progress=False, device=str(device), seed=0,
    )
    objective = FlowMatchingObjective(IndependentCoupling(ImageGaussian((3, 32, 32)), target))
    trainer = Trainer(model, objective, cfg)
    stamps: dict[int, float] = {}

    def stamp(tr, step):
        if step in (args.warmup, args.warmup + args.steps):
            sync(device)
            stamps[step] = time.perf_counter()

    trainer.callbacks.append(stamp)
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    t_start = time.perf_counter()
    trainer.fit()
    step_s = (stamps[args.warmup + args.steps] - stamps[args.warmup]) / args.steps
    first_steps_s = stamps[args.warmup] - t_start  # includes compilation
    peak_mem = torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None

    # the parts of a step, each alone, on the same compiled model and batch
    train_model, params = trainer._model_for_loss(), [p for p in trainer.model.parameters() if p.requires_grad]
    batch_data = objective.draw(batch, step_generator(0, 10**6), device)
    if cfg.channels_last:
        from rectflow.engine.trainer import _to_device

        batch_data = _to_device(batch_data, device, True)

    def model_part():
        trainer.optimizer.zero_grad(set_to_none=True)
        with trainer._autocast():
            out = objective.loss(train_model, batch_data)
        out.loss.backward()

    model_s = timed(model_part, args.parts_reps, device)
    data_s = timed(lambda: objective.draw(batch, step_generator(0, 7), device), args.parts_reps, device)

    def optim_part():
        torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True)
        trainer.optimizer.step()
        trainer.ema.update(10**6)

    optim_s = timed(optim_part, args.parts_reps, device)
    flops = training_flops_per_image(trainer.model, device)
    ips = batch / step_s
    return {
        "batch": batch,
        "img_per_s": ips,
        "goal_img_per_s": GOALS.get(batch),
        "ms_per_step": 1e3 * step_s,
        "model_fwd_bwd_ms": 1e3 * model_s,
        "data_draw_ms": 1e3 * data_s,
        "optimizer_clip_ema_ms": 1e3 * optim_s,
        "outside_model_share": max(0.0, 1 - model_s / step_s),
        "train_gflops_per_img": flops / 1e9,
        "mfu": flops * ips / (peak * 1e12) if peak else None,
        "warmup_s_incl_compile": first_steps_s,
        "peak_mem_gib": peak_mem,
        "params_m": sum(p.numel() for p in trainer.model.parameters()) / 1e6,
    }


@torch.no_grad()
def bench_sampling(args, device: torch.device) -> dict:
    cuda = device.type == "cuda"
    model = make_model(args).to(device).eval()
    if cuda:
        model = model.to(memory_format=torch.channels_last)
    fast = torch.compile(model, dynamic=False) if cuda and not args.no_compile else model
    n = args.sample_batch
    x = torch.randn(n, 3, 32, 32, device=device)
    if cuda:
        x = x.contiguous(memory_format=torch.channels_last)
    t = torch.full((n,), 0.5, device=device)
    ctx = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if cuda else None

    def one_forward():
        if ctx is None:
            return fast(x, t)
        with ctx():
            return fast(x, t)

    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    fwd_s = timed(one_forward, args.sample_reps, device)
    row = {"batch": n, "img_nfe_per_s": n / fwd_s, "goal_img_nfe_per_s": SAMPLING_GOAL, "ms_per_forward": 1e3 * fwd_s}

    sampler = FixedStepSampler(model, "euler", args.euler_steps)
    run = torch.compile(sampler, dynamic=False) if cuda and not args.no_compile else sampler

    def euler():
        if ctx is None:
            return run(x)
        with ctx():
            return run(x)

    euler_s = timed(euler, max(1, args.sample_reps // 4), device)
    row.update({
        f"euler{args.euler_steps}_img_per_s": n / euler_s,
        f"euler{args.euler_steps}_img_nfe_per_s": n * sampler.nfe / euler_s,
        "peak_mem_gib": torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None,
    })
    return row


def render(machine: dict, gpu: str, train_rows: list[dict], samp: dict, args) -> str:
    def f(v, fmt=".1f"):
        return "n/a" if v is None else format(v, fmt)

    out = [f"# UNet throughput ({'CPU smoke run: tiny model, numbers meaningless' if args.cpu_smoke else gpu})", "", machine_line(machine), ""]
    out += [
        f"Model: `UNetVelocity()` ({f(train_rows[0]['params_m'])}M parameters), 32x32x3; Trainer with bf16 autocast, TF32, channels-last, "
        f"torch.compile={not args.no_compile}, fused AdamW, grad clip 1.0, EMA; {args.steps} timed steps after {args.warmup} warm-up steps.", "",
        "| batch | img/s | goal | ms/step | model fwd+bwd ms | data ms | optim+clip+EMA ms | outside model | GFLOP/img (train) | MFU | peak GiB | warm-up s (compile) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in train_rows:
        out.append(
            f"| {r['batch']} | {r['img_per_s']:.0f} | {f(r['goal_img_per_s'], '.0f')} | {r['ms_per_step']:.2f} | {r['model_fwd_bwd_ms']:.2f} | "
            f"{r['data_draw_ms']:.2f} | {r['optimizer_clip_ema_ms']:.2f} | {100 * r['outside_model_share']:.1f} % | {r['train_gflops_per_img']:.2f} | "
            f"{f(r['mfu'] and 100 * r['mfu'])} % | {f(r['peak_mem_gib'], '.2f')} | {r['warmup_s_incl_compile']:.1f} |"
        )
    k = args.euler_steps
    out += [
        "", f"Sampling, batch {samp['batch']}, bf16, compiled: one forward {samp['img_nfe_per_s']:.0f} img*NFE/s "
        f"(goal {SAMPLING_GOAL:.0f}); Euler-{k} as one compiled graph {samp[f'euler{k}_img_per_s']:.0f} img/s = "
        f"{samp[f'euler{k}_img_nfe_per_s']:.0f} img*NFE/s; peak {f(samp['peak_mem_gib'], '.2f')} GiB.", "",
        "\"outside model\" = 1 - (model forward+backward alone) / (whole Trainer step): data drawing, optimizer, clipping, EMA, "
        "Python overhead.  The parts are timed alone (synchronised), so they need not add up to the step time.",
    ]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = bench_args(__doc__.split("\n\n")[0], "throughput", formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", default="128,512", help="training batch sizes (default 128,512)")
    ap.add_argument("--steps", type=int, default=100, help="timed training steps per batch size")
    ap.add_argument("--warmup", type=int, default=20, help="untimed first steps (compilation, allocator)")
    ap.add_argument("--parts-reps", type=int, default=20, help="repetitions when timing the parts of a step")
    ap.add_argument("--sample-batch", type=int, default=1000, help="sampling batch")
    ap.add_argument("--sample-reps", type=int, default=20, help="timed sampling forwards")
    ap.add_argument("--euler-steps", type=int, default=10, help="steps of the compiled Euler sampler")
    ap.add_argument("--peak-tflops", type=float, help="peak bf16 TFLOP/s for MFU (default: from the GPU name)")
    ap.add_argument("--no-compile", action="store_true", help="skip torch.compile")
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny model and sizes on the CPU: checks that the script runs")
    args = ap.parse_args(argv)
    if args.cpu_smoke:
        args.batches, args.steps, args.warmup, args.parts_reps = "8", 2, 1, 2
        args.sample_batch, args.sample_reps, args.euler_steps, args.no_compile = 16, 2, 2, True
        args.name = args.name + "_cpu_smoke"
        device = torch.device("cpu")
        torch.set_num_threads(1)  # a smoke run on a shared machine: avoid oversubscribing the cores
    elif not torch.cuda.is_available():
        print("benchmarks/throughput.py measures GPU throughput and needs a CUDA device, but none is available "
              "(run with --cpu-smoke to check the script on tiny sizes)", file=sys.stderr)
        return 2
    else:
        device = torch.device("cuda")
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak = peak_tflops(gpu, args.peak_tflops) if device.type == "cuda" else None
    machine = machine_info()
    target = image_data(args, device)
    rows = []
    for b in [int(v) for v in args.batches.split(",")]:
        rows.append(bench_training(b, args, device, target, peak))
        print(f"batch {b}: {rows[-1]['img_per_s']:.0f} img/s", flush=True)
    samp = bench_sampling(args, device)
    md = render(machine, gpu, rows, samp, args)
    js, mdp = write_results(args.out, args.name, {"machine": machine, "gpu": gpu, "peak_tflops": peak, "training": rows, "sampling": samp, "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}}, md)
    print(md)
    print(f"\nwrote {js} and {mdp}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
