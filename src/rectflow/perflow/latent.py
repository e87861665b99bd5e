"""Latent text-to-image teachers for PeRFlow: Stable Diffusion 1.x / 2.x, SDXL and SD3 pipelines read from
LOCAL diffusers folders (never downloaded), and the accelerated student exported back as a complete
pipeline folder (optional extras: ``pip install 'rectflow[perflow]'`` for diffusers, transformers).

A pipeline folder (``model_index.json``, ``unet/``, ``vae/``, ``text_encoder/``, ``tokenizer/``,
``scheduler/``; SDXL also ``text_encoder_2/``, ``tokenizer_2/``; SD3 ``transformer/`` instead of
``unet/``, both CLIP pairs and optionally the T5 pair ``text_encoder_3/``, ``tokenizer_3/``) becomes a
:class:`LatentPipeline`:

* the teacher: ``UNet2DConditionModel`` behind :class:`~rectflow.perflow.adapters.TextUNetAdapter`,
  the scheduler config turned into an affine path + parameterisation by
  :func:`~rectflow.perflow.scheduler_config.schedule_from_config` (the one place), and rectflow time t
  mapped to the UNet's step index n = N (1 - t) - 1 (SD3: ``SD3Transformer2DModel`` behind
  :class:`~rectflow.perflow.adapters.SD3TransformerAdapter` on the flow-matching line, kind u,
  time input sigma N = N (1 - t));
* the VAE: images (B, 3, H, W) in [-1, 1] <-> latents (B, C, H/f, W/f) scaled as the pipeline scales
  them, z = (mean - shift_factor) * scaling_factor (``shift_factor`` 0 when the VAE has none);
* the text encoder(s) and tokenizer(s): prompts -> the condition, as the stock pipeline encodes them
  (padding to ``model_max_length``, truncation), and the null condition of classifier-free guidance.

The condition.  SD 1.x / 2.x: the text encoder's last hidden state (B, L, D); the null condition is
the empty prompt's.  SDXL (``StableDiffusionXLPipeline``: ``text_encoder`` a CLIPTextModel,
``text_encoder_2`` a CLIPTextModelWithProjection, a UNet with ``addition_embed_type="text_time"``):
the pair (hidden (B, L, D1 + D2), pooled (B, P)), both encoders' penultimate hidden states side by
side and text_encoder_2's projected ``text_embeds``, as ``StableDiffusionXLPipeline.encode_prompt``
makes them; the null condition is the stock pipeline's for an empty negative prompt (zeros when the
folder's ``force_zeros_for_empty_prompt`` is true, its default, else the empty prompt's pair).  SDXL's
size conditioning (original size, crop (0, 0), target size) is not part of the condition: the
adapter makes it from the latents' size (:func:`~rectflow.perflow.adapters.size_time_ids`), as
the stock pipeline does at a given height and width, so a latent cache stores hidden + pooled only.
SD3 (``StableDiffusion3Pipeline``): the pair (hidden (B, 77 + 256, D), pooled (B, P1 + P2)) of its
``encode_prompt``: both CLIPs' penultimate hidden states side by side, zero-padded to the
transformer's ``joint_attention_dim``, followed by 256 T5 tokens (zeros in a folder without the T5),
and both CLIPs' projected ``text_embeds``; the null condition is the empty prompt's pair.

:func:`export_pipeline` writes the student's UNet with the teacher's VAE, text encoder(s) and
tokenizer(s), the teacher's safety checker and feature extractor when it has them (SD 1.x / 2.x), no image
encoder, a model card (``README.md``) and a scheduler, so that
``diffusers.StableDiffusionPipeline.from_pretrained(folder, trust_remote_code=True)`` (SDXL:
``StableDiffusionXLPipeline``; SD3: ``StableDiffusion3Pipeline``, its absent parts passed as None)
samples in any number of steps >= K without rectflow (the scheduler's code ships in ``scheduler/``).

Refused with one line naming the file or key: Flux and other transformer pipelines, an SD3 folder
without its CLIP text encoders (a teacher for :func:`~rectflow.perflow.diffusers_io.load_teacher` with
precomputed conditions), inpainting / depth UNets (more input
channels), upscalers and unCLIP (class embeddings), LCM UNets (a guidance embedding), IP-Adapter /
Kandinsky conditions, added conditions other than SDXL's in an SDXL folder, an SDXL refiner (no
``text_encoder``, aesthetic-score conditioning), and an SDXL folder missing ``text_encoder_2/`` or
``tokenizer_2/``.
"""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from torch import Tensor, nn

from rectflow.draws import randn
from rectflow.engine.io import load_json, save_json
from rectflow.engine.shards import state_dict_sha256
from rectflow.errors import CheckpointError, ConfigError, DataError
from rectflow.perflow.adapters import SD3TransformerAdapter, TextUNetAdapter, optional_transformers
from rectflow.perflow.diffusers_io import load_diffusers_model, staged_export, write_student_parts
from rectflow.perflow.model_card import write_model_card
from rectflow.perflow.scheduler_config import PERFLOW_SCHEDULER_ENTRY, cfg_is_flow, schedule_from_config, schedule_from_file, stock_scheduler_config
from rectflow.perflow.student import PeRFlowStudent
from rectflow.perflow.teacher import Teacher

