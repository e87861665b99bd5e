"""Tiny Stable-Diffusion-layout pipeline folders built from configs (nothing is downloaded).

``tiny_sd`` (session scope) is a folder with model_index.json, unet/ (UNet2DConditionModel, 8x8
latents, cross-attention width 32), vae/ (AutoencoderKL, factor 2: 16x16 images), text_encoder/
(a 2-layer CLIPTextModel of width 32), tokenizer/ (a CLIPTokenizer over a 56-token letter vocabulary,
16 tokens per prompt) and scheduler/ (SD's scaled-linear DDIM config).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

LETTERS = "abcdefghijklmnopqrstuvwxyz"


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


def build_tiny_sd(folder: Path, *, prediction_type: str = "epsilon", seed: int = 0, shift_factor: float | None = None,
                  scheduler: str = "DDIMScheduler") -> Path:
    """Write a tiny SD 1.x-layout pipeline folder (random weights from ``seed``) and return it."""
    diffusers = pytest.importorskip("diffusers")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    unet = diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8)
    vae = diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 16), latent_channels=4, norm_num_groups=8, sample_size=16, layers_per_block=1,
        scaling_factor=0.18215, shift_factor=shift_factor)
    vocab, merges = write_tokenizer_files(folder.parent / f".{folder.name}-tokenizer-src")
    tokenizer = transformers.CLIPTokenizer(str(vocab), str(merges), model_max_length=16)
    text_encoder = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=2 + 2 * len(LETTERS), hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
        max_position_embeddings=16, bos_token_id=0, eos_token_id=1, pad_token_id=1))
    sched = getattr(diffusers, scheduler)(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", prediction_type=prediction_type,
                                          **({"clip_sample": False, "set_alpha_to_one": False} if scheduler == "DDIMScheduler" else {}),
                                          steps_offset=1)
    pipe = diffusers.StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=sched,
                                             safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(str(folder))
    return folder


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
