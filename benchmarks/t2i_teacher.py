"""Train a small text-to-image Stable-Diffusion teacher on CIFAR-10 at 16x16, in stock diffusers format.

No pretrained weights can be fetched here, so the PeRFlow study on a *trained* text-to-image pipeline
(``t2i_perflow.py``) starts from a teacher trained by this script, the way SD is trained:

1. ``classifier`` -- the FD feature network of ``cifar10_cpu.py`` (VGG-style, trained here, cached): FD
   in its features and **prompt accuracy** (the share of images it assigns to the prompted class).
2. ``vae-screen`` -- an ``AutoencoderKL`` with downsampling factor 2 (latents 4x8x8) and one with factor 4
   (4x4x4), each trained the same few minutes: test PSNR of both; the factor is picked from it.
3. ``vae`` -- the picked autoencoder trained longer (MSE + 1e-6 KL, as SD's KL-f8 minus its perceptual
   and GAN terms); test PSNR and the FD of reconstructions; ``scaling_factor`` = 1 / std of the latents.
4. ``text`` -- a frozen 2-layer ``CLIPTextModel`` with **random weights** and a CLIP BPE tokenizer over
   single letters, built offline (no CLIP weights can be fetched); prompts are "a photo of a {class}".
5. ``latents`` -- every training image and its mirror image encoded once (posterior mean and std).
6. ``unet`` -- a ``UNet2DConditionModel`` trained with the epsilon objective on SD's ``scaled_linear``
   schedule (betas 0.00085..0.012, 1000 steps), 10 % caption dropout for classifier-free guidance,
   EMA; rectflow's Trainer (exact resume after kill -9). Precision is picked by timing fp32 and bf16
   on this machine first (``speed``).
7. ``export`` + ``eval`` -- the folder ``StableDiffusionPipeline.from_pretrained`` loads (DDIM
   scheduler config as SD 1.x ships it), then stock-diffusers samples: DPM-Solver++ 25 steps and DDIM
   at several guidance scales, FD (5,000 samples vs the test set by default) and prompt accuracy.

Every phase writes ``WORK/phases/NAME.json`` when done and is skipped on a rerun; the UNet resumes from
its newest checkpoint. Results: ``benchmarks/results/t2i_teacher.{md,json}`` and a sample grid.

    python benchmarks/t2i_teacher.py --work /path/outside/the/checkout     # hours on one core
    python benchmarks/t2i_teacher.py --smoke --work /tmp/t2i-smoke         # a minute: checks the script
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from _bench import append_rows, write_results
from _cifar10 import FeatureStats
from _machine import machine_info, machine_line
from _phases import PhasedBench, log, phased_args
from rectflow.data.image_sets import ImageArray, to_unit_range
from rectflow.engine.io import read_jsonl
from rectflow.engine.trainer import TrainConfig, Trainer
from rectflow.flow.losses import LossOutput
from rectflow.images.classifier_features import train_cifar_classifier

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
LETTERS = "abcdefghijklmnopqrstuvwxyz"
BETAS = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000}


def prompt(c: int) -> str:
    return f"a photo of a {CLASSES[c]}"


# ----- the parts --------------------------------------------------------------------------------


def make_vae(factor: int, size: int):
    """An AutoencoderKL with downsampling ``factor`` (2 or 4), 4 latent channels."""
    import diffusers

    levels = {2: 2, 4: 3}[factor]
    return diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * levels, up_block_types=("UpDecoderBlock2D",) * levels,
        block_out_channels=(32, 64, 64)[:levels], latent_channels=4, norm_num_groups=16, sample_size=size, layers_per_block=1)


def make_text(folder: Path):
    """A CLIP BPE tokenizer over single letters (no merges) and a random 2-layer CLIPTextModel of width 64."""
    import transformers

    folder.mkdir(parents=True, exist_ok=True)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for suffix in ("", "</w>"):
        for c in LETTERS:
            vocab[c + suffix] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tok = transformers.CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=32)
    torch.manual_seed(0)
    cfg = transformers.CLIPTextConfig(vocab_size=len(vocab), hidden_size=64, intermediate_size=128, num_attention_heads=4, num_hidden_layers=2,
                                      max_position_embeddings=32, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    return tok, transformers.CLIPTextModel(cfg).eval()


def make_unet(latent: int, width: int):
    import diffusers

    return diffusers.UNet2DConditionModel(
        sample_size=latent, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(width, 2 * width),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=64, attention_head_dim=4, norm_num_groups=16)


def encode_prompts(tok, text_model, prompts: list[str]) -> Tensor:
    ids = tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        return text_model(ids)[0]


def encode_latents(vae, x: Tensor, labels: Tensor, path: Path) -> int:
    """The VAE posterior (mean, std) of every image x (N, 3, H, W) in [-1, 1] and of its mirror image, with their labels, in
    one safetensors file (``mean``, ``std``, ``labels``); returns the number of rows (2N)."""
    from safetensors.torch import save_file

    means, stds = [], []
    with torch.no_grad():
        for flip in (False, True):
            for xb in x.split(500):
                post = vae.encode(xb.flip(-1) if flip else xb).latent_dist
                means.append(post.mean)
                stds.append(post.std)
    save_file({"mean": torch.cat(means).contiguous(), "std": torch.cat(stds).contiguous(), "labels": torch.cat([labels] * 2).contiguous()}, str(path))
    return 2 * len(x)


# ----- objectives for rectflow's Trainer ------------------------------------------------------


class VAEObjective:
    """Autoencoder loss: per-pixel MSE of the reconstruction of a posterior sample + kl_weight x KL (per sample, summed)."""

    heavy_draw = False

    def __init__(self, images: Tensor, kl_weight: float = 1e-6) -> None:
        self.images, self.kl_weight = images, kl_weight

    def draw(self, n: int, generator: torch.Generator, device: torch.device) -> dict[str, Tensor]:
        idx = torch.randint(len(self.images), (n,), generator=generator)
        x = to_unit_range(self.images[idx])
        flip = torch.rand(n, generator=generator) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        return {"x": x.to(device), "eps": torch.randn(x.shape[0], 4, 1, 1, generator=generator).to(device)}

    def loss(self, model: nn.Module, batch: dict[str, Tensor]) -> LossOutput:
        post = model.encode(batch["x"]).latent_dist
        z = post.mean + post.std * torch.randn_like(post.mean)
        rec = model.decode(z).sample.float()
        err = (rec - batch["x"]).square().flatten(1).mean(1)
        kl = post.kl().float()
        return LossOutput((err + self.kl_weight * kl).mean(), err.detach())


class EpsilonObjective:
    """SD's training objective: x_t = sqrt(abar_t) z + sqrt(1 - abar_t) eps at a uniform integer t, MSE on eps; the
    caption is replaced by the empty prompt with probability ``drop`` (classifier-free guidance)."""

    heavy_draw = False

    def __init__(self, mean: Tensor, std: Tensor, labels: Tensor, emb: Tensor, null: Tensor, scale: float, drop: float = 0.1) -> None:
        from diffusers import DDPMScheduler

        self.mean, self.std, self.labels, self.emb, self.null = mean, std, labels, emb, null
        self.scale, self.drop = scale, drop
        self.abar = DDPMScheduler(**BETAS).alphas_cumprod.float()

    def draw(self, n: int, generator: torch.Generator, device: torch.device) -> dict[str, Tensor]:
        idx = torch.randint(len(self.mean), (n,), generator=generator)
        z = (self.mean[idx] + self.std[idx] * torch.randn(self.mean[idx].shape, generator=generator)) * self.scale
        t = torch.randint(0, 1000, (n,), generator=generator)
        eps = torch.randn(z.shape, generator=generator)
        keep = torch.rand(n, generator=generator) >= self.drop
        cond = torch.where(keep[:, None, None], self.emb[self.labels[idx]], self.null[None])
        return {k: v.to(device) for k, v in {"z": z, "t": t, "eps": eps, "cond": cond}.items()}

    def loss(self, model: nn.Module, batch: dict[str, Tensor]) -> LossOutput:
        a = self.abar.to(batch["z"].device)[batch["t"]][:, None, None, None]
        xt = a.sqrt() * batch["z"] + (1 - a).sqrt() * batch["eps"]
        pred = model(xt, batch["t"], encoder_hidden_states=batch["cond"]).sample.float()
        err = (pred - batch["eps"]).square().flatten(1).mean(1)
        return LossOutput(err.mean(), err.detach())


def step_seconds(make_model, objective, precision: str, batch: int, steps: int) -> float:
    """Best-of-``steps`` seconds per training step (after 2 warm-up steps) at ``precision``."""
    model = make_model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(0)
    best = math.inf
    for k in range(steps + 2):
        b = objective.draw(batch, g, torch.device("cpu"))
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = objective.loss(model, b).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if k >= 2:
            best = min(best, time.perf_counter() - t0)
    return best


# ----- the benchmark -------------------------------------------------------------------------


class Bench(PhasedBench):

    def data(self, split: str) -> ImageArray:
        return self.cifar(split)

    def classifier(self):
        clf, info = train_cifar_classifier(self.data("train"), self.data("test"), self.a.clf_seconds, torch.device("cpu"), batch=128,
                                           width=self.a.clf_width, cache=self.work / "classifier.safetensors")
        return clf, info

    # --- autoencoder
    def train_vae(self, factor: int, run: Path, steps: int, seconds: float | None) -> nn.Module:
        from rectflow.engine.trainer import TimeBudget

        vae = make_vae(factor, self.a.size)
        cfg = TrainConfig(steps=steps, batch_size=self.a.vae_batch, lr=self.a.vae_lr, warmup_steps=min(200, steps // 10), lr_schedule="cosine",
                          ema_decay=0.999, precision=self.precision(), log_every=50, ckpt_every=200, device="cpu", progress=False, seed=0)
        tr = Trainer(vae, VAEObjective(self.data("train").images), cfg, run, model_config={"factor": factor, "size": self.a.size},
                     callbacks=[TimeBudget(seconds)] if seconds else None)
        tr.fit()
        return tr.eval_model

    @torch.no_grad()
    def vae_metrics(self, vae: nn.Module, feats: FeatureStats | None) -> dict:
        test = to_unit_range(self.data("test").images)
        recs, lat = [], []
        for xb in test.split(500):
            post = vae.encode(xb).latent_dist
            lat.append(post.mean)
            recs.append(vae.decode(post.mean).sample.clamp(-1, 1))
        rec = torch.cat(recs)
        mse = (rec - test).square().flatten(1).mean(1)
        psnr = float((10 * torch.log10(4.0 / mse)).mean())
        out = {"psnr": psnr, "latent_shape": list(lat[0].shape[1:]), "latent_std": float(torch.cat(lat).std())}
        if feats is not None:
            out["fd_reconstruction"] = feats.fd(rec)
        return out

    def vae_screen(self) -> dict:
        rows = {}
        for factor in (2, 4):
            vae = self.train_vae(factor, self.work / f"vae-screen-f{factor}", steps=100000, seconds=self.a.vae_screen_seconds)
            rows[f"f{factor}"] = self.vae_metrics(vae, None)
            log(f"  factor {factor}: test PSNR {rows[f'f{factor}']['psnr']:.2f} dB")
        # factor 4 keeps 16x fewer latent positions than pixels; take it only if it loses under 1.5 dB
        pick = 4 if rows["f4"]["psnr"] > rows["f2"]["psnr"] - 1.5 else 2
        return {"rows": rows, "seconds_each": self.a.vae_screen_seconds, "factor": pick}

    def precision(self) -> str:
        sp = self.done("speed")
        return sp["precision"] if sp else "fp32"

    def speed(self) -> dict:
        """Time fp32 and bf16 UNet and VAE training steps on this machine (alternating, best of N): the faster is used."""
        emb = torch.randn(10, 32, 64)
        fake = EpsilonObjective(torch.randn(256, 4, 8, 8), torch.full((256, 4, 8, 8), 0.05), torch.randint(10, (256,)), emb, emb[0], 1.0)
        rows = {}
        for rep in range(2):
            for prec in ("fp32", "bf16"):
                s = step_seconds(lambda: make_unet(8, self.a.unet_width), fake, prec, self.a.unet_batch, self.a.speed_steps)
                rows[prec] = min(rows.get(prec, math.inf), s)
        cap = torch.backends.cpu.get_cpu_capability()
        native = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        pick = "bf16" if rows["bf16"] < rows["fp32"] else "fp32"
        log(f"  UNet step s: fp32 {rows['fp32']:.3f}, bf16 {rows['bf16']:.3f} ({cap}, native bf16 {native}) -> {pick}")
        return {"unet_step_s": rows, "precision": pick, "cpu_capability": cap, "bf16_native": native, "threads": torch.get_num_threads()}

    def vae(self) -> dict:
        factor = self.done("vae-screen")["factor"]
        clf, _ = self.classifier()
        feats = FeatureStats("fd", clf, to_unit_range(self.data("test").images), torch.device("cpu"))
        t0 = time.perf_counter()
        vae = self.train_vae(factor, self.work / "vae", steps=self.a.vae_steps, seconds=None)
        secs = time.perf_counter() - t0
        m = self.vae_metrics(vae, feats)
        vae.register_to_config(scaling_factor=1.0 / m["latent_std"])
        vae.save_pretrained(str(self.work / "parts" / "vae"))
        return {**m, "factor": factor, "steps": self.a.vae_steps, "train_seconds": secs, "scaling_factor": 1.0 / m["latent_std"],
                "params": sum(p.numel() for p in vae.parameters())}

    def floor(self) -> dict:
        """FD of real training images (a random, class-balanced-in-expectation draw of the test set's size) to the test set."""
        clf, _ = self.classifier()
        feats = FeatureStats("fd", clf, to_unit_range(self.data("test").images), torch.device("cpu"))
        idx = torch.randperm(len(self.data("train").images), generator=torch.Generator().manual_seed(0))[:len(self.data("test").images)]
        return {"fd_train_vs_test": feats.fd(to_unit_range(self.data("train").images[idx])), "n": len(idx)}

    def text(self) -> dict:
        tok, model = make_text(self.work / "parts" / "tokenizer-src")
        tok.save_pretrained(str(self.work / "parts" / "tokenizer"))
        model.save_pretrained(str(self.work / "parts" / "text_encoder"))
        return {"params": sum(p.numel() for p in model.parameters()), "weights": "random (seed 0), frozen", "prompts": [prompt(c) for c in range(10)]}

    def latents(self) -> dict:
        from diffusers import AutoencoderKL

        vae = AutoencoderKL.from_pretrained(str(self.work / "parts" / "vae")).eval()
        n = encode_latents(vae, to_unit_range(self.data("train").images), self.data("train").labels, self.work / "latents.safetensors")
        side = self.a.size // 2 ** (len(vae.config.block_out_channels) - 1)
        return {"n": n, "shape": [vae.config.latent_channels, side, side]}

    def unet_objective(self) -> tuple[EpsilonObjective, float]:
        from diffusers import AutoencoderKL
        from safetensors.torch import load_file
        from transformers import CLIPTextModel, CLIPTokenizer

        lat = load_file(str(self.work / "latents.safetensors"))
        tok = CLIPTokenizer.from_pretrained(str(self.work / "parts" / "tokenizer"))
        te = CLIPTextModel.from_pretrained(str(self.work / "parts" / "text_encoder")).eval()
        emb = encode_prompts(tok, te, [prompt(c) for c in range(10)])
        null = encode_prompts(tok, te, [""])[0]
        scale = AutoencoderKL.load_config(str(self.work / "parts" / "vae"))["scaling_factor"]
        return EpsilonObjective(lat["mean"], lat["std"], lat["labels"].long(), emb, null, scale, drop=0.1), scale

    def unet_trainer(self) -> Trainer:
        obj, _ = self.unet_objective()
        latent = obj.mean.shape[-1]
        cfg = TrainConfig(steps=self.a.unet_steps, batch_size=self.a.unet_batch, lr=self.a.unet_lr, optimizer="adamw", weight_decay=0.0,
                          warmup_steps=min(500, self.a.unet_steps // 10), lr_schedule="cosine", lr_min=0.1 * self.a.unet_lr, ema_decay=0.9995,
                          precision=self.precision(), log_every=100, ckpt_every=self.a.ckpt_every, device="cpu", progress=False, seed=0)
        return Trainer(make_unet(latent, self.a.unet_width), obj, cfg, self.work / "unet",
                       model_config={"latent": latent, "width": self.a.unet_width, "kind": "UNet2DConditionModel"})

    def unet(self) -> dict:
        t0 = time.perf_counter()
        tr = self.unet_trainer()
        tr.fit()
        rows = [json.loads(x) for x in (self.work / "unet" / "metrics.jsonl").read_text().splitlines() if x.strip()]
        return {"steps": tr.step, "params": sum(p.numel() for p in tr.model.parameters()), "this_call_seconds": time.perf_counter() - t0,
                "train_seconds": sum(r["ms_per_step"] * r["steps"] for r in rows) / 1e3,
                "curve": [[r["step"], r["loss"]] for r in rows], "precision": self.precision(), "batch": self.a.unet_batch, "lr": self.a.unet_lr}

    def export(self) -> dict:
        import diffusers
        from transformers import CLIPTextModel, CLIPTokenizer

        tr = self.unet_trainer()
        tr.resume()
        parts = self.work / "parts"
        sched = diffusers.DDIMScheduler(**BETAS, clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon")
        pipe = diffusers.StableDiffusionPipeline(
            vae=diffusers.AutoencoderKL.from_pretrained(str(parts / "vae")), text_encoder=CLIPTextModel.from_pretrained(str(parts / "text_encoder")),
            tokenizer=CLIPTokenizer.from_pretrained(str(parts / "tokenizer")), unet=tr.eval_model, scheduler=sched,
            safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        out = self.work / "teacher"
        tmp = self.work / ".teacher.tmp"
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
        pipe.save_pretrained(str(tmp))
        shutil.rmtree(out, ignore_errors=True)
        tmp.replace(out)
        return {"folder": str(out), "step": tr.step}

    def evaluate(self) -> dict:
        from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, StableDiffusionPipeline

        clf, _ = self.classifier()
        test = to_unit_range(self.data("test").images)
        feats = FeatureStats("fd", clf, test, torch.device("cpu"))
        pipe = StableDiffusionPipeline.from_pretrained(str(self.work / "teacher"))
        pipe.set_progress_bar_config(disable=True)
        base = pipe.scheduler.config
        rows = []
        per = self.a.n_fd // 10
        partial = self.work / "eval_rows.jsonl"  # one row per (sampler, w), kept across a kill
        done = {(r["sampler"], r["guidance"]): r for r in read_jsonl(partial)}
        for sched_name, steps in (("dpm++", 25), ("ddim", 4)):
            pipe.scheduler = (DPMSolverMultistepScheduler.from_config(base, algorithm_type="dpmsolver++") if sched_name == "dpm++"
                              else DDIMScheduler.from_config(base))
            for w in self.a.guidance:
                if (f"{sched_name}:{steps}", w) in done:
                    rows.append(done[(f"{sched_name}:{steps}", w)])
                    continue
                t0 = time.perf_counter()
                imgs, labels = [], []
                for c in range(10):
                    g = torch.Generator().manual_seed(1000 + c)
                    for k in range(0, per, 250):
                        n = min(250, per - k)
                        with torch.no_grad():
                            out = pipe([prompt(c)] * n, height=self.a.size, width=self.a.size, num_inference_steps=steps, guidance_scale=w,
                                       generator=g, output_type="pt").images
                        imgs.append(out * 2 - 1)
                        labels += [c] * n
                secs = time.perf_counter() - t0
                x = torch.cat(imgs).float()
                with torch.no_grad():
                    pred = torch.cat([clf.logits(xb).argmax(1) for xb in x.split(500)])
                acc = float((pred == torch.tensor(labels)).float().mean())
                row = {"sampler": f"{sched_name}:{steps}", "guidance": w, "fd": feats.fd(x), "prompt_accuracy": acc, "s_per_image": secs / len(x), "n": len(x)}
                rows.append(row)
                append_rows(partial, [row])
                log(f"  {row['sampler']} w={w}: FD {row['fd']:.3f}, prompt accuracy {acc:.3f}, {row['s_per_image'] * 1e3:.1f} ms/image")
                if sched_name == "dpm++" and w == 2.0:
                    self.grid(x, labels, self.a.out / f"{self.a.name}_grid.png")
        return {"rows": rows, "n_per_prompt": per}

    @staticmethod
    def grid(x: Tensor, labels: list[int], path: Path, per_row: int = 10) -> None:
        from rectflow.images.generate import save_image_grid

        lab = torch.tensor(labels)
        picks = torch.cat([x[lab == c][:per_row] for c in range(10)])
        save_image_grid(picks, path, nrow=per_row, scale=2)

    def run(self) -> None:
        self.phase("speed", self.speed)
        self.phase("classifier", lambda: self.classifier()[1])
        self.phase("fd-floor", self.floor)
        self.phase("vae-screen", self.vae_screen)
        self.phase("vae", self.vae)
        self.phase("text", self.text)
        self.phase("latents", self.latents)
        self.phase("unet", self.unet)
        self.phase("export", self.export)
        self.phase("eval", self.evaluate)
        self.report()

    def report(self) -> None:
        """The report from what the phases hold now (a running job's work folder is only read)."""
        self.write()
        log(f"done: {self.a.out / self.a.name}.md")

    def write(self) -> None:
        a = self.a
        m = machine_info()
        d = {k: self.done(k) for k in ("speed", "classifier", "fd-floor", "vae-screen", "vae", "text", "latents", "unet", "export", "eval")}
        sp = d["speed"]
        lines = [f"# Text-to-image teacher: SD-style latent diffusion on CIFAR-10 at {a.size}x{a.size}", "",
                 machine_line(m) + f" CPU capability {sp['cpu_capability']}, bf16 native: {sp['bf16_native']}; {sp['threads']} torch thread(s).", "",
                 f"Command: `python benchmarks/t2i_teacher.py {' '.join(sys.argv[1:])}`", ""]
        lines += ["## Precision (timed here, best of N, alternating)", "", "| precision | UNet step (s) |", "|---|---:|"]
        lines += [f"| {k} | {v:.3f} |" for k, v in sp["unet_step_s"].items()] + ["", f"Picked: **{sp['precision']}**.", ""]
        c = d["classifier"]
        lines += [f"FD classifier: test accuracy {c['test_accuracy']:.3f} ({c['feature_dim']}-d features).", ""]
        s = d["vae-screen"]
        lines += ["## Autoencoder", "", f"Screen, {s['seconds_each']:.0f} s of training each:", "", "| factor | latent | test PSNR (dB) |", "|---|---|---:|"]
        lines += [f"| {k[1:]} | {'x'.join(map(str, r['latent_shape']))} | {r['psnr']:.2f} |" for k, r in s["rows"].items()]
        v = d["vae"]
        lines += ["", f"Picked factor {s['factor']}; trained {v['steps']} steps ({v['train_seconds'] / 60:.0f} min, {v['params'] / 1e6:.2f}M parameters): "
                  f"test PSNR **{v['psnr']:.2f} dB**, FD of reconstructions **{v['fd_reconstruction']:.3f}** (real train images vs test: {d['fd-floor']['fd_train_vs_test']:.3f}); "
                  f"scaling_factor {v['scaling_factor']:.4f}.", ""]
        u = d["unet"]
        rows = [json.loads(x) for x in (self.work / "unet" / "metrics.jsonl").read_text().splitlines() if x.strip()] \
            if (self.work / "unet" / "metrics.jsonl").is_file() else []
        if u is None and rows:  # still training: what the log holds so far
            u = {"params": None, "steps": rows[-1]["step"], "batch": a.unet_batch, "precision": self.precision(), "lr": a.unet_lr,
                 "train_seconds": sum(r["ms_per_step"] * r["steps"] for r in rows) / 1e3, "curve": [[r["step"], r["loss"]] for r in rows],
                 "partial": True}
        if u:
            size = f"{u['params'] / 1e6:.2f}M parameters, " if u.get("params") else ""
            lines += ["## UNet" + (f" (IN PROGRESS: {u['steps']} of {a.unet_steps} steps so far)" if u.get("partial") else ""), "",
                      f"{size}{u['steps']} steps of batch {u['batch']} ({u['precision']}, lr {u['lr']}, cosine), "
                      f"{u['train_seconds'] / 3600:.2f} h of training. Text encoder: {d['text']['weights']}.", ""]
            curve = u["curve"]
            pick = [curve[i] for i in sorted({int(j) for j in np.linspace(0, len(curve) - 1, 8)})]
            lines += ["| step | " + " | ".join(str(p[0]) for p in pick) + " |", "|---|" + "---:|" * len(pick), "| loss (eps MSE) | " + " | ".join(f"{p[1]:.4f}" for p in pick) + " |", ""]
        e = d["eval"]
        partial = self.work / "eval_rows.jsonl"
        if e is None and partial.is_file():  # evaluation under way: the rows measured so far
            e = {"rows": [json.loads(x) for x in partial.read_text().splitlines() if x.strip()], "n_per_prompt": a.n_fd // 10}
        if e and e["rows"]:
            lines += ["## Samples (stock StableDiffusionPipeline)", "", f"{e['n_per_prompt']} samples per prompt, 10 prompts; FD vs the test set.", "",
                      "| sampler | guidance | FD | prompt accuracy | ms / image |", "|---|---:|---:|---:|---:|"]
            lines += [f"| {r['sampler']} | {r['guidance']} | {r['fd']:.3f} | {r['prompt_accuracy']:.3f} | {r['s_per_image'] * 1e3:.1f} |" for r in e["rows"]]
            lines += ["", f"![samples]({a.name}_grid.png)", ""]
        write_results(a.out, a.name, {"machine": m, **d}, "\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    ap = phased_args(__doc__.split("\n")[0], "t2i_teacher",
                     report_only="write the report from the finished phases (and the training log so far); run nothing")
    ap.add_argument("--clf-seconds", type=float, default=240.0)
    ap.add_argument("--clf-width", type=int, default=32)
    ap.add_argument("--vae-screen-seconds", type=float, default=120.0)
    ap.add_argument("--vae-steps", type=int, default=3000)
    ap.add_argument("--vae-batch", type=int, default=64)
    ap.add_argument("--vae-lr", type=float, default=1e-3)
    ap.add_argument("--unet-steps", type=int, default=12000)
    ap.add_argument("--unet-batch", type=int, default=128)
    ap.add_argument("--unet-lr", type=float, default=6e-4)
    ap.add_argument("--unet-width", type=int, default=32)
    ap.add_argument("--ckpt-every", type=int, default=500)
    ap.add_argument("--speed-steps", type=int, default=3)
    ap.add_argument("--guidance", type=float, nargs="+", default=[1.0, 2.0, 4.0])
    ap.add_argument("--n-fd", type=int, default=5000)
    a = ap.parse_args(argv)
    if a.smoke:
        a.clf_seconds, a.vae_screen_seconds, a.vae_steps, a.unet_steps, a.n_fd, a.speed_steps = 5, 3, 20, 30, 40, 1
        a.unet_batch, a.ckpt_every, a.guidance, a.name = 16, 10, [1.0, 2.0], a.name + "_smoke"
        a.out = a.work / "results"
    torch.set_num_threads(a.threads)
    if a.report_only:
        Bench(a).report()
        return 0
    Bench(a).run()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