__all__ = ["LatentPipeline", "export_pipeline", "load_pipeline"]

_PARTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
_SDXL_PARTS = (*_PARTS, "text_encoder_2", "tokenizer_2")
_SD3_PARTS = ("transformer", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "scheduler")
_T5_PARTS = ("text_encoder_3", "tokenizer_3")  # optional in SD3: without them the T5 tokens are zeros, as in the stock pipeline
_DEFAULT_CLASSES = {"unet": "UNet2DConditionModel", "vae": "AutoencoderKL", "text_encoder": "CLIPTextModel", "tokenizer": "CLIPTokenizer",
                    "text_encoder_2": "CLIPTextModelWithProjection", "tokenizer_2": "CLIPTokenizer", "transformer": "SD3Transformer2DModel",
                    "text_encoder_3": "T5EncoderModel", "tokenizer_3": "T5TokenizerFast"}
T5_MAX_LENGTH = 256  # StableDiffusion3Pipeline's default max_sequence_length: the T5 tokens of an SD3 condition
# UNet config keys that add inputs beyond (z, t, text): each belongs to a pipeline we do not drive (but SDXL's "text_time").
_UNET_EXTRAS = {"addition_embed_type": "added conditioning: only SDXL's 'text_time', in an SDXL folder with text_encoder_2/ and tokenizer_2/",
                "class_embed_type": "a class / noise-level embedding (upscalers, unCLIP)",
                "time_cond_proj_dim": "a guidance-scale embedding (LCM)",
                "encoder_hid_dim_type": "a projected image/text condition (IP-Adapter, Kandinsky)"}


def _folder_sha256(folder: Path) -> str:
    """sha256 over a folder's files (relative names and bytes, sorted): identifies a tokenizer."""
    h = hashlib.sha256()
    for p in sorted(q for q in folder.rglob("*") if q.is_file()):
        h.update(p.relative_to(folder).as_posix().encode() + b"\0")
        h.update(p.read_bytes())
    return h.hexdigest()


def _joint_sha256(digests: Sequence[str]) -> str:
    """One hex digest for several parts: the part's own for one (an SD 1.x / 2.x fingerprint is unchanged), else sha256 over them in order."""
    return digests[0] if len(digests) == 1 else hashlib.sha256(",".join(digests).encode()).hexdigest()


def _text_inputs(tokenizer: Any, prompts: list[str]) -> Any:
    """Token ids (B, L) and attention mask, padded to the tokenizer's max length and truncated, as the stock pipelines do."""
    return tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt")


