"""Latent text-to-image teachers for PeRFlow: Stable Diffusion 1.x / 2.x pipelines read from LOCAL
diffusers folders (never downloaded), and the accelerated student exported back as a complete
pipeline folder (optional extras: ``pip install 'rectflow[perflow]'`` for diffusers, transformers).

A pipeline folder (``model_index.json``, ``unet/``, ``vae/``, ``text_encoder/``, ``tokenizer/``,
``scheduler/``) becomes a :class:`LatentPipeline`:

* the teacher: ``UNet2DConditionModel`` behind :class:`~rectflow.perflow.diffusers_io.TextUNetAdapter`,
  the scheduler config turned into an affine path + parameterisation by
  :func:`~rectflow.perflow.diffusers_io.schedule_from_config` (the one place), and rectflow time t
  mapped to the UNet's step index n = N (1 - t) - 1; its condition is the text encoder's last
  hidden state (B, L, D);
* the VAE: images (B, 3, H, W) in [-1, 1] <-> latents (B, C, H/f, W/f) scaled as the pipeline scales
  them, z = (mean - shift_factor) * scaling_factor (``shift_factor`` 0 when the VAE has none);
* the text encoder and tokenizer: prompts -> (B, L, D), as the stock pipeline encodes them (padding
  to ``model_max_length``, truncation); the empty prompt's embedding is the null condition of
  classifier-free guidance.

:func:`export_pipeline` writes the student's UNet with the teacher's VAE, text encoder and
tokenizer, no safety checker or feature extractor, and a scheduler, so that
``diffusers.StableDiffusionPipeline.from_pretrained(folder)`` samples in K steps.

SDXL (two text encoders, pooled text embeddings and size conditioning), SD3 / Flux (transformers on a
flow-matching schedule), inpainting, upscaling and LCM UNets are refused with one line naming what
is not supported.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from rectflow.engine.io import check_writable, load_json, save_json
from rectflow.engine.shards import state_dict_sha256
from rectflow.errors import CheckpointError, ConfigError, DataError
from rectflow.perflow.diffusers_io import (PERFLOW_SCHEDULER_ENTRY, TextUNetAdapter, optional_transformers, load_diffusers_model, schedule_from_config,
                                           write_student_parts)
from rectflow.perflow.student import PeRFlowStudent
from rectflow.perflow.teacher import Teacher

__all__ = ["LatentPipeline", "export_pipeline", "load_pipeline"]

_PARTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
_DEFAULT_CLASSES = {"unet": "UNet2DConditionModel", "vae": "AutoencoderKL", "text_encoder": "CLIPTextModel", "tokenizer": "CLIPTokenizer"}
# UNet config keys that add inputs beyond (z, t, text): each belongs to a pipeline we do not drive.
_UNET_EXTRAS = {"addition_embed_type": "SDXL-style added conditioning (pooled text, sizes)",
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


class LatentPipeline:
    """A latent text-to-image diffusion pipeline as PeRFlow needs it (see the module docstring).

    Attributes:
        folder: the pipeline folder it was read from.
        unet, vae, text_encoder, tokenizer: the diffusers / transformers components (eval mode, frozen).
        scheduler_config: the teacher's scheduler config (a dict).
        teacher: the conditional :class:`Teacher` (``cond`` = text embeddings (B, L, D)).
    """

    def __init__(self, folder: Path, unet: nn.Module, vae: nn.Module, text_encoder: nn.Module, tokenizer: Any,
                 scheduler_config: dict[str, Any], model_index: dict[str, Any]) -> None:
        self.folder, self.unet, self.vae, self.text_encoder, self.tokenizer = Path(folder), unet, vae, text_encoder, tokenizer
        self.scheduler_config, self.model_index = scheduler_config, model_index
        self.schedule, self.parameterization = schedule_from_config(scheduler_config)
        for m in (unet, vae, text_encoder):
            m.eval().requires_grad_(False)
        self.teacher = Teacher(TextUNetAdapter(unet), self.schedule, self.parameterization, time_map=self.schedule.t_to_timestep)
        self._fingerprint: dict[str, Any] | None = None

    # ----- shapes and scaling
    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

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
        """(C, h, w) of one latent: the UNet's channels and sample size."""
        size = self.unet.config.sample_size
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        return int(self.unet.config.in_channels), int(h), int(w)

    @property
    def resolution(self) -> tuple[int, int]:
        """(H, W) of the images the pipeline generates by default: latent size x VAE factor."""
        _, h, w = self.latent_shape
        return h * self.vae_scale_factor, w * self.vae_scale_factor

    @property
    def text_shape(self) -> tuple[int, int]:
        """(L, D) of one prompt's embedding: the tokenizer's max length, the encoder's width."""
        return int(self.tokenizer.model_max_length), int(self.text_encoder.config.hidden_size)

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
                gdev = generator.device if generator is not None else z.device
                noise = torch.randn(z.shape, generator=generator, device=gdev, dtype=z.dtype)
            z = z + dist.std * noise.to(z.device, z.dtype)
        return (z - self.shift_factor) * self.scaling_factor

    @torch.no_grad()
    def decode_latents(self, latents: Tensor) -> Tensor:
        """Scaled latents (B, C, h, w) -> images (B, 3, H, W), nominally in [-1, 1] (not clipped)."""
        z = latents.to(self.device, self.vae.dtype) / self.scaling_factor + self.shift_factor
        return self.vae.decode(z).sample

    # ----- text
    def tokenize(self, prompts: str | Sequence[str]) -> Tensor:
        """Token ids (B, L), padded to the tokenizer's max length and truncated, as the stock pipeline does."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        ids = self.tokenizer(prompts, padding="max_length", max_length=self.tokenizer.model_max_length, truncation=True, return_tensors="pt").input_ids
        return ids

    @torch.no_grad()
    def encode_text(self, prompts: str | Sequence[str]) -> Tensor:
        """Prompts -> the text encoder's last hidden state (B, L, D), the UNet's ``encoder_hidden_states``."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        enc = self.tokenizer(prompts, padding="max_length", max_length=self.tokenizer.model_max_length, truncation=True, return_tensors="pt")
        mask = enc.attention_mask.to(self.device) if getattr(self.text_encoder.config, "use_attention_mask", False) else None
        return self.text_encoder(enc.input_ids.to(self.device), attention_mask=mask)[0]

    def null_embedding(self) -> Tensor:
        """The empty prompt's embedding (1, L, D): the unconditional input of classifier-free guidance."""
        return self.encode_text([""])

    # ----- identity
    def fingerprint(self) -> dict[str, Any]:
        """What a latent cache made with this pipeline depends on: hashes of the VAE, the text encoder and
        the tokenizer, the VAE's scaling, and the shapes (computed once)."""
        if self._fingerprint is None:
            tok = self.folder / "tokenizer"
            self._fingerprint = {
                "vae_sha256": state_dict_sha256(self.vae),
                "text_encoder_sha256": state_dict_sha256(self.text_encoder),
                "tokenizer_sha256": _folder_sha256(tok) if tok.is_dir() else "unknown",
                "scaling_factor": self.scaling_factor,
                "shift_factor": self.shift_factor,
                "resolution": list(self.resolution),
                "latent_shape": list(self.latent_shape),
                "text_shape": list(self.text_shape),
            }
        return dict(self._fingerprint)

    def student(self, boundaries: Tensor) -> PeRFlowStudent:
        """A PeRFlow student initialised from the teacher's UNet (a trainable deep copy) on ``boundaries``."""
        return PeRFlowStudent.from_teacher(self.teacher, boundaries)

    def __repr__(self) -> str:
        return (f"LatentPipeline({str(self.folder)!r}, {self.parameterization} on {self.schedule!r}, latents {list(self.latent_shape)}, "
                f"text {list(self.text_shape)})")


