"""PeRFlow on a trained text-to-image pipeline (the teacher of ``t2i_teacher.py``): 25 steps -> 4, prompt fidelity, and the
delta carried to a fine-tune.

Phases (each writes ``WORK/phases/NAME.json`` when done and is skipped on a rerun; training phases resume). They run
seed by seed, and within a seed the guidance mode whose delta the plug-and-play study carries (``teacher``) first, so
that a first whole table exists early:

1. ``captions`` -- ``--n-captioned`` CIFAR-10 training images (equal per class) at the teacher's size as PNGs with a
   ``metadata.jsonl`` ("a photo of a {class}"): the data of ``rectflow perflow``.
2. ``perflow-MODE-sSEED`` -- ``rectflow perflow TEACHER --data captions -K 4 --guidance W --guidance-mode MODE --seed SEED``
   through the command line, for each guidance mode (``teacher``: w in the teacher's window solve, the student samples
   at w = 1; ``student``: the student learns with caption dropout and samples with CFG at w) and seed.
3. ``eval-sSEED-teacher`` / ``eval-sSEED-perflow-MODE`` -- the table, every method at guidance w, all through stock
   diffusers (``StableDiffusionPipeline.from_pretrained``; the PeRFlow export with ``trust_remote_code=True``): teacher
   DPM-Solver++ 25 steps, teacher DDIM 4 and 8, PeRFlow 4 and 8 steps for each mode. FD in the CIFAR classifier's
   features (``--n-fd`` samples, equal per prompt, against the test set), prompt accuracy (share of samples the
   classifier assigns to the prompted class), seconds per image. The sampling noise depends on the seed.
4. ``derivative`` -- the teacher fine-tuned into a derivative (grayscale CIFAR-10, ``--derivative-steps``), the way a
   user fine-tunes SD: same objective, caption dropout, EMA.
5. ``plug-sSEED`` -- the base's PeRFlow delta (guidance mode teacher) and its LoRA, unchanged, on the derivative
   (``apply_delta`` and diffusers' own ``load_lora_weights``), sampled in 4 steps with the export's ``PeRFlowScheduler``,
   against the derivative's own DPM-Solver++ 25 steps and DDIM 4: FD against grayscale test images, prompt accuracy.

Results: ``benchmarks/results/t2i_perflow.{md,json}`` and grids (teacher 25 / DDIM 4 / PeRFlow 4, a row per prompt).

    python benchmarks/t2i_perflow.py --teacher-work /path/of/t2i_teacher/work --work /path/outside/the/checkout
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from _bench import mean_each, ratios, write_results, write_rows
from _cifar10 import FeatureStats
from _machine import machine_info, machine_line
from _phases import PhasedBench, log, phased_args
from rectflow.data.image_sets import ImageArray, to_unit_range
from rectflow.engine.io import atomic_path
from rectflow.engine.trainer import TrainConfig, Trainer
from rectflow.images.classifier_features import CifarClassifier, load_cifar_classifier
from t2i_teacher import CLASSES, EpsilonObjective, encode_latents, encode_prompts, prompt

MODES = ("teacher", "student")
T25, D4 = ("teacher DPM-Solver++", 25), ("teacher DDIM", 4)  # the goal lines' reference rows


def gray(x: Tensor) -> Tensor:
    """Images (N, 3, H, W) in [-1, 1] -> their luminance in all three channels (the derivative's domain)."""
    y = 0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]
    return y[:, None].expand(-1, 3, -1, -1).contiguous()