class LatentPipeline:
    """A latent text-to-image diffusion pipeline as PeRFlow needs it (see the module docstring).

    Attributes:
        folder: the pipeline folder it was read from.
        denoiser: the UNet (SD 1.x / 2.x, SDXL; also ``unet``) or SD3's transformer.
        vae, text_encoder, tokenizer: the diffusers / transformers components (eval mode, frozen);
            ``text_encoder_2``, ``tokenizer_2`` the second pair of SDXL and SD3 (None for SD 1.x / 2.x);
            ``text_encoder_3``, ``tokenizer_3`` SD3's T5 (None without it).
        scheduler_config: the teacher's scheduler config (a dict).
        teacher: the conditional :class:`Teacher` (``cond``: text embeddings (B, L, D); SDXL the pair
            (hidden (B, L, D), pooled (B, P)), see :meth:`encode_text`).
    """

    def __init__(self, folder: Path, denoiser: nn.Module, vae: nn.Module, text_encoder: nn.Module, tokenizer: Any,
                 scheduler_config: dict[str, Any], model_index: dict[str, Any], *, text_encoder_2: nn.Module | None = None,
                 tokenizer_2: Any = None, text_encoder_3: nn.Module | None = None, tokenizer_3: Any = None) -> None:
        self.folder, self.denoiser, self.vae, self.text_encoder, self.tokenizer = Path(folder), denoiser, vae, text_encoder, tokenizer
        self.text_encoder_2, self.tokenizer_2, self.text_encoder_3, self.tokenizer_3 = text_encoder_2, tokenizer_2, text_encoder_3, tokenizer_3
        self.scheduler_config, self.model_index = scheduler_config, model_index
        self.is_sd3 = type(denoiser).__name__ == "SD3Transformer2DModel"
        self.schedule, self.parameterization = schedule_from_config(scheduler_config, allow_flow=self.is_sd3)
        for m in (denoiser, vae, text_encoder, text_encoder_2, text_encoder_3):
            if m is not None:
                m.eval().requires_grad_(False)
        net = SD3TransformerAdapter(denoiser) if self.is_sd3 else TextUNetAdapter(denoiser, self.vae_scale_factor)
        self.teacher = Teacher(net, self.schedule, self.parameterization, time_map=self.schedule.t_to_timestep)
        self._fingerprint: dict[str, Any] | None = None

    @property
    def unet(self) -> nn.Module:
        """The denoising network (SD3: its transformer; the name is SD 1.x / 2.x's and SDXL's)."""
        return self.denoiser

    # ----- shapes and scaling
    @property
    def device(self) -> torch.device:
        return next(self.denoiser.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.denoiser.parameters()).dtype

    @property
    def scaling_factor(self) -> float:
        return float(self.vae.config.scaling_factor)

    @property
    def shift_factor(self) -> float:
        return float(getattr(self.vae.config, "shift_factor", None) or 0.0)

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """(C, h, w) of one latent: the denoiser's channels and sample size."""
        size = self.denoiser.config.sample_size
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        return int(self.denoiser.config.in_channels), int(h), int(w)

    @property
    def resolution(self) -> tuple[int, int]:
        """(H, W) of the images the pipeline generates by default: latent size x VAE factor."""
        _, h, w = self.latent_shape
        return h * self.vae_scale_factor, w * self.vae_scale_factor

    @property
    def is_sdxl(self) -> bool:
        """Whether this is an SDXL pipeline (two text encoders and a UNet; the condition is the pair (hidden, pooled))."""
        return self.text_encoder_2 is not None and not self.is_sd3

    @property
    def text_shape(self) -> tuple[int, int]:
        """(L, D) of one prompt's hidden states: the tokenizer's max length, the encoder's width (SDXL: both widths summed;
        SD3: the CLIP tokens then T5_MAX_LENGTH T5 tokens, at the transformer's joint_attention_dim)."""
        if self.is_sd3:
            return int(self.tokenizer.model_max_length) + T5_MAX_LENGTH, int(self.denoiser.config.joint_attention_dim)
        width = sum(int(m.config.hidden_size) for m in (self.text_encoder, self.text_encoder_2) if m is not None)
        return int(self.tokenizer.model_max_length), width

    @property
    def pooled_dim(self) -> int:
        """P of the pooled text embedding: SDXL's text_encoder_2 projection, SD3's two CLIP projections side by side;
        0 for SD 1.x / 2.x (no pooled part)."""
        if self.is_sd3:
            return int(self.text_encoder.config.projection_dim) + int(self.text_encoder_2.config.projection_dim)
        return int(self.text_encoder_2.config.projection_dim) if self.is_sdxl else 0

    @property
    def null_condition(self) -> str:
        """How the null condition is made: "zeros" (SDXL with ``force_zeros_for_empty_prompt``, its default) or "empty_prompt"."""
        return "zeros" if self.is_sdxl and self.model_index.get("force_zeros_for_empty_prompt", True) else "empty_prompt"

    # ----- VAE
    @torch.no_grad()
    def encode_images(self, images: Tensor, *, mode: str = "mean", generator: torch.Generator | None = None, noise: Tensor | None = None) -> Tensor:
        """Images (B, 3, H, W) in [-1, 1] -> scaled latents (B, C, h, w).

        ``mode`` "mean": the VAE posterior's mean (deterministic); "sample": mean + std * noise, the
        standard normal ``noise`` (B, C, h, w) given, or drawn from ``generator``.
        """
        if images.dim() != 4 or tuple(images.shape[-2:]) != self.resolution:
            raise DataError(f"LatentPipeline.encode_images: expected images (B, 3, {self.resolution[0]}, {self.resolution[1]}), got {tuple(images.shape)}")
        if mode not in ("mean", "sample"):
            raise ConfigError(f"LatentPipeline.encode_images: mode must be 'mean' or 'sample', got {mode!r}")
        dist = self.vae.encode(images.to(self.device, self.vae.dtype)).latent_dist
        z = dist.mean
        if mode == "sample":
            if noise is None:
                noise = randn(z.shape, generator=generator, dtype=z.dtype, draw_on=z.device)
            z = z + dist.std * noise.to(z.device, z.dtype)
        return (z - self.shift_factor) * self.scaling_factor

    @torch.no_grad()
    def decode_latents(self, latents: Tensor) -> Tensor:
        """Scaled latents (B, C, h, w) -> images (B, 3, H, W), nominally in [-1, 1] (not clipped)."""
        z = latents.to(self.device, self.vae.dtype) / self.scaling_factor + self.shift_factor
        return self.vae.decode(z).sample

    # ----- text
    def tokenize(self, prompts: str | Sequence[str]) -> Tensor:
        """Token ids (B, L) of the (first) tokenizer, padded to its max length and truncated, as the stock pipeline does."""
        return _text_inputs(self.tokenizer, [prompts] if isinstance(prompts, str) else list(prompts)).input_ids

    def check_prompts(self, prompts: Sequence[str], sources: Sequence[str] | None = None) -> None:
        """Raise :class:`DataError` for the first prompt longer than a tokenizer of this pipeline takes
        (its text encoder would silently cut the rest), naming ``sources[i]`` (e.g. the caption's
        file) or else the prompt itself."""
        prompts = list(prompts)
        for tokenizer, part in ((self.tokenizer, "tokenizer"), (self.tokenizer_2, "tokenizer_2"), (self.tokenizer_3, "tokenizer_3")):
            if tokenizer is None or not prompts:
                continue
            limit = T5_MAX_LENGTH if part == "tokenizer_3" else int(tokenizer.model_max_length)
            for i, ids in enumerate(tokenizer(prompts, truncation=False, verbose=False).input_ids):
                if len(ids) > limit:
                    what = sources[i] if sources is not None else f"prompt {prompts[i][:60]!r}"
                    raise DataError(f"{what} is {len(ids)} tokens, more than the {limit} of {self.folder / part} "
                                    "(the text encoder would cut the rest): shorten it")

    @torch.no_grad()
    def encode_text(self, prompts: str | Sequence[str]) -> Tensor | tuple[Tensor, Tensor]:
        """Prompts -> the UNet's condition, as the stock pipeline encodes them.

        SD 1.x / 2.x: the text encoder's last hidden state (B, L, D), the UNet's ``encoder_hidden_states``.
        SDXL: the pair (hidden (B, L, D1 + D2), pooled (B, P)): each tokenizer's ids through its encoder,
        the penultimate hidden states concatenated on the last axis (in text_encoder_2's dtype), and
        text_encoder_2's projected ``text_embeds`` (``StableDiffusionXLPipeline.encode_prompt`` without
        clip_skip).
        SD3: the pair (hidden (B, 77 + 256, D), pooled (B, P1 + P2)) of
        ``StableDiffusion3Pipeline.encode_prompt``: both CLIPs' penultimate hidden states side by side,
        zero-padded to the transformer's width D, then the T5's 256 tokens (zeros without a T5); pooled:
        both CLIPs' projected ``text_embeds``.
        A prompt longer than a tokenizer takes is refused (:meth:`check_prompts`), where the stock
        pipeline cuts it with a warning.
        """
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        self.check_prompts(prompts)
        if self.is_sd3:
            return self._encode_sd3(prompts)
        if not self.is_sdxl:
            enc = _text_inputs(self.tokenizer, prompts)
            mask = enc.attention_mask.to(self.device) if getattr(self.text_encoder.config, "use_attention_mask", False) else None
            return self.text_encoder(enc.input_ids.to(self.device), attention_mask=mask)[0]
        hidden = []
        for tokenizer, encoder in ((self.tokenizer, self.text_encoder), (self.tokenizer_2, self.text_encoder_2)):
            out = encoder(_text_inputs(tokenizer, prompts).input_ids.to(self.device), output_hidden_states=True)
            hidden.append(out.hidden_states[-2])
        return torch.cat(hidden, dim=-1).to(self.text_encoder_2.dtype), out.text_embeds

    def _encode_sd3(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        hidden, pooled = [], []
        for tokenizer, encoder in ((self.tokenizer, self.text_encoder), (self.tokenizer_2, self.text_encoder_2)):
            out = encoder(_text_inputs(tokenizer, prompts).input_ids.to(self.device), output_hidden_states=True)
            hidden.append(out.hidden_states[-2].to(self.text_encoder.dtype))
            pooled.append(out.text_embeds)
        clip = torch.cat(hidden, dim=-1)
        if self.text_encoder_3 is None:
            t5 = torch.zeros((len(prompts), T5_MAX_LENGTH, int(self.denoiser.config.joint_attention_dim)), dtype=self.text_encoder.dtype, device=self.device)
        else:
            ids = self.tokenizer_3(prompts, padding="max_length", max_length=T5_MAX_LENGTH, truncation=True, add_special_tokens=True,
                                   return_tensors="pt").input_ids
            t5 = self.text_encoder_3(ids.to(self.device))[0].to(self.text_encoder_3.dtype)
        clip = torch.nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        return torch.cat([clip, t5], dim=-2), torch.cat(pooled, dim=-1)

    def null_embedding(self) -> Tensor | tuple[Tensor, Tensor]:
        """The null condition with a batch of 1, the unconditional input of classifier-free guidance, as the stock
        pipeline makes it for an empty negative prompt: the empty prompt's embedding (1, L, D); SDXL the pair
        ((1, L, D), (1, P)), zeros when :attr:`null_condition` is "zeros", else the empty prompt's pair."""
        if self.null_condition == "zeros":
            dtype = self.text_encoder_2.dtype
            return torch.zeros((1, *self.text_shape), dtype=dtype, device=self.device), torch.zeros((1, self.pooled_dim), dtype=dtype, device=self.device)
        return self.encode_text([""])

    # ----- identity
    def fingerprint(self) -> dict[str, Any]:
        """What a latent cache made with this pipeline depends on: hashes of the VAE, the text encoder(s) and
        the tokenizer(s) (SDXL: one digest over both of each), the VAE's scaling, the shapes, the pooled
        width and how the null condition is made (computed once)."""
        if self._fingerprint is None:
            encoders = [m for m in (self.text_encoder, self.text_encoder_2, self.text_encoder_3) if m is not None]
            tokenizers = [self.folder / name for name in ("tokenizer", "tokenizer_2", "tokenizer_3")[:len(encoders)]]
            self._fingerprint = {
                "vae_sha256": state_dict_sha256(self.vae),
                "text_encoder_sha256": _joint_sha256([state_dict_sha256(m) for m in encoders]),
                "tokenizer_sha256": _joint_sha256([_folder_sha256(tok) if tok.is_dir() else "unknown" for tok in tokenizers]),
                "scaling_factor": self.scaling_factor,
                "shift_factor": self.shift_factor,
                "resolution": list(self.resolution),
                "latent_shape": list(self.latent_shape),
                "text_shape": list(self.text_shape),
                "pooled_dim": self.pooled_dim,
                "null_condition": self.null_condition,
            }
        return dict(self._fingerprint)

    def student(self, boundaries: Tensor) -> PeRFlowStudent:
        """A PeRFlow student initialised from the teacher's network (a trainable deep copy) on ``boundaries``."""
        return PeRFlowStudent.from_teacher(self.teacher, boundaries)

    def __repr__(self) -> str:
        sdxl = f", {'SD3' if self.is_sd3 else 'SDXL'}: pooled {self.pooled_dim}, null {self.null_condition}" if self.pooled_dim else ""
        return (f"LatentPipeline({str(self.folder)!r}, {self.parameterization} on {self.schedule!r}, latents {list(self.latent_shape)}, "
                f"text {list(self.text_shape)}{sdxl})")


def _check_folder(folder: Path) -> tuple[dict[str, Any], tuple[str, ...]]:
    """(model_index.json or {}, the parts it must hold) of a supported SD 1.x / 2.x, SDXL or SD3 folder; one-line ConfigError otherwise."""
    if not folder.is_dir():
        raise ConfigError(f"diffusers pipeline folder {str(folder)!r} does not exist (only local folders are read)")
    index = load_json(folder / "model_index.json") if (folder / "model_index.json").is_file() else {}
    if not isinstance(index, dict):
        raise CheckpointError(f"{folder / 'model_index.json'}: not a JSON mapping")
    name = str(index.get("_class_name", ""))
    if "transformer" in index or (folder / "transformer").is_dir():
        if name != "StableDiffusion3Pipeline":
            raise ConfigError(f"{folder}: a transformer pipeline ({name or 'transformer/'}, e.g. Flux) is not supported; use SD 1.x / 2.x, SDXL or SD3")
        for part in _SD3_PARTS:
            if not (folder / part).is_dir() or _absent(index, part):
                raise ConfigError(f"diffusers pipeline folder {str(folder)!r} has no {part}/ (an SD3 layout needs {', '.join(_SD3_PARTS)}; "
                                  "without its CLIP text encoders it is a teacher for perflow.load_teacher with precomputed conditions)")
        t5 = _has_t5(folder, index)
        for part in ("text_encoder", "text_encoder_2"):
            if _class_of(index, part, sd3=True) != "CLIPTextModelWithProjection":
                raise ConfigError(f"{folder / 'model_index.json'}: {part} is a {_class_of(index, part, sd3=True)}, not the CLIPTextModelWithProjection "
                                  "whose projected text_embeds are half of SD3's pooled condition")
        return index, _SD3_PARTS + (_T5_PARTS if t5 else ())
    sdxl = "text_encoder_2" in index or (folder / "text_encoder_2").is_dir() or "XL" in name
    first = index.get("text_encoder", "")
    no_first = first is None or (isinstance(first, list) and first[:1] == [None]) or not (folder / "text_encoder").is_dir()
    if sdxl and (no_first or index.get("requires_aesthetics_score")):
        raise ConfigError(f"{folder}: an SDXL refiner layout ({name or 'text_encoder_2/ only'}: no text_encoder, aesthetic-score conditioning) "
                          "is not supported; use an SDXL base folder (text_encoder/ and text_encoder_2/)")
    parts = _SDXL_PARTS if sdxl else _PARTS
    for part in parts:
        if not (folder / part).is_dir():
            raise ConfigError(f"diffusers pipeline folder {str(folder)!r} has no {part}/ (an {'SDXL' if sdxl else 'SD 1.x / 2.x'} layout needs {', '.join(parts)})")
    if sdxl and _class_of(index, "text_encoder_2") != "CLIPTextModelWithProjection":
        raise ConfigError(f"{folder / 'model_index.json'}: text_encoder_2 is a {_class_of(index, 'text_encoder_2')}, not the CLIPTextModelWithProjection "
                          "whose projected text_embeds are SDXL's pooled condition")
    return index, parts


def _has_t5(folder: Path, index: dict[str, Any]) -> bool:
    """Whether an SD3 folder has a T5 pair: both entries null in model_index.json say no (the stock pipeline
    wants ``text_encoder_3=None, tokenizer_3=None`` passed for such a folder); else a T5 named there or
    present on disk must be whole (both folders, the tokenizer's vocabulary).  One entry null and the other
    named is refused: half a T5 cannot encode, and dropping the named one silently would change the condition."""
    nulls = [part for part in _T5_PARTS if part in index and _absent(index, part)]
    if nulls:
        named = [part for part in _T5_PARTS if part in index and not _absent(index, part)]
        if named:
            raise ConfigError(f"{folder / 'model_index.json'}: {nulls[0]} is null but {named[0]} is named "
                              "(null both to run without the T5, or name both)")
        return False
    if not any(part in index or (folder / part).is_dir() for part in _T5_PARTS):
        return False
    for part, other in zip(_T5_PARTS, reversed(_T5_PARTS)):
        if not (folder / part).is_dir():
            named = f"model_index.json names {part}" if part in index else f"the folder has {other}/"
            raise ConfigError(f"{folder}: {named} but {folder / part}/ does not exist (set both T5 entries to null to run without the T5)")
    if not any((folder / "tokenizer_3" / name).is_file() for name in ("tokenizer.json", "spiece.model")):
        raise ConfigError(f"{folder / 'tokenizer_3'}: no tokenizer.json or spiece.model (the T5 tokenizer's vocabulary)")
    return True


def _absent(index: dict[str, Any], part: str) -> bool:
    """Whether model_index.json says the folder has no ``part`` (null, or [null, null])."""
    entry = index.get(part, "")
    return entry is None or (isinstance(entry, (list, tuple)) and entry[:1] == [None])


def _class_of(index: dict[str, Any], part: str, *, sd3: bool = False) -> str:
    entry = index.get(part)
    if isinstance(entry, (list, tuple)) and len(entry) == 2 and isinstance(entry[1], str):
        return entry[1]
    if sd3 and part == "text_encoder":  # SD3's first CLIP is projected too
        return "CLIPTextModelWithProjection"
    return _DEFAULT_CLASSES[part]


def _teacher_scheduler_config(folder: Path, sd3: bool = False) -> dict[str, Any]:
    """The teacher's scheduler config of a pipeline folder (an exported student's: the teacher's, from perflow.json), checked."""
    path = folder / "scheduler" / "scheduler_config.json"
    cfg = load_json(path)
    if cfg.get("_class_name") == "PeRFlowScheduler" and (folder / "perflow.json").is_file():
        path = folder / "perflow.json"
        cfg = load_json(path)["teacher_scheduler"]
    schedule_from_file(path, cfg, allow_flow=sd3)  # refuses an unsupported scheduler, naming the file, before any weights are read
    if sd3 and not cfg_is_flow(cfg):
        raise ConfigError(f"{path}: {cfg.get('_class_name')} is not a flow-matching scheduler; an SD3 transformer needs its FlowMatchEulerDiscreteScheduler")
    return cfg


def _check_unet_config(path: Path, cfg: dict[str, Any], vae_cfg: dict[str, Any], pooled_dim: int | None) -> None:
    """Refuse (one line naming ``path``, the UNet's config.json) a UNet with inputs beyond (z, t, text) or
    another latent width than the VAE's.  ``pooled_dim``: None for an SD 1.x / 2.x folder; for an SDXL
    folder text_encoder_2's projection_dim, and the UNet must take SDXL's added conditions of that width."""
    sdxl = pooled_dim is not None
    for key, what in _UNET_EXTRAS.items():
        if cfg.get(key) is not None and not (sdxl and key == "addition_embed_type" and cfg[key] == "text_time"):
            raise ConfigError(f"{path}: {key}={cfg[key]!r} ({what}) is not supported")
    if sdxl and cfg.get("addition_embed_type") != "text_time":
        raise ConfigError(f"{path}: addition_embed_type={cfg.get('addition_embed_type')!r}: the UNet of an SDXL folder must take SDXL's added "
                          "conditions (addition_embed_type 'text_time': pooled text and size ids)")
    want = int(cfg.get("addition_time_embed_dim") or 0) * 6 + (pooled_dim or 0)
    if sdxl and cfg.get("projection_class_embeddings_input_dim") != want:
        raise ConfigError(f"{path}: projection_class_embeddings_input_dim={cfg.get('projection_class_embeddings_input_dim')} is not "
                          f"6 size ids x addition_time_embed_dim + text_encoder_2's projection_dim = {want}")
    if cfg.get("in_channels") != vae_cfg.get("latent_channels") or cfg.get("out_channels") != vae_cfg.get("latent_channels"):
        raise ConfigError(f"{path}: in_channels={cfg.get('in_channels')} / out_channels={cfg.get('out_channels')} "
                          f"differ from the VAE's latent_channels={vae_cfg.get('latent_channels')} (inpainting / depth UNets are not supported)")


def _load_text_part(folder: Path, index: dict[str, Any], part: str, dtype: torch.dtype = torch.float32, *, sd3: bool = False) -> Any:
    """A text encoder (in ``dtype``, as transformers loads it: a T5 keeps its ``wo`` layers in float32) or
    tokenizer (``part``: its subfolder) from the local folder; CheckpointError naming it."""
    cls, what = _class_of(index, part, sd3=sd3), "tokenizer" if part.startswith("tokenizer") else "text encoder"
    kw = {}
    if what == "text encoder":
        load_json(folder / part / "config.json")
        kw["torch_dtype"] = dtype
    try:
        return getattr(optional_transformers(), cls).from_pretrained(str(folder / part), local_files_only=True, **kw)
    except (AttributeError, OSError, ValueError, RuntimeError, KeyError, SafetensorError) as e:
        raise CheckpointError(f"{folder / part}: cannot load the {what} {cls} ({type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''})") from None


def load_pipeline(folder: str | Path, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> LatentPipeline:
    """A :class:`LatentPipeline` from a local SD 1.x / 2.x, SDXL or SD3 diffusers folder (nothing is downloaded).

    Raises:
        ConfigError: a missing part, an unsupported pipeline (Flux, an SDXL refiner, inpainting, LCM, ...),
            UNet input or scheduler (the file or key is named), widths that do not fit together, or a
            missing optional extra.
        CheckpointError: a corrupt config or weights file (named).
    """
    folder = Path(folder)
    index, parts = _check_folder(folder)
    if "transformer" in parts:
        return _load_sd3(folder, index, parts, dtype, device)
    sdxl = "text_encoder_2" in parts
    sched_cfg = _teacher_scheduler_config(folder)
    unet_cls = _class_of(index, "unet")
    if unet_cls != "UNet2DConditionModel":
        raise ConfigError(f"{folder}: unet is a {unet_cls}, not a UNet2DConditionModel (text-to-image latent UNet)")
    unet_path = folder / "unet" / "config.json"
    unet_cfg = load_json(unet_path)
    pooled_dim = int(load_json(folder / "text_encoder_2" / "config.json").get("projection_dim") or 0) if sdxl else None
    _check_unet_config(unet_path, unet_cfg, load_json(folder / "vae" / "config.json"), pooled_dim)  # before any weights are read
    unet = load_diffusers_model(unet_cls, folder / "unet", dtype=dtype, what="UNet").to(device)
    vae = load_diffusers_model(_class_of(index, "vae"), folder / "vae", dtype=dtype, what="VAE").to(device)
    text = {part: _load_text_part(folder, index, part, dtype) for part in parts if part.startswith(("text_encoder", "tokenizer"))}
    encoders = [text[part] for part in ("text_encoder", "text_encoder_2") if part in text]
    if getattr(unet.config, "cross_attention_dim", None) != sum(int(m.config.hidden_size) for m in encoders):
        raise ConfigError(f"{unet_path}: cross_attention_dim={unet.config.cross_attention_dim} differs from the text "
                          f"encoder{'s' if sdxl else ''}' hidden_size={' + '.join(str(m.config.hidden_size) for m in encoders)}")
    if sdxl and text["tokenizer_2"].model_max_length != text["tokenizer"].model_max_length:
        raise ConfigError(f"{folder / 'tokenizer_2'}: model_max_length={text['tokenizer_2'].model_max_length} differs from tokenizer/'s "
                          f"{text['tokenizer'].model_max_length} (the two encoders' hidden states are concatenated token by token)")
    for part in ("text_encoder", "text_encoder_2"):
        if part in text:
            text[part] = text[part].to(device=device)
    return LatentPipeline(folder, unet, vae, text["text_encoder"], text["tokenizer"], sched_cfg, index,
                          text_encoder_2=text.get("text_encoder_2"), tokenizer_2=text.get("tokenizer_2"))


def _load_sd3(folder: Path, index: dict[str, Any], parts: tuple[str, ...], dtype: torch.dtype, device: str | torch.device) -> LatentPipeline:
    """:func:`load_pipeline` of an SD3 folder: the widths are checked before any weights are read."""
    sched_cfg = _teacher_scheduler_config(folder, sd3=True)
    cls = _class_of(index, "transformer")
    if cls != "SD3Transformer2DModel":
        raise ConfigError(f"{folder / 'model_index.json'}: transformer is a {cls}, not an SD3Transformer2DModel")
    tr_path = folder / "transformer" / "config.json"
    tr_cfg, vae_cfg = load_json(tr_path), load_json(folder / "vae" / "config.json")
    clips = [load_json(folder / part / "config.json") for part in ("text_encoder", "text_encoder_2")]
    widths, pooled = [int(c.get("hidden_size", 0)) for c in clips], sum(int(c.get("projection_dim") or 0) for c in clips)
    if tr_cfg.get("in_channels") != vae_cfg.get("latent_channels"):
        raise ConfigError(f"{tr_path}: in_channels={tr_cfg.get('in_channels')} differs from the VAE's latent_channels={vae_cfg.get('latent_channels')}")
    if tr_cfg.get("pooled_projection_dim") != pooled:
        raise ConfigError(f"{tr_path}: pooled_projection_dim={tr_cfg.get('pooled_projection_dim')} is not the two CLIP projections' "
                          f"{' + '.join(str(int(c.get('projection_dim') or 0)) for c in clips)} = {pooled}")
    if int(tr_cfg.get("joint_attention_dim") or 0) < sum(widths):
        raise ConfigError(f"{tr_path}: joint_attention_dim={tr_cfg.get('joint_attention_dim')} is narrower than the two CLIPs' hidden states "
                          f"{' + '.join(map(str, widths))} (they are padded to it)")
    if "text_encoder_3" in parts:
        d_model = load_json(folder / "text_encoder_3" / "config.json").get("d_model")
        if d_model != tr_cfg.get("joint_attention_dim"):
            raise ConfigError(f"{tr_path}: joint_attention_dim={tr_cfg.get('joint_attention_dim')} differs from the T5's d_model={d_model} "
                              f"({folder / 'text_encoder_3' / 'config.json'})")
    denoiser = load_diffusers_model(cls, folder / "transformer", dtype=dtype, what="transformer").to(device)
    vae = load_diffusers_model(_class_of(index, "vae"), folder / "vae", dtype=dtype, what="VAE").to(device)
    text = {part: _load_text_part(folder, index, part, dtype, sd3=True) for part in parts if part.startswith(("text_encoder", "tokenizer"))}
    if text["tokenizer_2"].model_max_length != text["tokenizer"].model_max_length:
        raise ConfigError(f"{folder / 'tokenizer_2'}: model_max_length={text['tokenizer_2'].model_max_length} differs from tokenizer/'s "
                          f"{text['tokenizer'].model_max_length} (the two encoders' hidden states are concatenated token by token)")
    for part in ("text_encoder", "text_encoder_2", "text_encoder_3"):
        if part in text:
            text[part] = text[part].to(device=device)
    return LatentPipeline(folder, denoiser, vae, text["text_encoder"], text["tokenizer"], sched_cfg, index, text_encoder_2=text["text_encoder_2"],
                          tokenizer_2=text["tokenizer_2"], text_encoder_3=text.get("text_encoder_3"), tokenizer_3=text.get("tokenizer_3"))


def export_pipeline(student: PeRFlowStudent, teacher: LatentPipeline | str | Path, folder: str | Path, *, stock_scheduler: bool = False,
                    extra: dict[str, Any] | None = None) -> Path:
    """Write a complete pipeline folder: the student's UNet (SD3: transformer), the teacher's VAE, text encoder(s) and
    tokenizer(s) (copied byte for byte), the teacher's safety checker and feature extractor (SD 1.x / 2.x, when it has them),
    no image encoder, a model card and a scheduler; an SDXL
    teacher's folder keeps its ``force_zeros_for_empty_prompt`` (``StableDiffusionXLPipeline.from_pretrained`` loads it;
    SD3: ``StableDiffusion3Pipeline``, a missing T5 kept as ``[null, null]``).

    ``scheduler/`` is our :class:`~rectflow.perflow.diffusers_scheduler.PeRFlowScheduler` (any
    ``num_inference_steps >= K``; its code ships in the folder: ``from_pretrained(folder, trust_remote_code=True)``),
    plus ``scheduler_ddim/`` (SD3: ``scheduler_flowmatch/``) when a stock scheduler is exact at K steps.  ``stock_scheduler=True``
    (exact windows only) names that stock scheduler in ``model_index.json`` instead (the folder then loads in
    any diffusers install; ours moves to ``scheduler_perflow/``).  The folder is built next to ``folder``
    and renamed into place, so a killed export leaves no half-written pipeline; a previous export there
    is replaced, anything else is refused.  ``extra``: more entries of the folder's ``perflow.json``
    (e.g. the guidance scale the student samples at), written before the rename like the rest.
    """
    src = teacher.folder if isinstance(teacher, LatentPipeline) else Path(teacher)
    index, parts = _check_folder(src)
    teacher_cfg = _teacher_scheduler_config(src, sd3="transformer" in parts)
    folder = Path(folder)
    with staged_export(folder) as stage:
        _write_pipeline(student, src, index, parts, teacher_cfg, stage, stock_scheduler, extra, name=folder.name)
    return folder


def _write_pipeline(student: PeRFlowStudent, src: Path, index: dict[str, Any], parts: tuple[str, ...], teacher_cfg: dict[str, Any],
                    stage: Path, stock_scheduler: bool, extra: dict[str, Any] | None, name: str) -> None:
    """:func:`export_pipeline`'s folder, written into ``stage``."""
    sd3 = "transformer" in parts
    sdxl = "text_encoder_2" in parts and not sd3
    models = [part for part in parts if part != "scheduler"]
    for part in models[1:]:  # all but the UNet / transformer, which is the student's
        shutil.copytree(src / part, stage / part)
    pipeline_class = index.get("_class_name", "StableDiffusionXLPipeline" if sdxl else "StableDiffusionPipeline")
    write_student_parts(student, stage, teacher_cfg, stock_scheduler=stock_scheduler,
                        extra={"pipeline": pipeline_class, "teacher_folder": str(src), **(extra or {})})
    keep = ("force_zeros_for_empty_prompt",) if sdxl else () if sd3 else ("requires_safety_checker",)
    new_index = {k: v for k, v in index.items() if k.startswith("_") or k in parts or k in keep}
    new_index["_class_name"] = pipeline_class
    new_index.update({part: index.get(part, ["diffusers" if part in ("unet", "vae", "transformer") else "transformers", _DEFAULT_CLASSES[part]])
                      for part in models})
    stock = stock_scheduler_config(teacher_cfg, student.boundaries)
    new_index.update(feature_extractor=[None, None], image_encoder=[None, None],
                     scheduler=["diffusers", stock[1]["_class_name"]] if stock_scheduler and stock else PERFLOW_SCHEDULER_ENTRY)
    if sd3:  # StableDiffusion3Pipeline takes the T5 pair as None when the folder has none
        new_index.update({part: [None, None] for part in _T5_PARTS if part not in parts})
    elif not sdxl:  # SD 1.x / 2.x: the teacher's safety checker and its feature extractor are kept when it has them
        checker = all(isinstance(index.get(p), list) and index[p][0] is not None and (src / p).is_dir() for p in ("safety_checker", "feature_extractor"))
        if checker:
            for p in ("safety_checker", "feature_extractor"):
                shutil.copytree(src / p, stage / p)
            new_index.update(safety_checker=index["safety_checker"], feature_extractor=index["feature_extractor"],
                             requires_safety_checker=index.get("requires_safety_checker", True))
        else:
            new_index.update(safety_checker=[None, None], requires_safety_checker=False)
    save_json(stage / "model_index.json", new_index)
    write_model_card(stage, "pipeline", base_model=src.name, windows=student.boundaries.numel() - 1, pipeline=pipeline_class,
                     guidance=float((extra or {}).get("guidance_scale", 1.0)), stock_scheduler=stock[1]["_class_name"] if stock_scheduler and stock else None,
                     name=name)