def _check_folder(folder: Path) -> dict[str, Any]:
    """model_index.json (or {}) of a supported SD 1.x / 2.x folder; one-line ConfigError otherwise."""
    if not folder.is_dir():
        raise ConfigError(f"diffusers pipeline folder {str(folder)!r} does not exist (only local folders are read)")
    index = load_json(folder / "model_index.json") if (folder / "model_index.json").is_file() else {}
    if not isinstance(index, dict):
        raise CheckpointError(f"{folder / 'model_index.json'}: not a JSON mapping")
    name = str(index.get("_class_name", ""))
    if "text_encoder_2" in index or (folder / "text_encoder_2").is_dir() or "XL" in name:
        raise ConfigError(f"{folder}: SDXL pipelines ({name or 'text_encoder_2'}: two text encoders, pooled text and size conditioning) "
                          "are not supported; use a Stable Diffusion 1.x / 2.x folder")
    if "transformer" in index or (folder / "transformer").is_dir():
        raise ConfigError(f"{folder}: a transformer pipeline ({name or 'transformer/'}, e.g. SD3 / Flux) is not supported; use a UNet (SD 1.x / 2.x) folder")
    for part in _PARTS:
        if not (folder / part).is_dir():
            raise ConfigError(f"diffusers pipeline folder {str(folder)!r} has no {part}/ (an SD 1.x / 2.x layout needs {', '.join(_PARTS)})")
    return index