class Bench(PhasedBench):
    def __init__(self, a: argparse.Namespace) -> None:
        super().__init__(a)
        self.teacher = a.teacher_work / "teacher"

    def data(self, split: str) -> ImageArray:
        return self.cifar(split, smoke_n=400)

    def classifier(self) -> CifarClassifier:
        if "clf" not in self._cache:
            self._cache["clf"], _ = load_cifar_classifier(self.a.teacher_work / "classifier.safetensors")
        return self._cache["clf"]

    def feats(self, domain: str) -> FeatureStats:
        key = f"feats-{domain}"
        if key not in self._cache:
            test = to_unit_range(self.data("test").images)
            self._cache[key] = FeatureStats("fd", self.classifier(), gray(test) if domain == "gray" else test, torch.device("cpu"))
        return self._cache[key]

    # ----- 1. captions
    def captions(self) -> dict:
        from PIL import Image

        from rectflow.data.image_sets import to_uint8

        folder = self.work / "captions"
        folder.mkdir(parents=True, exist_ok=True)
        d = self.data("train")
        per = self.a.n_captioned // 10
        rows = []
        for c in range(10):
            idx = torch.nonzero(d.labels == c).flatten()[:per]
            for i in idx.tolist():
                name = f"{CLASSES[c]}_{i:05d}.png"
                Image.fromarray(to_uint8(to_unit_range(d.images[i:i + 1]))[0].permute(1, 2, 0).numpy()).save(folder / name)
                rows.append({"file_name": name, "text": prompt(c)})
        write_rows(folder / "metadata.jsonl", rows)
        return {"n": len(rows), "folder": str(folder)}

    # ----- 2. PeRFlow through the CLI
    def levers(self) -> list[tuple[int, int]]:
        """(training steps, solver steps per window) of the main runs, then of each lever run."""
        a = self.a
        return [(a.steps, a.solver_steps), *((n, a.solver_steps) for n in a.lever_steps), *((a.steps, m) for m in a.lever_solver_steps)]

    def suffix(self, lever: tuple[int, int] | None) -> str:
        """A lever run's name tail: ``-steps1500``, ``-solver24``; the main runs have none."""
        steps, solver = lever or (self.a.steps, self.a.solver_steps)
        return (f"-steps{steps}" if steps != self.a.steps else "") + (f"-solver{solver}" if solver != self.a.solver_steps else "")

    def perflow_out(self, mode: str, seed: int, lever: tuple[int, int] | None = None) -> Path:
        return self.work / f"perflow-{mode}-s{seed}{self.suffix(lever)}"

    def perflow(self, mode: str, seed: int, lever: tuple[int, int] | None = None) -> dict:
        """Distil through the CLI; a ``lever`` (training steps, solver steps per window) replaces those flags, in its own folder."""
        a = self.a
        steps, solver = lever or (a.steps, a.solver_steps)
        out = self.perflow_out(mode, seed, lever)
        cmd = [sys.executable, "-m", "rectflow.cli", "perflow", str(self.teacher), "--data", str(self.work / "captions"), "--out", str(out),
               "-K", "4", "--guidance", str(a.guidance), "--guidance-mode", mode, "--solver-steps", str(solver), "--steps", str(steps),
               "--batch-size", str(a.batch), "--lr", str(a.lr), "--seed", str(seed), "--lora-rank", str(a.lora_rank), "--precision", a.precision,
               "--device", "cpu", "--prompt", prompt(0), "--prompt", prompt(3), "-q"]
        env = {**os.environ, "OMP_NUM_THREADS": str(a.threads)}
        log("  " + shlex.join(["rectflow", *cmd[3:]]))
        subprocess.run(cmd, check=True, env=env)
        rec = json.loads((out / "perflow.json").read_text())
        rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
        return {"command": shlex.join(["rectflow", *cmd[3:]]), "steps": rec["steps_done"], "lora": rec.get("lora"),
                "train_seconds": sum(r["ms_per_step"] * r["steps"] for r in rows) / 1e3, "curve": [[r["step"], r["loss"]] for r in rows]}

    # ----- sampling through stock diffusers
    def sample(self, pipe, steps: int, w: float, seed: int, per_prompt: int | None = None) -> tuple[Tensor, list[int], float]:
        per = per_prompt or self.a.n_fd // 10
        pipe.set_progress_bar_config(disable=True)
        imgs, labels = [], []
        t0 = time.perf_counter()
        for c in range(10):
            g = torch.Generator().manual_seed(10_000 * seed + c)
            for k in range(0, per, 250):
                n = min(250, per - k)
                with torch.no_grad():
                    out = pipe([prompt(c)] * n, height=self.a.size, width=self.a.size, num_inference_steps=steps, guidance_scale=w,
                               generator=g, output_type="pt").images
                imgs.append(out.float() * 2 - 1)
                labels += [c] * n
        return torch.cat(imgs), labels, (time.perf_counter() - t0) / (10 * per)

    def score(self, x: Tensor, labels: list[int], domain: str) -> dict:
        with torch.no_grad():
            pred = torch.cat([self.classifier().logits(xb).argmax(1) for xb in x.split(500)])
        return {"fd": self.feats(domain).fd(x), "prompt_accuracy": float((pred == torch.tensor(labels)).float().mean())}

    def grid(self, rows: list[tuple[str, Tensor, list[int]]], path: Path, per: int = 8) -> None:
        """One row per prompt; the methods side by side within a row (``per`` samples each)."""
        from rectflow.images.generate import save_image_grid

        picks = []
        for c in range(10):
            for _, x, labels in rows:
                lab = torch.tensor(labels)
                picks.append(x[lab == c][:per])
        save_image_grid(torch.cat(picks), path, nrow=per * len(rows), scale=2)
        (path.with_suffix(".txt")).write_text("columns, left to right: " + " | ".join(name for name, _, _ in rows) + "\n")

    def keep_picks(self, key: str, x: Tensor, labels: list[int], per: int = 8) -> None:
        """The first ``per`` samples of each prompt, kept in the work folder for the grids (phases run apart)."""
        from safetensors.torch import save_file

        lab = torch.tensor(labels)
        with atomic_path(self.work / "picks" / f"{key}.safetensors") as tmp:
            save_file({"x": torch.cat([x[lab == c][:per] for c in range(10)]).contiguous(),
                       "labels": torch.cat([lab[lab == c][:per] for c in range(10)]).contiguous()}, str(tmp))

    def grid_from_picks(self, keys: list[tuple[str, str]], path: Path) -> bool:
        """The grid of the kept picks ``(name, key)`` once all of them exist; False while one is missing."""
        from safetensors.torch import load_file

        files = [self.work / "picks" / f"{key}.safetensors" for _, key in keys]
        if not all(f.is_file() for f in files):
            return False
        rows = []
        for (name, _), f in zip(keys, files):
            d = load_file(str(f))
            rows.append((name, d["x"], d["labels"].tolist()))
        self.grid(rows, path)
        return True

    def teacher_grid(self, seed: int) -> bool:
        return self.grid_from_picks([("teacher DPM-Solver++ 25", f"s{seed}-teacher-25"), ("teacher DDIM 4", f"s{seed}-ddim-4"),
                                     ("PeRFlow 4 (guidance mode teacher)", f"s{seed}-perflow-teacher-4")], self.a.out / f"{self.a.name}_grid_s{seed}.png")

    # ----- 3. the table, one phase per (seed, method family): a kill loses at most one family's sampling
    def evaluate_teacher(self, seed: int) -> dict:
        from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, StableDiffusionPipeline

        a, rows = self.a, []
        teacher = StableDiffusionPipeline.from_pretrained(str(self.teacher))
        base = teacher.scheduler.config
        runs = [("teacher DPM-Solver++", DPMSolverMultistepScheduler.from_config(base, algorithm_type="dpmsolver++"), 25, "teacher-25"),
                ("teacher DDIM", DDIMScheduler.from_config(base), 4, "ddim-4"), ("teacher DDIM", DDIMScheduler.from_config(base), 8, None)]
        for name, sched, steps, key in runs:
            teacher.scheduler = sched
            x, labels, spi = self.sample(teacher, steps, a.guidance, seed)
            rows.append({"method": name, "steps": steps, "nfe": steps * (2 if a.guidance != 1 else 1), **self.score(x, labels, "color"), "s_per_image": spi})
            log(f"  {name} {steps}: FD {rows[-1]['fd']:.3f}, accuracy {rows[-1]['prompt_accuracy']:.3f}")
            if key:
                self.keep_picks(f"s{seed}-{key}", x, labels)
        self.teacher_grid(seed)
        return {"rows": rows, "guidance": a.guidance, "n": a.n_fd}

    def evaluate_perflow(self, seed: int, mode: str, lever: tuple[int, int] | None = None) -> dict:
        """PeRFlow at 4 and 8 steps through stock diffusers; a lever run at 4 only."""
        from diffusers import StableDiffusionPipeline

        a, rows = self.a, []
        export = self.perflow_out(mode, seed, lever) / "diffusers"
        student = StableDiffusionPipeline.from_pretrained(str(export), trust_remote_code=True)
        w = 1.0 if mode == "teacher" else a.guidance  # mode teacher: the guidance is in the student's weights
        if lever:
            x, labels, spi = self.sample(student, 4, w, seed)
            log(f"  PeRFlow {mode}, {lever[0]} training steps, {lever[1]} solver steps per window, 4: FD {(r := self.score(x, labels, 'color'))['fd']:.3f}")
            return {"rows": [{"method": f"PeRFlow (guidance mode {mode})", "steps": 4, "train_steps": lever[0], "solver_steps": lever[1], **r,
                              "s_per_image": spi}]}
        for steps in (4, 8):
            x, labels, spi = self.sample(student, steps, w, seed)
            rows.append({"method": f"PeRFlow (guidance mode {mode})", "steps": steps, "nfe": steps * (2 if w != 1 else 1),
                         **self.score(x, labels, "color"), "s_per_image": spi})
            log(f"  PeRFlow {mode} {steps}: FD {rows[-1]['fd']:.3f}, accuracy {rows[-1]['prompt_accuracy']:.3f}")
            if steps == 4:
                self.keep_picks(f"s{seed}-perflow-{mode}-4", x, labels)
        self.teacher_grid(seed)
        return {"rows": rows, "guidance": a.guidance, "n": a.n_fd}

    # ----- 4. the derivative
    def derivative(self) -> dict:
        import shutil

        from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTokenizer

        a = self.a
        vae = AutoencoderKL.from_pretrained(str(self.teacher / "vae")).eval()
        lat_path = self.work / "gray_latents.safetensors"
        if not lat_path.is_file():
            encode_latents(vae, gray(to_unit_range(self.data("train").images)), self.data("train").labels, lat_path)
        from safetensors.torch import load_file

        lat = load_file(str(lat_path))
        tok = CLIPTokenizer.from_pretrained(str(self.teacher / "tokenizer"))
        te = CLIPTextModel.from_pretrained(str(self.teacher / "text_encoder")).eval()
        obj = EpsilonObjective(lat["mean"], lat["std"], lat["labels"].long(), encode_prompts(tok, te, [prompt(c) for c in range(10)]),
                               encode_prompts(tok, te, [""])[0], vae.config.scaling_factor, drop=0.1)
        unet = UNet2DConditionModel.from_pretrained(str(self.teacher / "unet"))
        cfg = TrainConfig(steps=a.derivative_steps, batch_size=128, lr=1e-4, optimizer="adamw", warmup_steps=50, lr_schedule="constant",
                          ema_decay=0.999, precision=a.precision, log_every=50, ckpt_every=200, device="cpu", progress=False, seed=0)
        tr = Trainer(unet, obj, cfg, self.work / "derivative-run", model_config={"derivative": "grayscale"})
        t0 = time.perf_counter()
        tr.fit()
        folder = self.work / "derivative"
        tmp = self.work / ".derivative.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        pipe = StableDiffusionPipeline.from_pretrained(str(self.teacher))
        pipe.unet = tr.eval_model
        pipe.save_pretrained(str(tmp))
        shutil.rmtree(folder, ignore_errors=True)
        tmp.replace(folder)
        return {"steps": tr.step, "this_call_seconds": time.perf_counter() - t0, "domain": "grayscale CIFAR-10"}

    # ----- 5. plug and play
    def plug(self, seed: int) -> dict:
        from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, StableDiffusionPipeline

        a, rows, shown = self.a, [], []
        folder = self.work / "derivative"
        deriv = StableDiffusionPipeline.from_pretrained(str(folder))
        deriv.scheduler = DPMSolverMultistepScheduler.from_config(deriv.scheduler.config, algorithm_type="dpmsolver++")
        x, labels, spi = self.sample(deriv, 25, a.guidance, seed)
        rows.append({"method": "derivative DPM-Solver++", "steps": 25, **self.score(x, labels, "gray"), "s_per_image": spi})
        shown.append(("derivative 25", x, labels))
        rows += self.plug_deltas(seed, "teacher", shown)
        deriv.scheduler = DDIMScheduler.from_config(deriv.scheduler.config)
        x, labels, spi = self.sample(deriv, 4, a.guidance, seed)
        rows.append({"method": "derivative DDIM", "steps": 4, **self.score(x, labels, "gray"), "s_per_image": spi})
        shown.insert(1, ("derivative DDIM 4", x, labels))
        self.grid(shown, a.out / f"{a.name}_derivative_grid_s{seed}.png")
        return {"rows": rows}

    def plug_deltas(self, seed: int, mode: str, shown: list | None = None) -> list[dict]:
        """The derivative + guidance mode ``mode``'s full delta, then its LoRA, at 4 steps (mode teacher: w = 1; student: CFG)."""
        from diffusers import StableDiffusionPipeline

        from rectflow.perflow.delta import apply_delta
        from rectflow.perflow.diffusers_scheduler import PeRFlowScheduler

        folder, job, rows = self.work / "derivative", self.perflow_out(mode, seed), []
        sched = PeRFlowScheduler.from_pretrained(str(job / "diffusers" / "scheduler"))
        w = 1.0 if mode == "teacher" else self.a.guidance
        tag = "" if mode == "teacher" else f" (guidance mode {mode})"  # mode teacher's rows keep their first names
        for how in ("full delta", "LoRA"):
            pipe = StableDiffusionPipeline.from_pretrained(str(folder))
            if how == "full delta":
                apply_delta(pipe.unet, job / "delta.safetensors")
            else:
                pipe.load_lora_weights(str(job / "lora"))  # diffusers' own loader, through peft
            pipe.scheduler = sched
            x, labels, spi = self.sample(pipe, 4, w, seed)
            rows.append({"method": f"derivative + base {how}{tag}", "steps": 4, **self.score(x, labels, "gray"), "s_per_image": spi})
            log(f"  derivative + {how}{tag}: FD {rows[-1]['fd']:.3f}, accuracy {rows[-1]['prompt_accuracy']:.3f}")
            if how == "full delta" and shown is not None:
                shown.append(("derivative + delta 4", x, labels))
        return rows

    def run(self) -> None:
        a = self.a
        self.phase("captions", self.captions)
        for seed in a.seeds:  # seed-major, the guidance mode whose delta the plug-and-play study carries first
            self.phase(f"perflow-teacher-s{seed}", lambda s=seed: self.perflow("teacher", s))
            self.phase(f"eval-s{seed}-teacher", lambda s=seed: self.evaluate_teacher(s))
            self.phase(f"eval-s{seed}-perflow-teacher", lambda s=seed: self.evaluate_perflow(s, "teacher"))
            self.write()
            self.phase("derivative", self.derivative)
            self.phase(f"plug-s{seed}", lambda s=seed: self.plug(s))
            self.write()
            self.phase(f"perflow-student-s{seed}", lambda s=seed: self.perflow("student", s))
            self.phase(f"eval-s{seed}-perflow-student", lambda s=seed: self.evaluate_perflow(s, "student"))
            self.phase(f"plug-student-s{seed}", lambda s=seed: {"rows": self.plug_deltas(s, "student")})
            self.write()
        for lever in self.levers()[1:]:  # training length, solver steps per window: on the guidance mode whose goal was missed
            for seed in a.seeds:
                tail = self.suffix(lever)
                self.phase(f"perflow-teacher-s{seed}{tail}", lambda s=seed, v=lever: self.perflow("teacher", s, v))
                self.phase(f"eval-s{seed}-perflow-teacher{tail}", lambda s=seed, v=lever: self.evaluate_perflow(s, "teacher", v))
                self.write()

    def eval_rows(self, d: dict, seed: int) -> list[dict]:
        """Seed ``seed``'s table rows in a fixed order: the teacher's, then each guidance mode's that is done."""
        return [r for part in ("teacher", *(f"perflow-{m}" for m in MODES)) for r in (d.get(f"eval-s{seed}-{part}") or {"rows": []})["rows"]]

    def lever_lines(self, d: dict) -> list[str]:
        """The levers (training length, solver steps per window): guidance mode teacher at 4 steps, over the same seed's teacher."""
        a = self.a
        cells = {}  # (lever, seed) -> (fd, accuracy, fd ratio to the same seed's teacher 25)
        for s in a.seeds:
            t25 = next((r for r in (d.get(f"eval-s{s}-teacher") or {"rows": []})["rows"] if (r["method"], r["steps"]) == T25), None)
            for lever in self.levers():
                ev = d.get(f"eval-s{s}-perflow-teacher{self.suffix(lever)}")
                r = next((r for r in (ev or {"rows": []})["rows"] if r["steps"] == 4), None)
                if t25 and r:
                    cells[lever, s] = (r["fd"], r["prompt_accuracy"], r["fd"] / t25["fd"])
        if not any(self.suffix(v) for v, _ in cells):
            return []
        lines = ["## Levers: training length, solver steps per window (guidance mode teacher, 4 steps; mean, then each seed's value)", "",
                 "| training steps | solver steps per window | seeds | FD | FD / same seed's teacher 25 | prompt accuracy |",
                 "|---:|---:|---|---:|---:|---:|"]
        for lever in sorted(set(self.levers())):
            got = [(s, cells[lever, s]) for s in a.seeds if (lever, s) in cells]
            if got:
                fd, acc, rat = ([c[i] for _, c in got] for i in range(3))
                lines.append(f"| {lever[0]} | {lever[1]} | {', '.join(str(s) for s, _ in got)} | {mean_each(fd)} | "
                             f"{ratios(rat)} | {mean_each(acc)} |")
        return lines + [""]

    def write(self) -> None:
        a, m = self.a, machine_info()
        cap, native = torch.backends.cpu.get_cpu_capability(), bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        d = {name: self.done(name) for name in sorted(p.stem for p in (self.work / "phases").glob("*.json"))}
        lines = ["# PeRFlow on a trained text-to-image pipeline (CIFAR-10 16x16 teacher of t2i_teacher.py)", "",
                 machine_line(m), "",
                 f"Command: `python benchmarks/t2i_perflow.py {' '.join(x for x in sys.argv[1:] if x != '--report-only')}`", ""]
        for seed in a.seeds:
            for mode in MODES:
                p = d.get(f"perflow-{mode}-s{seed}")
                if p:
                    lines += [f"- PeRFlow, guidance mode {mode}, seed {seed}: {p['steps']} steps, {p['train_seconds'] / 3600:.2f} h; `{p['command']}`"]
        lines += [""]
        done_seeds = [s for s in a.seeds if d.get(f"eval-s{s}-teacher")]
        if done_seeds:
            by_seed = [{(r["method"], r["steps"]): r for r in self.eval_rows(d, s)} for s in done_seeds]
            keys = list(by_seed[0])
            lines += [f"## 25 steps -> 4 (guidance w = {a.guidance}, {a.n_fd} samples per row, seed(s) {', '.join(map(str, done_seeds))}: "
                      "mean, then each seed's value)", "",
                      "| method | steps | NFE | FD | prompt accuracy | ms / image |", "|---|---:|---:|---:|---:|---:|"]
            for k in keys:
                rs = [b[k] for b in by_seed if k in b]
                fd, acc = [x["fd"] for x in rs], [x["prompt_accuracy"] for x in rs]
                lines.append(f"| {k[0]} | {k[1]} | {rs[0]['nfe']} | {mean_each(fd)} | "
                             f"{mean_each(acc)} | {1e3 * np.mean([x['s_per_image'] for x in rs]):.1f} |")
            for mode in MODES:
                k4 = (f"PeRFlow (guidance mode {mode})", 4)
                paired = [(s, b) for s, b in zip(done_seeds, by_seed) if all(k in b for k in (T25, D4, k4))]
                if not paired:
                    continue
                fd_r = [b[k4]["fd"] / b[T25]["fd"] for _, b in paired]  # each seed's student over the same seed's teacher
                acc_r = [b[k4]["prompt_accuracy"] / b[T25]["prompt_accuracy"] for _, b in paired]
                ddim_r = [b[D4]["fd"] / b[T25]["fd"] for _, b in paired]
                worse = all(b[D4]["fd"] > 1.2 * max(b[T25]["fd"], b[k4]["fd"]) for _, b in paired)
                lines += ["", f"Goals (guidance mode {mode}: 4 steps, {paired[0][1][k4]['nfe']} NFE; each ratio pairs a seed's PeRFlow "
                          f"with the same seed's teacher, seed(s) {', '.join(str(s) for s, _ in paired)}: mean, then each seed's value):",
                          f"- PeRFlow 4-step FD / teacher 25-step FD: {ratios(fd_r)} (goal <= 1.2x: {'met' if np.mean(fd_r) <= 1.2 else 'NOT met'});",
                          f"- prompt accuracy: {ratios(acc_r, 3)} the teacher's (goal >= 0.95x: {'met' if np.mean(acc_r) >= 0.95 else 'NOT met'});",
                          f"- teacher DDIM 4: FD {ratios(ddim_r)} the teacher's 25-step (clearly worse than both on every seed: "
                          f"{'yes' if worse else 'no'})."]
            if (a.out / f"{a.name}_grid_s{done_seeds[0]}.png").is_file():
                lines += ["", f"Columns, left to right: teacher DPM-Solver++ 25, teacher DDIM 4, PeRFlow 4 (seed {done_seeds[0]}); a row per prompt.", "",
                          f"![grid seed {done_seeds[0]}]({a.name}_grid_s{done_seeds[0]}.png)"]
            lines += [""]
        lines += self.lever_lines(d)
        plug_seeds = [s for s in a.seeds if d.get(f"plug-s{s}")]
        if plug_seeds:
            dv = d.get("derivative") or {}
            lines += [f"## The base's delta on a fine-tune ({dv.get('domain', 'derivative')}, {dv.get('steps', '?')} fine-tuning steps; "
                      f"seed(s) {', '.join(map(str, plug_seeds))}: mean, then each seed's value)", "",
                      "| method | steps | FD (vs grayscale test) | prompt accuracy |", "|---|---:|---:|---:|"]
            per_seed = [{r["method"]: r for r in d[f"plug-s{s}"]["rows"] + (d.get(f"plug-student-s{s}") or {"rows": []})["rows"]}
                        for s in plug_seeds]
            for name in per_seed[0]:
                rs = [p[name] for p in per_seed if name in p]
                fd, acc = [x["fd"] for x in rs], [x["prompt_accuracy"] for x in rs]
                label = name + (" (guidance mode teacher)" if "base" in name and "guidance mode" not in name else "")
                lines.append(f"| {label} | {rs[0]['steps']} | {mean_each(fd)} | "
                             f"{mean_each(acc)} |")
            for mode in MODES:
                tag = "" if mode == "teacher" else f" (guidance mode {mode})"
                own, full, lora = "derivative DPM-Solver++", f"derivative + base full delta{tag}", f"derivative + base LoRA{tag}"
                got = [p for p in per_seed if all(n in p for n in (own, full, lora))]
                if not got:
                    continue
                full_r = [p[full]["fd"] / p[own]["fd"] for p in got]  # each seed's delta over the same seed's 25-step samples
                lora_r = [p[lora]["fd"] / p[full]["fd"] for p in got]
                lines += ["", f"Goals, guidance mode {mode}'s delta (each ratio within one seed; mean, then each seed's value):",
                          f"- derivative + base delta at 4 steps / the derivative's own 25 steps, FD: {ratios(full_r, 3)} "
                          f"(goal <= 1.3x: {'met' if np.mean(full_r) <= 1.3 else 'NOT met'} on the mean, "
                          f"{'met' if max(full_r) <= 1.3 else 'NOT met'} on every seed);",
                          f"- the LoRA / the full delta, FD: {ratios(lora_r, 3)} (goal within 1.1x: {'met' if np.mean(lora_r) <= 1.1 else 'NOT met'} "
                          f"on the mean, {'met' if max(lora_r) <= 1.1 else 'NOT met'} on every seed)."]
            lines += ["", "Columns, left to right: derivative DPM-Solver++ 25, derivative DDIM 4, derivative + base delta 4.", "",
                      *[f"![derivative grid seed {s}]({a.name}_derivative_grid_s{s}.png)" for s in plug_seeds[:1]], ""]
        write_results(a.out, a.name, {"machine": m, "cpu_capability": cap, "bf16_native": native, "phases": d}, "\n".join(lines))


