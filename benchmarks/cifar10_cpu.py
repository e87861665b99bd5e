"""CIFAR-10 on a 2-core CPU: 1-RF -> reflow pairs -> 2-RF -> one-step distillation, each stage on its
own wall-clock budget, against TorchCFM's UNet and plain training loop at the same budget; FD in the
features of a classifier trained here; speed of both UNets side by side.

Recipe: ``configs/cifar10-cpu.yaml`` (16x16, 1.06M-parameter UNet, bf16 autocast).  Every stage goes
through the library's own jobs (``train_run`` = ``rectflow train``, ``train_child`` with pairs =
``rectflow reflow`` / ``rectflow distill``).  Phases, each in its own process (a clean peak RSS):

1. ``speed``: training img/s at batch 64 and forward img*NFE/s at batch 256 of our UNet and
   TorchCFM's at the same width/depth (identical parameter count), fp32 eager and bf16 autocast,
   alternating A/B twice; peak RSS of each.
2. ``classifier``: the FD feature network (VGG-style, trained ``--clf-seconds`` on the 16x16 train
   images, cached); its test accuracy, and the FD floor: 5,000 real train images vs the test
   statistics (the reference of every FD here).
3. ``1rf`` and ``peer``, at the same time on one core each, for ``--budget-1rf`` seconds: our 1-RF
   and TorchCFM (its ``ConditionalFlowMatcher``, its UNet, its plain fp32 loop, same lr/batch/warmup).
4. ``eval-1rf`` (Euler 1/2/4/10/100 + dopri5, straightness, transport cost), ``eval-peer`` (Euler).
5. ``pairs-1rf`` (dopri5), ``2rf`` (U-shaped time, init from the 1-RF), ``eval-2rf``,
   ``pairs-2rf``, ``distill`` (pseudo-Huber, init from the 2-RF), ``eval-distill``.
6. The markdown table + JSON (``benchmarks/results/cifar10_cpu.{md,json}``), sample grids
   (``cifar10_cpu_grids/``) and the chain's HTML report.

Resumable: a phase that finished wrote ``<work>/phase_<name>.json`` and is skipped; a training phase
killed midway resumes from its last checkpoint with what is left of its budget (the time already
spent is read from its ``metrics.jsonl``).  Run it in the background:

    nohup .venv/bin/python benchmarks/cifar10_cpu.py > benchmarks/results/tmp/cifar10_cpu.log 2>&1 &
    .venv/bin/python benchmarks/cifar10_cpu.py --smoke --work /tmp/c10smoke --out /tmp/c10smoke   # a 2-minute check

TorchCFM is a peer used here only: ``pip install --no-deps torchcfm`` into the benchmark environment
(never a dependency of rectflow; its own requirements pull another torch).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageDraw
from torch import Tensor, nn

from _bench import RESULTS, ROOT, bench_args, np_json, write_results
from _cifar10 import FeatureStats, evaluate_model, trained_seconds
from _machine import machine_info, machine_line
from rectflow.data.image_sets import load_images, resize_images, to_unit_range
from rectflow.engine.checkpoint import latest_checkpoint, list_checkpoints, load_optimizer_state, load_weights, read_checkpoint, save_checkpoint
from rectflow.engine.io import atomic_path
from rectflow.engine.trainer import TimeBudget, step_generator
from rectflow.images.classifier_features import train_cifar_classifier
from rectflow.reflow.diagnostics import straightness, transport_cost
from rectflow.reflow.pairs import PairOptions
from rectflow.runs.config import load_config
from rectflow.runs.experiment import build_distributions, build_model, load_run, model_config, train_run
from rectflow.runs.lineage import child_config, generate_run_pairs
from rectflow.runs.report import build_report

DATA = ROOT.parent / "shared" / "data" / "cifar10-jpeg"
CONFIG = ROOT / "configs" / "cifar10-cpu.yaml"
SOLVERS_FULL = ["euler:1", "euler:2", "euler:4", "euler:10", "euler:100", "dopri5"]
GRIDS = {"1rf": ("euler:1", "euler:4", "euler:100"), "peer": ("euler:1", "euler:4", "euler:100")}


class BudgetFromFirstStep(TimeBudget):
    """The library's TimeBudget with its clock started by the first training step, so that loading
    and decoding the data (done before training starts) does not eat into the budget; the peer's
    clock also starts at its first step."""

    def __init__(self, seconds: float, every: int = 5) -> None:
        super().__init__(seconds, every)
        self.started = False

    def __call__(self, trainer: Any, step: int) -> None:
        if not self.started:
            self.started, self.t0 = True, time.perf_counter()
        super().__call__(trainer, step)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


# ----- the peer: TorchCFM's UNet and its plain training loop -----------------------------------


def peer_unet(size: int, model_cfg: Any) -> nn.Module:
    """TorchCFM's UNet at our width/depth (the same parameter count, checked by the speed phase)."""
    from torchcfm.models.unet.unet import UNetModelWrapper  # the peer is installed in the benchmark environment only

    attn = ",".join(str(r) for r in model_cfg.attention_resolutions) or str(10 * size)  # no resolution matches: mid block only
    return UNetModelWrapper(dim=(3, size, size), num_channels=model_cfg.channels, num_res_blocks=model_cfg.num_res_blocks,
                            channel_mult=tuple(model_cfg.channel_mult), attention_resolutions=attn,
                            num_head_channels=model_cfg.head_channels, dropout=model_cfg.dropout)