def _class_of(index: dict[str, Any], part: str) -> str:
    entry = index.get(part)
    if isinstance(entry, (list, tuple)) and len(entry) == 2 and isinstance(entry[1], str):
        return entry[1]
    return _DEFAULT_CLASSES[part]


def load_pipeline(folder: str | Path, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> LatentPipeline:
    """A :class:`LatentPipeline` from a local SD 1.x / 2.x diffusers folder (nothing is downloaded).

    Raises:
        ConfigError: a missing part, an unsupported pipeline (SDXL, SD3, inpainting, ...) or scheduler
            (the key is named), or a missing optional extra.
        CheckpointError: a corrupt config or weights file (named).
    """
    folder = Path(folder)
    index = _check_folder(folder)
    sched_cfg = load_json(folder / "scheduler" / "scheduler_config.json")
    if sched_cfg.get("_class_name") == "PeRFlowScheduler" and (folder / "perflow.json").is_file():
        sched_cfg = load_json(folder / "perflow.json")["teacher_scheduler"]  # an exported student: the teacher's schedule
    schedule_from_config(sched_cfg)  # refuses an unsupported scheduler before any weights are read
    unet_cls = _class_of(index, "unet")
    if unet_cls != "UNet2DConditionModel":
        raise ConfigError(f"{folder}: unet is a {unet_cls}, not a UNet2DConditionModel (text-to-image latent UNet)")
    unet_cfg = load_json(folder / "unet" / "config.json")
    for key, what in _UNET_EXTRAS.items():
        if unet_cfg.get(key) is not None:
            raise ConfigError(f"{folder / 'unet' / 'config.json'}: {key}={unet_cfg[key]!r} ({what}) is not supported")
    vae_cfg = load_json(folder / "vae" / "config.json")
    if unet_cfg.get("in_channels") != vae_cfg.get("latent_channels") or unet_cfg.get("out_channels") != vae_cfg.get("latent_channels"):
        raise ConfigError(f"{folder / 'unet' / 'config.json'}: in_channels={unet_cfg.get('in_channels')} / out_channels={unet_cfg.get('out_channels')} "
                          f"differ from the VAE's latent_channels={vae_cfg.get('latent_channels')} (inpainting / depth UNets are not supported)")
    unet = load_diffusers_model(unet_cls, folder / "unet", dtype=dtype, what="UNet").to(device)
    vae = load_diffusers_model(_class_of(index, "vae"), folder / "vae", dtype=dtype, what="VAE").to(device)
    transformers = optional_transformers()
    te_cls, tok_cls = _class_of(index, "text_encoder"), _class_of(index, "tokenizer")
    load_json(folder / "text_encoder" / "config.json")
    try:
        text_encoder = getattr(transformers, te_cls).from_pretrained(str(folder / "text_encoder"), local_files_only=True)
    except (AttributeError, OSError, ValueError, RuntimeError, KeyError) as e:
        raise CheckpointError(f"{folder / 'text_encoder'}: cannot load the text encoder {te_cls} ({type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''})") from None
    try:
        tokenizer = getattr(transformers, tok_cls).from_pretrained(str(folder / "tokenizer"), local_files_only=True)
    except (AttributeError, OSError, ValueError, RuntimeError, KeyError) as e:
        raise CheckpointError(f"{folder / 'tokenizer'}: cannot load the tokenizer {tok_cls} ({type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''})") from None
    if getattr(unet.config, "cross_attention_dim", None) != text_encoder.config.hidden_size:
        raise ConfigError(f"{folder / 'unet' / 'config.json'}: cross_attention_dim={unet.config.cross_attention_dim} differs from the text "
                          f"encoder's hidden_size={text_encoder.config.hidden_size}")
    return LatentPipeline(folder, unet, vae, text_encoder.to(device=device, dtype=dtype), tokenizer, sched_cfg, index)


def export_pipeline(student: PeRFlowStudent, teacher: LatentPipeline | str | Path, folder: str | Path, *, stock_scheduler: bool = False,
                    extra: dict[str, Any] | None = None) -> Path:
    """Write a complete pipeline folder: the student's UNet, the teacher's VAE, text encoder and tokenizer
    (copied byte for byte), no safety checker / feature extractor, and a scheduler.

    ``scheduler/`` is our :class:`~rectflow.perflow.diffusers_scheduler.PeRFlowScheduler` (any
    ``num_inference_steps >= K``; the folder loads after ``import rectflow.perflow.diffusers_scheduler``),
    plus ``scheduler_ddim/`` when a stock DDIMScheduler is exact at K steps.  ``stock_scheduler=True``
    (exact windows only) names the stock DDIM in ``model_index.json`` instead (the folder then loads in
    any diffusers install; ours moves to ``scheduler_perflow/``).  The folder is built next to ``folder``
    and renamed into place, so a killed export leaves no half-written pipeline; a previous export there
    is replaced, anything else is refused.  ``extra``: more entries of the folder's ``perflow.json``
    (e.g. the guidance scale the student samples at), written before the rename like the rest.
    """
    src = teacher.folder if isinstance(teacher, LatentPipeline) else Path(teacher)
    index = _check_folder(src)
    teacher_cfg = load_json(src / "scheduler" / "scheduler_config.json")
    if teacher_cfg.get("_class_name") == "PeRFlowScheduler" and (src / "perflow.json").is_file():
        teacher_cfg = load_json(src / "perflow.json")["teacher_scheduler"]
    schedule_from_config(teacher_cfg)
    folder = Path(folder)
    check_writable(folder, directory=True)
    if folder.exists() and any(folder.iterdir()) and not (folder / "perflow.json").is_file():
        raise ConfigError(f"{folder} is not empty and holds no PeRFlow export (perflow.json missing); nothing was written: use an empty or new directory")
    stage, old = folder.with_name(f".{folder.name}.export.tmp"), folder.with_name(f".{folder.name}.old.tmp")
    for p in (stage, old):
        if p.exists():
            shutil.rmtree(p)
    for part in ("vae", "text_encoder", "tokenizer"):
        shutil.copytree(src / part, stage / part)
    write_student_parts(student, stage, teacher_cfg, stock_scheduler=stock_scheduler,
                        extra={"pipeline": index.get("_class_name", "StableDiffusionPipeline"), "teacher_folder": str(src), **(extra or {})})
    new_index = {k: v for k, v in index.items() if k.startswith("_") or k in _PARTS or k == "requires_safety_checker"}
    new_index.setdefault("_class_name", "StableDiffusionPipeline")
    new_index.update({part: index.get(part, ["diffusers" if part in ("unet", "vae") else "transformers", _DEFAULT_CLASSES[part]])
                      for part in ("unet", "vae", "text_encoder", "tokenizer")})
    new_index.update(safety_checker=[None, None], feature_extractor=[None, None], image_encoder=[None, None], requires_safety_checker=False,
                     scheduler=["diffusers", "DDIMScheduler"] if stock_scheduler else PERFLOW_SCHEDULER_ENTRY)
    save_json(stage / "model_index.json", new_index)
    if folder.exists():
        os.replace(folder, old)
    os.replace(stage, folder)
    shutil.rmtree(old, ignore_errors=True)
    return folder
