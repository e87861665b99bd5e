"""Every GPU number in one command: given one CUDA GPU and about 9 minutes, run the GPU-only tests,
the GPU-path checks, throughput and a short CIFAR-10 1-RF, and write everything as JSON to one folder.

    .venv/bin/python benchmarks/gpu_check.py --out gpu_check          # on the GPU machine (~9 min)
    .venv/bin/python benchmarks/gpu_check.py --smoke --out /tmp/gc    # tiny sizes on the CPU: checks the script

Checks, in order (each is recorded even when it fails; a check that would start after the time
budget is skipped and says so):

1. ``tests``: ``pytest -m gpu`` (the tests skipped on CPU machines).
2. ``resume_layout``: channels-last + fused AdamW, train, checkpoint, resume, train on: the resumed
   optimizer state must have each parameter's layout (fused AdamW refuses mixed layouts).
3. ``syncs``: host-device synchronisations per training step (``set_sync_debug_mode("warn")``).
4. ``recompiles``: graphs compiled and graph breaks over 30 compiled trainer steps, then over 3 calls
   of a compiled guided (classifier-free) sampler.
5. ``attention``: which scaled-dot-product kernels accept the UNet's attention inputs, and their strides.
6. ``parity``: one training step and an Euler-10 sample in bf16 + compile vs fp32 eager (relative
   differences of loss, gradient norm and samples).
7. ``pair_batch``: peak memory of a no-grad fp32 solve step of the 35.7M UNet at growing batches: the
   largest batch that fits with 20 % headroom (compare ``rectflow.reflow.pairs.default_solve_batch``).
8. ``dopri5``: NFE of the same dopri5 solve on the GPU and on the CPU at the same tolerance.
9. ``throughput``: ``benchmarks/throughput.py`` at batch 128 and at batch 512, each in a fresh process.
10. ``cifar10``: ``benchmarks/cifar10.py --only-1rf`` with a 4-minute 1-RF, FD at Euler 1/4/100.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import traceback
import warnings
from pathlib import Path
from typing import Any, Callable

import torch

from _bench import RESULTS, ROOT, bench_args
from _machine import machine_info
from rectflow.data.image_sets import ImageGaussian, make_image_distribution
from rectflow.engine.checkpoint import latest_checkpoint, load_optimizer_state, read_checkpoint
from rectflow.engine.io import atomic_path
from rectflow.engine.trainer import TrainConfig, Trainer
from rectflow.flow.couplings import IndependentCoupling
from rectflow.flow.losses import FlowMatchingObjective
from rectflow.flow.sampling import sample_model
from rectflow.images.conditional import GuidedVelocity
from rectflow.images.generate import FixedStepSampler
from rectflow.models import UNetVelocity
from rectflow.reflow.pairs import default_solve_batch


class Check:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.device = torch.device("cpu" if args.smoke else "cuda")
        self.cuda = self.device.type == "cuda"
        self.t0 = time.perf_counter()
        self.results: dict[str, Any] = {"machine": machine_info(), "smoke": args.smoke, "torch": torch.__version__}
        if self.cuda:
            self.results["gpu"] = torch.cuda.get_device_name(self.device)

    # -- helpers -----------------------------------------------------------------------------------

    def unet(self, classes: int = 0) -> UNetVelocity:
        torch.manual_seed(0)
        if self.args.smoke:
            return UNetVelocity(3, 16, channels=16, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(8,), head_channels=16, num_classes=classes)
        return UNetVelocity(num_classes=classes)  # the CIFAR-10 recipe's 35.7M UNet

    def size(self) -> int:
        return 16 if self.args.smoke else 32

    def trainer(self, run_dir: Path | None, steps: int, **kw: Any) -> Trainer:
        s = self.size()
        target = make_image_distribution({"name": "gaussian", "shape": [3, s, s], "std": 0.5})
        cfg = dict(steps=steps, batch_size=8 if self.args.smoke else 128, lr=2e-4, optimizer="adamw", warmup_steps=0, grad_clip=1.0,
                   ema_decay=0.999, precision="bf16" if self.cuda else "fp32", channels_last=True, compile=False, workers=0,
                   log_every=10, ckpt_every=10**9, progress=False, device=str(self.device), seed=0)
        cfg.update(kw)
        return Trainer(self.unet(), FlowMatchingObjective(IndependentCoupling(ImageGaussian((3, s, s)), target)), TrainConfig(**cfg), run_dir,
                       model_config={"gpu_check": 1})

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def run(self, name: str, fn: Callable[[], dict], est_s: float) -> None:
        left = self.args.budget_s - (time.perf_counter() - self.t0)
        if left < est_s:
            self.results[name] = {"skipped": f"needs ~{est_s:.0f} s, {left:.0f} s of the budget left"}
            print(f"[{name}] skipped (budget)", flush=True)
            return
        t = time.perf_counter()
        try:
            out = fn()
            out["ok"] = out.get("ok", True)
        except Exception as e:  # noqa: BLE001 - a failing check is a result, and the others still run
            out = {"ok": False, "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc(limit=6)}
        out["seconds"] = time.perf_counter() - t
        self.results[name] = out
        print(f"[{name}] {'ok' if out['ok'] else 'FAILED'} ({out['seconds']:.0f} s)", flush=True)
        self.save()

    def save(self) -> None:
        out = self.args.out / "gpu_check.json"
        with atomic_path(out) as tmp:
            tmp.write_text(json.dumps(self.results, indent=1, default=str))

    def subprocess(self, cmd: list[str], timeout: float) -> dict:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
        return {"rc": r.returncode, "ok": r.returncode == 0, "tail": (r.stdout + r.stderr)[-3000:]}

    # -- checks ------------------------------------------------------------------------------------

    def tests(self) -> dict:
        return self.subprocess([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "gpu", "tests"], timeout=240)

    def resume_layout(self) -> dict:
        d = self.args.out / "resume_layout"
        kw = {"ckpt_every": 2}
        self.trainer(d, 2, **kw).fit()
        tr = self.trainer(d, 4, **kw)
        tr.fit()  # resumes at step 2 (fused AdamW on CUDA raises here on mixed layouts)
        ck = read_checkpoint(latest_checkpoint(d))
        fresh = self.trainer(None, 1)
        load_optimizer_state(fresh.optimizer, ck)
        mismatched = [tuple(p.shape) for p in fresh.model.parameters() for v in fresh.optimizer.state[p].values()
                      if isinstance(v, torch.Tensor) and v.shape == p.shape and v.stride() != p.stride()]
        fused = any(g.get("fused") for g in fresh.optimizer.param_groups)
        return {"resumed_to": tr.step, "fused_adamw": fused, "state_layout_mismatches": len(mismatched), "ok": tr.step == 4 and not mismatched}

    def syncs(self) -> dict:
        tr = self.trainer(None, 8)
        tr.fit()  # warm-up (allocations, cuDNN plans)
        tr.cfg.steps = 18
        if not self.cuda:
            return {"note": "CPU: no host-device synchronisation to count", "ok": True}
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                tr.fit()
            finally:
                torch.cuda.set_sync_debug_mode(0)
        msgs = [str(w.message).splitlines()[0] for w in caught if "synchroniz" in str(w.message).lower()]
        return {"steps": 10, "syncs": len(msgs), "syncs_per_step": len(msgs) / 10, "examples": sorted(set(msgs))[:5]}

    def recompiles(self) -> dict:
        from torch._dynamo.utils import counters  # dynamo's own counters: the only record of recompiles

        torch._dynamo.reset()
        counters.clear()
        real_compile = torch.compile
        if self.args.smoke:  # dynamo's graph counting does not depend on the backend; skip inductor's CPU build
            torch.compile = lambda model, **kw: real_compile(model, **{**kw, "backend": "eager"})
        try:
            tr = self.trainer(None, 30, compile=True, log_every=10**9)
            tr.fit()
        finally:
            torch.compile = real_compile
        train_graphs = dict(counters["stats"])
        breaks = sum(counters["graph_break"].values())
        counters.clear()
        model = self.unet(classes=10).to(self.device).eval()
        s, n = self.size(), 8
        sampler = torch.compile(FixedStepSampler(GuidedVelocity(model, torch.arange(n, device=self.device) % 10, 2.0), "euler", 4), dynamic=False,
                                **({"backend": "eager"} if self.args.smoke else {}))
        with torch.no_grad():
            for i in range(3):
                sampler(torch.randn(n, 3, s, s, device=self.device, generator=torch.Generator(self.device).manual_seed(i)))
        guided = dict(counters["stats"])
        return {"trainer_30_steps": train_graphs, "trainer_graph_breaks": breaks, "guided_3_calls": guided,
                "guided_graph_breaks": sum(counters["graph_break"].values()),
                "ok": guided.get("unique_graphs", 0) <= 1 and train_graphs.get("unique_graphs", 0) <= 2}

    def attention(self) -> dict:
        from torch.nn.attention import SDPBackend, sdpa_kernel  # the kernel selector (torch >= 2.3)

        model = self.unet().to(self.device)
        block = next(m for m in model.modules() if type(m).__name__ == "AttentionBlock")
        captured: dict[str, Any] = {}
        real = torch.nn.functional.scaled_dot_product_attention

        def spy(q, k, v, *a, **kw):
            captured.update(q=q, k=k, v=v)
            return real(q, k, v, *a, **kw)

        torch.nn.functional.scaled_dot_product_attention = spy
        try:
            s = self.size()
            with torch.no_grad(), torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.cuda):
                model(torch.randn(2, 3, s, s, device=self.device), torch.rand(2, device=self.device))
        finally:
            torch.nn.functional.scaled_dot_product_attention = real
        if not captured:
            return {"note": "the attention block does not call scaled_dot_product_attention", "block": repr(block)[:200]}
        q, k, v = captured["q"], captured["k"], captured["v"]
        out = {"q_shape": list(q.shape), "q_stride": list(q.stride()), "dtype": str(q.dtype)}
        for name, backend in (("flash", SDPBackend.FLASH_ATTENTION), ("efficient", SDPBackend.EFFICIENT_ATTENTION), ("math", SDPBackend.MATH)):
            try:
                with sdpa_kernel(backend), torch.no_grad():
                    real(q, k, v)
                out[name] = "runs"
            except RuntimeError as e:
                out[name] = f"refused: {str(e).splitlines()[0][:160]}"
        return out

    def perturbed_unet(self) -> UNetVelocity:
        """The UNet with seeded noise on every weight: a non-trivial field (the zero-initialised output
        layer would make every sample equal its start and every dopri5 solve one step)."""
        model = self.unet()
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.02 * torch.randn(p.shape, generator=g))
        return model

    def parity(self) -> dict:
        s = self.size()
        g = torch.Generator().manual_seed(0)
        x1 = (0.5 * torch.randn(16, 3, s, s, generator=g)).to(self.device)
        x0 = torch.randn(16, 3, s, s, generator=g).to(self.device)
        t = torch.rand(16, generator=g).to(self.device)
        xt = (1 - t[:, None, None, None]) * x0 + t[:, None, None, None] * x1
        res = {}
        for mode in ("fp32", "fast"):
            fast = mode == "fast"
            model = self.perturbed_unet().to(self.device)
            f = torch.compile(model, dynamic=False) if fast and self.cuda else model
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=fast):
                loss = (f(xt, t).float() - (x1 - x0)).square().mean()
            loss.backward()
            gnorm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters() if p.grad is not None]))
            with torch.no_grad(), torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=fast):
                sample = FixedStepSampler(f, "euler", 10)(x0).float()
            res[mode] = (float(loss.detach()), float(gnorm), sample)
        (l0, g0, s0), (l1, g1, s1) = res["fp32"], res["fast"]
        rel = float((s1 - s0).norm() / s0.norm())
        return {"loss_rel_diff": abs(l1 - l0) / abs(l0), "grad_norm_rel_diff": abs(g1 - g0) / abs(g0), "euler10_sample_rel_diff": rel,
                "ok": abs(l1 - l0) / abs(l0) < 0.05 and rel < 0.05}

    def pair_batch(self) -> dict:
        s = self.size()
        model = self.unet().to(self.device).eval()
        rows, best = [], None
        total = torch.cuda.get_device_properties(self.device).total_memory if self.cuda else None
        for b in ([64, 128] if self.args.smoke else [512, 1024, 2048, 4096, 8192, 16384]):
            try:
                if self.cuda:
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats(self.device)
                with torch.no_grad():
                    model(torch.randn(b, 3, s, s, device=self.device), torch.rand(b, device=self.device))
                self.sync()
                peak = torch.cuda.max_memory_allocated(self.device) if self.cuda else None
                rows.append({"batch": b, "peak_gib": peak / 2**30 if peak else None})
                if total is None or peak < 0.8 * total:
                    best = b
            except torch.cuda.OutOfMemoryError:
                rows.append({"batch": b, "oom": True})
                break
        return {"rows": rows, "largest_with_20pct_headroom": best, "default_solve_batch": default_solve_batch((3, s, s))}

    def dopri5(self) -> dict:
        s = self.size()
        model = self.perturbed_unet()
        x0 = torch.randn(8, 3, s, s, generator=torch.Generator().manual_seed(0))
        out = {}
        for dev in ["cpu", str(self.device)] if self.cuda else ["cpu"]:
            m = model.to(dev).eval()
            with torch.no_grad():
                r = sample_model(m, x0.to(dev), method="dopri5", rtol=1e-3, atol=1e-3)
            out[dev] = {"nfe": r.nfe, "x": r.x.float().cpu()}
        rows = {k: v["nfe"] for k, v in out.items()}
        if len(out) == 2:
            a, b = (v["x"] for v in out.values())
            rows["rel_diff"] = float((a - b).norm() / a.norm())
        return rows

    def throughput(self) -> dict:
        res = {}
        for batch in ("128", "512"):
            cmd = [sys.executable, "benchmarks/throughput.py", "--batches", batch, "--out", str(self.args.out), "--name", f"throughput_b{batch}"]
            if self.args.smoke:
                cmd += ["--cpu-smoke", "--steps", "2", "--warmup", "1", "--parts-reps", "1", "--sample-reps", "1"]
            res[batch] = self.subprocess(cmd, timeout=200)
            js = self.args.out / f"throughput_b{batch}{'_cpu_smoke' if self.args.smoke else ''}.json"
            if js.is_file():
                res[batch]["results"] = json.loads(js.read_text())
        res["ok"] = all(r["ok"] for r in res.values() if isinstance(r, dict))
        return res

    def cifar10(self) -> dict:
        cmd = [sys.executable, "benchmarks/cifar10.py", "--only-1rf", "--solvers-1rf", "euler:1,euler:4,euler:100", "--out", str(self.args.out), "--name", "cifar10_4min"]
        cmd += ["--cpu-smoke"] if self.args.smoke else ["--budget-1rf", "240", "--clf-seconds", "30", "--n-fd", "5000"]
        r = self.subprocess(cmd, timeout=480)
        js = self.args.out / ("cifar10_4min_cpu_smoke.json" if self.args.smoke else "cifar10_4min.json")
        if js.is_file():
            r["results"] = json.loads(js.read_text())
        return r


def main(argv: list[str] | None = None) -> int:
    ap = bench_args(__doc__.split("\n\n")[0], out=RESULTS / "gpu_check", out_help="folder for every result",
                    formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budget-s", type=float, default=540.0, help="stop starting checks after this many seconds (default 540)")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU: checks that the script runs")
    ap.add_argument("--only", help="comma-separated check names to run (default: all)")
    args = ap.parse_args(argv)
    if not args.smoke and not torch.cuda.is_available():
        print("error: benchmarks/gpu_check.py needs a CUDA device (use --smoke to check the script on the CPU)", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    c = Check(args)
    steps = [("tests", c.tests, 30), ("resume_layout", c.resume_layout, 10), ("syncs", c.syncs, 10), ("recompiles", c.recompiles, 60),
             ("attention", c.attention, 5), ("parity", c.parity, 30), ("pair_batch", c.pair_batch, 10), ("dopri5", c.dopri5, 10),
             ("throughput", c.throughput, 120), ("cifar10", c.cifar10, 300)]
    only = set(args.only.split(",")) if args.only else {name for name, _, _ in steps}
    unknown = only - {name for name, _, _ in steps}
    if unknown:
        print(f"error: --only: unknown check(s) {sorted(unknown)}; choose from {[name for name, _, _ in steps]}", file=sys.stderr)
        return 2
    for name, fn, est in steps:
        if name in only:
            c.run(name, fn, 0 if args.smoke else est)
    c.save()
    failed = [k for k, v in c.results.items() if isinstance(v, dict) and v.get("ok") is False]
    print(f"wrote {args.out / 'gpu_check.json'}; " + (f"FAILED: {', '.join(failed)}" if failed else "every check ran"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
