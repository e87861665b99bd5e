"""Tiny Stable-Diffusion-layout pipeline folders built from configs (nothing is downloaded).

``tiny_sd`` (session scope) is a folder with model_index.json, unet/ (UNet2DConditionModel, 8x8
latents, cross-attention width 32), vae/ (AutoencoderKL, factor 2: 16x16 images), text_encoder/
(a 2-layer CLIPTextModel of width 32), tokenizer/ (a CLIPTokenizer over a 56-token letter vocabulary,
16 tokens per prompt) and scheduler/ (SD's scaled-linear DDIM config).

``tiny_sdxl_pipeline`` (session scope) is the pipeline of an SDXL-layout folder of the same size: a
UNet with SDXL's added conditions (``addition_embed_type="text_time"``: pooled text (24) and six size
ids), text_encoder/ (CLIPTextModel, width 32) and text_encoder_2/ (CLIPTextModelWithProjection, width
48, projection 24; cross-attention width 32 + 48 = 80), tokenizer/ and tokenizer_2/ (tokenizer_2 pads
with another token, as SDXL's does), and SDXL base's own EulerDiscreteScheduler config.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

LETTERS = "abcdefghijklmnopqrstuvwxyz"
# SDXL base 1.0's scheduler/scheduler_config.json, key for key.
SDXL_SCHEDULER = {"_class_name": "EulerDiscreteScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085,
                  "clip_sample": False, "interpolation_type": "linear", "num_train_timesteps": 1000, "prediction_type": "epsilon",
                  "sample_max_value": 1.0, "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1, "timestep_spacing": "leading",
                  "trained_betas": None, "use_karras_sigmas": False}
SDXL_POOLED = 24
CAPTION_SIZES = [(20, 16), (16, 24), (16, 16), (32, 32), (17, 19)]  # (width, height): crops of both orientations
CAPTIONS = ["a red cat", "two dogs", "", "a tree by the lake", "blue sky"]


def write_tokenizer_files(folder: Path) -> tuple[Path, Path]:
    """vocab.json + merges.txt of a CLIP BPE over single letters (no merges): every word is its letters."""
    folder.mkdir(parents=True, exist_ok=True)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for suffix in ("", "</w>"):
        for c in LETTERS:
            vocab[c + suffix] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return folder / "vocab.json", folder / "merges.txt"


def _tiny_parts(folder: Path, *, shift_factor: float | None = None, scaling_factor: float = 0.18215) -> dict[str, Any]:
    """The VAE (factor 2, 16x16 images), the tokenizer and the CLIP text config shared by the tiny folders."""
    diffusers = pytest.importorskip("diffusers")
    transformers = pytest.importorskip("transformers")
    vae = diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 16), latent_channels=4, norm_num_groups=8, sample_size=16, layers_per_block=1,
        scaling_factor=scaling_factor, shift_factor=shift_factor)
    vocab, merges = write_tokenizer_files(folder.parent / f".{folder.name}-tokenizer-src")
    clip = {"vocab_size": 2 + 2 * len(LETTERS), "intermediate_size": 37, "num_attention_heads": 4, "num_hidden_layers": 2,
            "max_position_embeddings": 16, "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 1}
    return {"vae": vae, "tokenizer": lambda **kw: transformers.CLIPTokenizer(str(vocab), str(merges), model_max_length=16, **kw),
            "clip": lambda cls, **kw: getattr(transformers, cls)(transformers.CLIPTextConfig(**clip, **kw))}


def build_tiny_sd(folder: Path, *, prediction_type: str = "epsilon", seed: int = 0, shift_factor: float | None = None,
                  scheduler: str = "DDIMScheduler") -> Path:
    """Write a tiny SD 1.x-layout pipeline folder (random weights from ``seed``) and return it."""
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(seed)
    unet = diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8)
    parts = _tiny_parts(folder, shift_factor=shift_factor)
    sched = getattr(diffusers, scheduler)(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", prediction_type=prediction_type,
                                          **({"clip_sample": False, "set_alpha_to_one": False} if scheduler == "DDIMScheduler" else {}),
                                          steps_offset=1)
    pipe = diffusers.StableDiffusionPipeline(vae=parts["vae"], text_encoder=parts["clip"]("CLIPTextModel", hidden_size=32), tokenizer=parts["tokenizer"](),
                                             unet=unet, scheduler=sched, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(str(folder))
    return folder


def build_tiny_sdxl(folder: Path, *, seed: int = 0, force_zeros_for_empty_prompt: bool = True, prediction_type: str = "epsilon") -> Path:
    """Write a tiny SDXL-layout pipeline folder (random weights from ``seed``; SDXL base's scheduler config) and return it."""
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(seed)
    unet = diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32 + 48, attention_head_dim=(2, 4), use_linear_projection=True, transformer_layers_per_block=(1, 2),
        addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=8 * 6 + SDXL_POOLED, norm_num_groups=8)
    parts = _tiny_parts(folder, scaling_factor=0.13025)
    pipe = diffusers.StableDiffusionXLPipeline(
        vae=parts["vae"], text_encoder=parts["clip"]("CLIPTextModel", hidden_size=32), tokenizer=parts["tokenizer"](),
        text_encoder_2=parts["clip"]("CLIPTextModelWithProjection", hidden_size=48, projection_dim=SDXL_POOLED),
        tokenizer_2=parts["tokenizer"](pad_token="z</w>"), unet=unet, scheduler=diffusers.EulerDiscreteScheduler(),
        force_zeros_for_empty_prompt=force_zeros_for_empty_prompt)
    pipe.save_pretrained(str(folder))
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps({**SDXL_SCHEDULER, "prediction_type": prediction_type}))
    return folder