class PeerVelocity(nn.Module):
    """TorchCFM's UNet called as ours is: v(x, t)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: Tensor, t: Tensor, **kw: Any) -> Tensor:
        return self.net(t.expand(x.shape[0]) if t.numel() == 1 else t, x)


def train_peer(cfg: Any, run_dir: Path, budget: float, size: int, seed: int = 0) -> dict:
    """TorchCFM's loop (examples/images/cifar10): x0 ~ N(0, I), ConditionalFlowMatcher(sigma=0),
    MSE, Adam, linear warmup, grad clipping, exponential EMA; fp32.  Batches and noise come from the
    same per-step generators as our trainer's; checkpoints every ``ckpt_every`` steps for resumption."""
    from torchcfm.conditional_flow_matching import ConditionalFlowMatcher  # peer, benchmark environment only

    tc = cfg.train
    source, target = build_distributions(cfg)
    torch.manual_seed(seed)
    net = peer_unet(size, cfg.model)
    ema = peer_unet(size, cfg.model)
    ema.load_state_dict(net.state_dict())
    opt = torch.optim.Adam(net.parameters(), lr=tc.lr)
    fm = ConditionalFlowMatcher(sigma=0.0)
    mcfg = {"peer": "torchcfm", "size": size, "channels": cfg.model.channels}
    step, spent = 0, 0.0
    if list_checkpoints(run_dir):
        ck = read_checkpoint(latest_checkpoint(run_dir), model_config=mcfg)
        load_weights(net, ck, ema=False)
        ema.load_state_dict(ck.state_dict("ema."))
        load_optimizer_state(opt, ck)
        step, spent = ck.step, float(ck.meta["train_config"]["spent_s"])
    decay = 0.999  # TorchCFM's default 0.9999 averages over ~10k steps: more than this budget trains
    t_start, losses = time.perf_counter(), []
    while spent + (time.perf_counter() - t_start) < budget:
        g = step_generator(seed, step)
        x1 = target.sample(tc.batch_size, generator=g)
        x0 = source.sample(tc.batch_size, generator=g)
        torch.manual_seed(seed * 1_000_003 + step)  # the matcher draws t with the global generator
        t, xt, ut = fm.sample_location_and_conditional_flow(x0, x1)
        for group in opt.param_groups:
            group["lr"] = tc.lr * min(1.0, (step + 1) / max(tc.warmup_steps, 1))
        loss = (net(t, xt) - ut).square().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), tc.grad_clip)
        opt.step()
        with torch.no_grad():
            for pe, pn in zip(ema.parameters(), net.parameters()):
                pe.lerp_(pn, 1 - decay)
        step += 1
        losses.append(float(loss.detach()))
        if step % tc.ckpt_every == 0:
            now = spent + time.perf_counter() - t_start
            save_checkpoint(run_dir / "checkpoints" / f"step_{step:08d}.safetensors", model=net, ema_model=ema, optimizer=opt, step=step,
                            model_config=mcfg, train_config={"spent_s": now})
            for old in list_checkpoints(run_dir)[:-2]:
                old.unlink()
    spent += time.perf_counter() - t_start
    save_checkpoint(run_dir / "checkpoints" / f"step_{step:08d}.safetensors", model=net, ema_model=ema, optimizer=opt, step=step,
                    model_config=mcfg, train_config={"spent_s": spent})
    return {"stage": "peer", "steps": step, "train_s": spent, "train_img_per_s": step * tc.batch_size / spent,
            "final_loss_mean_last100": sum(losses[-100:]) / max(len(losses[-100:]), 1) if losses else None}