def best_teacher_guidance(teacher_work: Path) -> float:
    """The guidance scale of the teacher's lowest-FD DPM-Solver++ 25 row (t2i_teacher.py's evaluation); 2.0 without one."""
    rows = teacher_work / "eval_rows.jsonl"
    dpm = [json.loads(x) for x in rows.read_text().splitlines() if x.strip()] if rows.is_file() else []
    dpm = [r for r in dpm if r["sampler"] == "dpm++:25"]
    return float(min(dpm, key=lambda r: r["fd"])["guidance"]) if dpm else 2.0


def main(argv: list[str] | None = None) -> int:
    ap = phased_args(__doc__.split("\n")[0], "t2i_perflow", report_only="write the report from the finished phases; run nothing")
    ap.add_argument("--teacher-work", type=Path, required=True, help="the --work folder of t2i_teacher.py (teacher/, classifier.safetensors)")
    ap.add_argument("--n-captioned", type=int, default=10000)
    ap.add_argument("--guidance", type=float, default=None,
                    help="default: the scale at which the teacher's DPM-Solver++ 25 had the lowest FD in t2i_teacher.py's evaluation")
    ap.add_argument("--solver-steps", type=int, default=12)
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--lora-rank", type=int, default=16)
    ap.add_argument("--precision", default=None, choices=["auto", "fp32", "bf16"],
                    help="default: what t2i_teacher.py's speed phase measured faster for this UNet on this machine")
    ap.add_argument("--derivative-steps", type=int, default=1500)
    ap.add_argument("--lever-steps", type=int, nargs="*", default=[1500],
                    help="extra training lengths for guidance mode teacher (the training-length lever), after everything else")
    ap.add_argument("--lever-solver-steps", type=int, nargs="*", default=[24],
                    help="extra teacher solver steps per window for guidance mode teacher (the job's default is 24), after the length lever")
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--n-fd", type=int, default=5000)
    a = ap.parse_args(argv)
    if a.guidance is None:
        a.guidance = best_teacher_guidance(a.teacher_work)
    if a.precision is None:
        speed = a.teacher_work / "phases" / "speed.json"
        a.precision = json.loads(speed.read_text())["precision"] if speed.is_file() else "auto"
    if a.smoke:
        a.n_captioned, a.steps, a.batch, a.solver_steps, a.derivative_steps, a.n_fd, a.seeds, a.lever_steps = 40, 2, 4, 2, 4, 40, [1], [1]
        a.lever_solver_steps = [3]
        a.lora_rank, a.name, a.out = 2, a.name + "_smoke", a.work / "results"
    torch.set_num_threads(a.threads)
    if a.report_only:
        Bench(a).write()
        return 0
    Bench(a).run()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