SD3_CLIP, SD3_JOINT, SD3_SHIFT = 8, 24, 3.0  # each CLIP's width and projection; the transformer's joint width (> 2 x 8: the CLIPs are padded)


def _tiny_t5(folder: Path) -> tuple[Any, Any]:
    """A T5 tokenizer (a unigram over single letters, built with ``tokenizers``) and a one-layer T5EncoderModel of width SD3_JOINT."""
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [("\u2581" + c, -1.0) for c in LETTERS] + [(c, -2.0) for c in LETTERS]
    tok = Tokenizer(models.Unigram(vocab, unk_id=2))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    tokenizer = transformers.T5TokenizerFast(tokenizer_file=str(folder / "tokenizer.json"), extra_ids=0)
    encoder = transformers.T5EncoderModel(transformers.T5Config(vocab_size=len(vocab), d_model=SD3_JOINT, d_kv=8, d_ff=32, num_layers=1, num_heads=2))
    return encoder, tokenizer


def build_tiny_sd3(folder: Path, *, seed: int = 0, t5: bool = False) -> Path:
    """Write a tiny SD3-layout pipeline folder (random weights from ``seed``): an SD3Transformer2DModel (8x8x4 latents, one
    joint block), the VAE, two CLIPTextModelWithProjection of width 8 (pooled 8 + 8), a T5 encoder of width SD3_JOINT when
    ``t5`` (else none: its tokens are zeros, as the stock pipeline makes them without one) and a FlowMatchEulerDiscreteScheduler
    with shift 3."""
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(seed)
    transformer = diffusers.SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=1, attention_head_dim=8,
                                                  num_attention_heads=2, joint_attention_dim=SD3_JOINT, caption_projection_dim=16,
                                                  pooled_projection_dim=2 * SD3_CLIP, out_channels=4, pos_embed_max_size=8)
    parts = _tiny_parts(folder, scaling_factor=1.5305, shift_factor=0.0609)
    clip = lambda: parts["clip"]("CLIPTextModelWithProjection", hidden_size=SD3_CLIP, projection_dim=SD3_CLIP)  # noqa: E731
    pipe = diffusers.StableDiffusion3Pipeline(
        transformer=transformer, scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=SD3_SHIFT), vae=parts["vae"],
        text_encoder=clip(), tokenizer=parts["tokenizer"](), text_encoder_2=clip(), tokenizer_2=parts["tokenizer"](pad_token="z</w>"),
        **dict(zip(("text_encoder_3", "tokenizer_3"), _tiny_t5(folder.parent / f".{folder.name}-t5-src") if t5 else (None, None))))
    pipe.save_pretrained(str(folder))
    return folder