def load_peer(cfg: Any, run_dir: Path, size: int) -> nn.Module:
    net = peer_unet(size, cfg.model)
    ck = read_checkpoint(latest_checkpoint(run_dir), model_config={"peer": "torchcfm", "size": size, "channels": cfg.model.channels})
    net.load_state_dict(ck.state_dict("ema."))
    return PeerVelocity(net).eval()


# ----- speed, side by side --------------------------------------------------------------------


def speed_worker(impl: str, mode: str, size: int, steps: int) -> dict:
    """Training img/s (batch 64, Adam) and forward img*NFE/s (batch 256, no grad) of one UNet."""
    cfg = load_config(CONFIG)
    torch.manual_seed(0)
    model = build_model(model_config(cfg, 3 * size * size, (3, size, size))) if impl == "ours" else PeerVelocity(peer_unet(size, cfg.model))
    params = sum(p.numel() for p in model.parameters())
    bf16 = mode == "bf16"
    opt = torch.optim.Adam(model.parameters(), 1e-4)
    x, t = torch.randn(64, 3, size, size), torch.rand(64)
    times, warm = [], 8  # the first steps of a process are slow (allocator, oneDNN primitives)
    for i in range(steps + warm):
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = (model(x, t) - x).float().square().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t0)
    train = 64 / (sum(times[warm:]) / steps)
    xf, tf = torch.randn(256, 3, size, size), torch.rand(256)
    fwd = []
    with torch.no_grad():
        for i in range(max(steps // 2, 2) + 4):
            t0 = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                model(xf, tf)
            fwd.append(time.perf_counter() - t0)
    n = len(fwd) - 4
    return {"impl": impl, "mode": mode, "params": params, "train_img_per_s": train, "forward_img_nfe_per_s": 256 / (sum(fwd[4:]) / n),
            "peak_rss_gib": peak_rss_gib(), "threads": torch.get_num_threads()}


# ----- phases ---------------------------------------------------------------------------------


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.work: Path = args.work
        self.work.mkdir(parents=True, exist_ok=True)
        self.grids = args.out / f"{args.name}_grids"
        self.size = args.size
        self.overrides = [f"target.path={args.train_zip}", f"target.resize={self.size}", f"source.shape=[3,{self.size},{self.size}]",
                          "train.steps=1000000000", "train.progress=false"] + args.override

    def cfg(self) -> Any:
        return load_config(CONFIG, self.overrides)

    def done(self, phase: str) -> dict | None:
        p = self.work / f"phase_{phase}.json"
        return json.loads(p.read_text()) if p.is_file() else None

    def finish(self, phase: str, result: dict) -> dict:
        p = self.work / f"phase_{phase}.json"
        with atomic_path(p) as tmp:
            tmp.write_text(json.dumps(np_json(result), indent=1))
        return result

    def spawn(self, phase: str, threads: int, *extra: str) -> subprocess.Popen:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", phase, "--threads", str(threads), *self.passthrough(), *extra]
        return subprocess.Popen(cmd)

    def passthrough(self) -> list[str]:
        a = self.args
        out = ["--work", str(a.work), "--out", str(a.out), "--name", a.name, "--train-zip", str(a.train_zip), "--test-zip", str(a.test_zip),
               "--size", str(a.size), "--budget-1rf", str(a.budget_1rf), "--budget-2rf", str(a.budget_2rf), "--budget-distill", str(a.budget_distill),
               "--pairs", str(a.pairs), "--n-fd", str(a.n_fd), "--clf-seconds", str(a.clf_seconds), "--n-straight", str(a.n_straight)]
        for o in a.override:
            out += ["--override", o]
        return out

    def run_phases(self, phases: list[list[str]]) -> None:
        """Run the phases in order; the phases of one inner list run at the same time, one core each."""
        for group in phases:
            todo = [p for p in group if self.done(p) is None]
            if not todo:
                continue
            threads = 1 if len(todo) > 1 else self.args.threads
            log(f"phase {' + '.join(todo)} ({threads} thread{'s' if threads > 1 else ''} each)")
            procs = [(p, self.spawn(p, threads)) for p in todo]
            for p, proc in procs:
                if proc.wait() != 0:
                    raise SystemExit(f"phase {p} failed with exit code {proc.returncode}; rerun to resume")

    # -- workers ---------------------------------------------------------------------------------

    def feats(self) -> list[FeatureStats]:
        a = self.args
        test = resize_images(load_images(a.test_zip), self.size)
        train = resize_images(load_images(a.train_zip), self.size)
        clf, _ = train_cifar_classifier(train, test, a.clf_seconds, torch.device("cpu"), batch=128, width=a.clf_width, cache=self.work / "classifier.safetensors")
        return [FeatureStats("fd", clf, to_unit_range(test.images), torch.device("cpu"))]

    def worker(self, phase: str) -> dict:
        a = self.args
        cpu = torch.device("cpu")
        if phase.startswith("speed-"):
            _, impl, mode = phase.split("-")
            return speed_worker(impl, mode, self.size, a.speed_steps)
        if phase == "classifier":
            test = resize_images(load_images(a.test_zip), self.size)
            train = resize_images(load_images(a.train_zip), self.size)
            clf, info = train_cifar_classifier(train, test, a.clf_seconds, cpu, batch=128, width=a.clf_width, cache=self.work / "classifier.safetensors")
            ref = FeatureStats("fd", clf, to_unit_range(test.images), cpu)
            g = torch.Generator().manual_seed(0)
            real = to_unit_range(train.images[torch.randperm(len(train.images), generator=g)[: a.n_fd]])
            return {**info, "floor_fd": ref.fd(real), "floor_n": a.n_fd, "n_ref": len(test.images), "peak_rss_gib": peak_rss_gib()}
        if phase in ("1rf", "2rf", "distill"):
            return self.train_stage(phase)
        if phase == "peer":
            return {**train_peer(self.cfg(), self.work / "peer", a.budget_1rf, self.size), "peak_rss_gib": peak_rss_gib()}
        if phase.startswith("pairs-"):
            return self.pairs(phase.split("-", 1)[1])
        if phase.startswith("eval-"):
            return self.evaluate(phase.split("-", 1)[1])
        raise SystemExit(f"unknown phase {phase!r}")

    def run_dir(self, stage: str) -> Path:
        return self.work / {"1rf": "cifar10-1rf", "2rf": "cifar10-2rf", "distill": "cifar10-2rf-distill", "peer": "peer"}[stage]

    def stage_config(self, stage: str) -> Any:
        if stage == "1rf":
            return self.cfg()
        parent = "1rf" if stage == "2rf" else "2rf"
        pairs = self.work / f"pairs-{parent}"
        run = load_run(self.run_dir(parent))
        over = ["train.warmup_steps=0"] + (["time.kind=u_shaped", "time.a=4.0"] if stage == "2rf" else [])
        return child_config(run, coupling={"kind": "pairs", "pairs": str(pairs.resolve())}, stage=2, init=str(latest_checkpoint(self.run_dir(parent))),
                            distill=stage == "distill", distill_loss="pseudo_huber", overrides=over)

    def train_stage(self, stage: str) -> dict:
        budget = {"1rf": self.args.budget_1rf, "2rf": self.args.budget_2rf, "distill": self.args.budget_distill}[stage]
        d = self.run_dir(stage)
        cfg = self.stage_config(stage)
        left = budget - trained_seconds(d)
        if left > 1.0:
            log(f"{stage}: training for {left:.0f} s more (budget {budget:.0f} s)")
            train_run(cfg, d, callbacks=[BudgetFromFirstStep(left)])
        steps = read_checkpoint(latest_checkpoint(d)).step
        spent = trained_seconds(d)
        return {"stage": stage, "steps": steps, "train_s": spent, "train_img_per_s": steps * cfg.train.batch_size / spent, "peak_rss_gib": peak_rss_gib()}

    def pairs(self, stage: str) -> dict:
        a = self.args
        out = self.work / f"pairs-{stage}"
        cfg = load_run(self.run_dir(stage)).config
        t0 = time.perf_counter()
        store = generate_run_pairs(self.run_dir(stage), a.pairs, out, options=PairOptions(solver="dopri5", rtol=cfg.eval.rtol, atol=cfg.eval.atol,
                                   shard_size=min(a.pairs, 2000), device="cpu"), progress=False)
        stats = store.manifest.get("stats", {})
        return {"stage": stage, "pairs": a.pairs, "pairs_s": time.perf_counter() - t0, "pairs_nfe_mean": stats.get("nfe_mean"), "peak_rss_gib": peak_rss_gib()}

    def evaluate(self, stage: str) -> dict:
        a = self.args
        cpu = torch.device("cpu")
        feats = self.feats()
        if stage == "peer":
            model, source = load_peer(self.cfg(), self.run_dir("peer"), self.size), build_distributions(self.cfg())[0]
            specs = [s for s in SOLVERS_FULL if s != "dopri5"]
        else:
            run = load_run(self.run_dir(stage))
            model, source = run.model, run.source
            specs = ["euler:1", "euler:2", "euler:4"] if stage == "distill" else SOLVERS_FULL
        t0 = time.perf_counter()
        rows = evaluate_model(model, source, specs, stage=stage, n=a.n_fd, feats=feats, device=cpu, grid_dir=self.grids,
                              grid_specs=GRIDS.get(stage, ("euler:1", "euler:4")), bf16=True, batch_size=500, rtol=1e-3, log=log)
        x0 = source.sample(a.n_straight, generator=torch.Generator().manual_seed(777))
        with torch.no_grad():
            if stage == "distill":  # a one-step map: its coupling is (x0, x0 + v(x0, 0)); straightness is not defined
                x1, s_val = x0 + model(x0, torch.zeros(len(x0))), None
            else:
                s = straightness(model, x0, steps=100, batch_size=500)
                x1, s_val = s.x1, s.value
        tc = transport_cost(x0.flatten(1), x1.flatten(1), exact_ot=True)
        extra = {"straightness": s_val, "transport_cost": tc.cost, "ot_cost": tc.ot_cost, "n_straight": a.n_straight}
        return {"stage": stage, "rows": rows, **extra, "eval_s": time.perf_counter() - t0, "peak_rss_gib": peak_rss_gib()}

    # -- the report --------------------------------------------------------------------------------

    def write(self) -> None:
        a = self.args
        d = {name: self.done(name) for name in ["classifier", "1rf", "peer", "eval-1rf", "eval-peer", "pairs-1rf", "2rf", "eval-2rf", "pairs-2rf", "distill", "eval-distill"]}
        speed = [self.done(f"speed-{impl}-{mode}-{rep}") for rep in (0, 1) for impl in ("ours", "peer") for mode in ("fp32", "bf16")]
        machine = machine_info()
        md = render(machine, d, speed, a)
        payload = {"machine": machine, "phases": d, "speed": speed, "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(a).items()}}
        js, mdp = write_results(a.out, a.name, np_json(payload), md)
        side_by_side(self.grids, [("1rf_euler1.png", "1-RF, 1 step"), ("2rf_euler1.png", "2-RF, 1 step"), ("distill_euler1.png", "distilled, 1 step"),
                                  ("1rf_euler100.png", "1-RF, 100 steps")], self.grids / "one_step_side_by_side.png")
        runs = [self.run_dir(s) for s in ("1rf", "2rf", "distill") if (self.run_dir(s) / "config.json").is_file()]
        if runs:
            build_report(runs, a.out / f"{a.name}_report.html", title="CIFAR-10 16x16 on a CPU: 1-RF -> 2-RF -> distilled")
        print(md)
        log(f"wrote {js} and {mdp}")


def side_by_side(folder: Path, panels: list[tuple[str, str]], out: Path) -> Path | None:
    """The named grids of ``folder`` in one row with a caption over each (None if any is missing)."""
    paths = [folder / name for name, _ in panels]
    if not all(p.is_file() for p in paths):
        return None
    images = [Image.open(p).convert("RGB") for p in paths]
    gap, top = 12, 18
    canvas = Image.new("RGB", (sum(im.width for im in images) + gap * (len(images) - 1), max(im.height for im in images) + top), "white")
    draw, x = ImageDraw.Draw(canvas), 0
    for im, (_, caption) in zip(images, panels):
        canvas.paste(im, (x, top))
        draw.text((x + 2, 3), caption, fill="black")
        x += im.width + gap
    canvas.save(out)
    return out


def best_speed(speed: list[dict | None], impl: str, mode: str) -> dict | None:
    rows = [r for r in speed if r and r["impl"] == impl and r["mode"] == mode]
    if not rows:
        return None
    return {"train_img_per_s": max(r["train_img_per_s"] for r in rows), "forward_img_nfe_per_s": max(r["forward_img_nfe_per_s"] for r in rows),
            "peak_rss_gib": max(r["peak_rss_gib"] for r in rows), "params": rows[0]["params"]}


def render(machine: dict, d: dict, speed: list, a: argparse.Namespace) -> str:
    def f(v: Any, fmt: str = ".2f") -> str:
        return "-" if v is None else format(v, fmt) if isinstance(v, float) else str(v)

    out = [f"# CIFAR-10 {a.size}x{a.size} on a CPU: 1-RF -> 2-RF -> distillation, against TorchCFM{' (SMOKE RUN: tiny, meaningless numbers)' if a.smoke else ''}", "",
           machine_line(machine), "", "Produced by `benchmarks/cifar10_cpu.py` with the recipe `configs/cifar10-cpu.yaml`.", ""]
    out += ["## Speed, side by side (training at batch 64, forward at batch 256, 2 threads, best of 2 alternating runs)", "",
            "| UNet | params | precision | train img/s | forward img*NFE/s | peak RSS GiB |", "|---|---|---|---|---|---|"]
    sp = {(i, m): best_speed(speed, i, m) for i in ("ours", "peer") for m in ("fp32", "bf16")}
    for (i, m), r in sp.items():
        if r:
            out.append(f"| {'rectflow' if i == 'ours' else 'TorchCFM'} | {r['params'] / 1e6:.2f}M | {m} | {r['train_img_per_s']:.0f} | {r['forward_img_nfe_per_s']:.0f} | {r['peak_rss_gib']:.2f} |")
    if all(sp.values()):
        ratio = lambda i, m, key: sp[i][key] / sp[m][key]  # noqa: E731
        out += ["", f"Ratios (rectflow / TorchCFM): eager fp32 vs fp32: train {ratio(('ours', 'fp32'), ('peer', 'fp32'), 'train_img_per_s'):.2f}x, "
                f"forward {ratio(('ours', 'fp32'), ('peer', 'fp32'), 'forward_img_nfe_per_s'):.2f}x; our best (bf16) vs the peer's plain fp32: "
                f"train {ratio(('ours', 'bf16'), ('peer', 'fp32'), 'train_img_per_s'):.2f}x, forward {ratio(('ours', 'bf16'), ('peer', 'fp32'), 'forward_img_nfe_per_s'):.2f}x; "
                f"both in bf16: train {ratio(('ours', 'bf16'), ('peer', 'bf16'), 'train_img_per_s'):.2f}x, forward {ratio(('ours', 'bf16'), ('peer', 'bf16'), 'forward_img_nfe_per_s'):.2f}x."]
    c = d["classifier"]
    if c:
        out += ["", "## FD features", "", f"A VGG-style classifier ({c['feature_dim']}-d features) trained {c['seconds']:.0f} s ({c['steps']} steps of batch 128) on the "
                f"{a.size}x{a.size} train images: test accuracy {100 * c['test_accuracy']:.1f} %.  Every FD below is between {a.n_fd} generated images and the "
                f"statistics of the {c['n_ref']} test images; the floor (FD of {c['floor_n']} real train images) is **{c['floor_fd']:.3f}**."]
    out += ["", "## Stages", "", "| stage | train steps | train s | train img/s | pairs | pairs s | pair NFE (mean) | straightness S | transport cost E‖Z1-Z0‖² | OT cost of the same points | peak RSS GiB |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    for stage, pairs_of in (("1rf", None), ("peer", None), ("2rf", "pairs-1rf"), ("distill", "pairs-2rf")):
        t, e, p = d[stage], d[f"eval-{stage}"], d[pairs_of] if pairs_of else None
        if not t:
            continue
        rss = max(x["peak_rss_gib"] for x in (t, e, p) if x)
        name = {"1rf": "1-RF", "peer": "TorchCFM 1-RF", "2rf": "2-RF", "distill": "2-RF distilled"}[stage]
        out.append(f"| {name} | {t['steps']} | {t['train_s']:.0f} | {t['train_img_per_s']:.0f} | {f(p and p['pairs'])} | {f(p and p['pairs_s'], '.0f')} | "
                   f"{f(p and p['pairs_nfe_mean'], '.1f')} | {f(e and e['straightness'], '.4f')} | {f(e and e['transport_cost'], '.1f')} | {f(e and e['ot_cost'], '.1f')} | {rss:.2f} |")
    out += ["", "## FD vs NFE", "", "| stage | solver | NFE | FD | sampling img/s |", "|---|---|---|---|---|"]
    for stage in ("1rf", "peer", "2rf", "distill"):
        e = d[f"eval-{stage}"]
        for r in (e["rows"] if e else []):
            out.append(f"| {stage} | {r['solver']} | {r['nfe']} | {r['fd']:.3f} | {r['img_per_s']:.0f} |")
    out += ["", "Grids (64 samples each) are in `" + f"{a.name}_grids/" + "`; the chain's HTML report is `" + f"{a.name}_report.html" + "`.",
            "FD rows of fixed-step solvers sample under bf16 autocast; dopri5 (rtol = atol = 1e-3) in fp32.  Straightness and transport cost "
            f"from {a.n_straight} source draws, Euler 100 (the distilled map: its one step)."]
    out += ["", "## Goals", ""] + goals(d)
    return "\n".join(out)


def fd_at(d: dict, stage: str, solver: str) -> float | None:
    e = d.get(f"eval-{stage}")
    return next((r["fd"] for r in e["rows"] if r["solver"] == solver), None) if e else None


def goals(d: dict) -> list[str]:
    lines = []
    ours = {r["solver"]: r["fd"] for r in (d["eval-1rf"] or {}).get("rows", [])}
    peer = {r["solver"]: r["fd"] for r in (d["eval-peer"] or {}).get("rows", [])}
    common = [s for s in peer if s in ours]
    if common:
        met = all(ours[s] <= peer[s] for s in common)
        lines.append(f"- Our 1-RF FD <= TorchCFM's at every NFE after the same budget: {'met' if met else 'NOT met'} ("
                     + ", ".join(f"{s}: {ours[s]:.2f} vs {peer[s]:.2f}" for s in common) + ").")
    a1, b1, c100, dist1 = fd_at(d, "1rf", "euler:1"), fd_at(d, "2rf", "euler:1"), fd_at(d, "1rf", "euler:100"), fd_at(d, "distill", "euler:1")
    if a1 and b1:
        lines.append(f"- 2-RF one-step FD at least 3x better than the 1-RF's: {a1:.2f} / {b1:.2f} = {a1 / b1:.2f}x: {'met' if a1 / b1 >= 3 else 'NOT met'}.")
    s1, s2 = (d["eval-1rf"] or {}).get("straightness"), (d["eval-2rf"] or {}).get("straightness")
    if s1 and s2:
        lines.append(f"- Straightness at least 10x lower: {s1:.4f} / {s2:.4f} = {s1 / s2:.1f}x: {'met' if s1 / s2 >= 10 else 'NOT met'}.")
    if dist1 and c100:
        lines.append(f"- Distilled one-step FD within 1.5x of the 1-RF's 100-step FD: {dist1:.2f} / {c100:.2f} = {dist1 / c100:.2f}x: {'met' if dist1 / c100 <= 1.5 else 'NOT met'}.")
    return lines or ["- (no stage finished yet)"]


def main(argv: list[str] | None = None) -> int:
    ap = bench_args(__doc__.split("\n\n")[0], "cifar10_cpu", threads=2, threads_help="torch threads of a phase that runs alone",
                    formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train-zip", type=Path, default=DATA / "train.zip")
    ap.add_argument("--test-zip", type=Path, default=DATA / "test.zip")
    ap.add_argument("--size", type=int, default=16, help="image side after downsampling (default 16)")
    ap.add_argument("--budget-1rf", type=float, default=1800.0, help="1-RF (and TorchCFM) training seconds; the two train at once, one core each")
    ap.add_argument("--budget-2rf", type=float, default=900.0, help="2-RF training seconds")
    ap.add_argument("--budget-distill", type=float, default=600.0, help="distillation training seconds")
    ap.add_argument("--pairs", type=int, default=6000, help="dopri5 pairs per reflow / distillation stage")
    ap.add_argument("--n-fd", type=int, default=5000, help="generated images per FD")
    ap.add_argument("--n-straight", type=int, default=1000, help="source draws for straightness and transport cost")
    ap.add_argument("--clf-seconds", type=float, default=240.0, help="training seconds of the FD classifier")
    ap.add_argument("--clf-width", type=int, default=32, help="classifier width (features = 4 x width)")
    ap.add_argument("--speed-steps", type=int, default=12, help="timed steps per speed measurement")
    ap.add_argument("--override", action="append", default=[], help="extra config override for every stage (key=value), repeatable")
    ap.add_argument("--work", type=Path, default=RESULTS / "tmp" / "cifar10_cpu", help="runs, caches, phase results (git-ignored)")
    ap.add_argument("--smoke", action="store_true", help="tiny everything (test.zip only, seconds per stage): checks the script")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.smoke and args.worker is None:
        args.train_zip, args.size = args.test_zip, 8
        args.budget_1rf = args.budget_2rf = args.budget_distill = 6.0
        args.pairs, args.n_fd, args.n_straight, args.clf_seconds, args.speed_steps = 64, 128, 64, 3.0, 2
        args.name += "_smoke"
        args.override += ["model.channels=32", "model.channel_mult=[1,2]", "train.log_every=5", "train.ckpt_every=10"]
    for p in (args.train_zip, args.test_zip):
        if not Path(p).is_file():
            print(f"error: {p}: CIFAR-10 ZIP not found (see ../shared/data/cifar10-jpeg/README.md)", file=sys.stderr)
            return 2
    bench = Bench(args)
    if args.worker:
        torch.set_num_threads(args.threads)
        phase = args.worker
        result = bench.worker(phase.rsplit("-", 1)[0] if phase.startswith("speed-") else phase)
        bench.finish(phase, {**result, "threads": args.threads})
        log(f"phase {phase} done")
        return 0
    speed = [[f"speed-{impl}-{mode}-{rep}"] for rep in (0, 1) for mode in ("fp32", "bf16") for impl in ("ours", "peer")]
    bench.run_phases([*speed, ["classifier"], ["1rf", "peer"], ["eval-1rf", "eval-peer"], ["pairs-1rf"], ["2rf"], ["eval-2rf"],
                      ["pairs-2rf"], ["distill"], ["eval-distill"]])
    bench.write()
    return 0


if __name__ == "__main__":
    sys.exit(main())