def perturbed_student(pipe, windows: torch.Tensor, scale: float = 0.02, seed: int = 0):
    """The teacher-initialised student moved off the teacher (so comparisons are not DDIM against DDIM)."""
    student = pipe.student(windows)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in student.net.parameters():
            p.add_(scale * p.abs().mean() * torch.randn(p.shape, generator=g))
    return student.eval()


def caption_images(folder: Path, layout: str = "metadata") -> Path:
    """Five small RGB images of mixed sizes and orientations (one in a subfolder, one with an empty caption), captioned by a
    metadata.jsonl (rows in reverse order) or, with ``layout="txt"``, a .txt beside each image."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    rows = []
    for i, ((w, h), text) in enumerate(zip(CAPTION_SIZES, CAPTIONS)):
        name = f"img_{i}.png" if i != 3 else "sub/img_3.jpg"
        (folder / name).parent.mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / name)
        rows.append({"file_name": name, "text": text})
        if layout == "txt":
            (folder / name).with_suffix(".txt").write_text(text + "\n")
    if layout == "metadata":
        (folder / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in reversed(rows)) + "\n")
    return folder


def build_cache(pipe, images: Path, out: Path, **kw: Any):
    """build_latent_cache with small shards and batches (2), no progress bar."""
    from rectflow.perflow.latent_cache import build_latent_cache

    kw.setdefault("shard_size", 2)
    kw.setdefault("encode_batch", 2)
    kw.setdefault("progress", False)
    return build_latent_cache(pipe, images, out, **kw)


@pytest.fixture(scope="session")
def tiny_sd(tmp_path_factory) -> Path:
    """A tiny SD 1.x-layout folder (epsilon prediction, DDIM scaled-linear config), built once per session."""
    torch.set_num_threads(1)
    return build_tiny_sd(tmp_path_factory.mktemp("sd") / "tiny-sd")


@pytest.fixture(scope="session")
def tiny_pipeline(tiny_sd):
    """The :class:`LatentPipeline` of ``tiny_sd`` (read-only: tests must not change its weights)."""
    from rectflow.perflow.latent import load_pipeline

    return load_pipeline(tiny_sd)


@pytest.fixture(scope="session")
def tiny_sd3(tmp_path_factory) -> Path:
    """A tiny SD3-layout folder (see :func:`build_tiny_sd3`), built once per session."""
    torch.set_num_threads(1)
    return build_tiny_sd3(tmp_path_factory.mktemp("sd3") / "tiny-sd3")


@pytest.fixture(scope="session")
def tiny_sd3_pipeline(tiny_sd3):
    """The :class:`LatentPipeline` of ``tiny_sd3`` (read-only)."""
    from rectflow.perflow.latent import load_pipeline

    return load_pipeline(tiny_sd3)


@pytest.fixture(scope="session")
def tiny_sdxl_pipeline(tmp_path_factory):
    """The :class:`LatentPipeline` of a tiny SDXL-layout folder (see the module docstring; the folder is its
    ``.folder``), built once per session (read-only: tests must not change its weights or files)."""
    from rectflow.perflow.latent import load_pipeline

    torch.set_num_threads(1)
    return load_pipeline(build_tiny_sdxl(tmp_path_factory.mktemp("sdxl") / "tiny-sdxl"))
