"""diffusers networks in rectflow's call convention ``net(z, timestep, cond)`` (optional extra: ``pip install rectflow[perflow]``).

:class:`UNetAdapter` (``UNet2DModel``), :class:`TextUNetAdapter` (``UNet2DConditionModel``: SD 1.x / 2.x, and SDXL
with its pooled text embeddings and size ids), :class:`SD3TransformerAdapter` (``SD3Transformer2DModel``); the
conditions they take (:func:`pair_condition`, :func:`sdxl_condition`, :func:`sd3_condition`) and the lazy imports of
the optional extras.  The scheduler configs are in :mod:`rectflow.perflow.scheduler_config`, loading and exporting in
:mod:`rectflow.perflow.diffusers_io`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from rectflow.errors import ConfigError

__all__ = ["SD3TransformerAdapter", "TRANSFORMERS", "TextUNetAdapter", "UNetAdapter", "adapt_model", "adapt_unet", "diffusers_module",
           "optional_transformers", "pair_condition", "sd3_condition", "sdxl_condition", "size_time_ids", "unwrap_unet"]

# Transformers we drive, each with its adapter (filled in below the adapter classes).
TRANSFORMERS: dict[str, type[nn.Module]] = {}


def diffusers_module():
    """The ``diffusers`` module, or a one-line ConfigError naming the extra to install."""
    try:
        import diffusers  # optional extra (.[perflow]); only diffusers teachers need it
    except ImportError as e:  # pragma: no cover - exercised only without the extra
        raise ConfigError("diffusers is not installed; pip install 'rectflow[perflow]'") from e
    return diffusers


def optional_transformers():
    """The ``transformers`` module, or a one-line ConfigError naming the extra to install."""
    try:
        import transformers  # optional extra (.[perflow]); only text-to-image teachers need it
    except ImportError as e:  # pragma: no cover - exercised only without the extra
        raise ConfigError("transformers is not installed; pip install 'rectflow[perflow]'") from e
    return transformers


class UNetAdapter(nn.Module):
    """Wrap a diffusers ``UNet2DModel`` as ``f(z, timestep) -> output tensor`` (drops the output dataclass)."""

    def __init__(self, unet: nn.Module) -> None:
        super().__init__()
        self.unet = unet

    def forward(self, z: Tensor, timestep: Tensor) -> Tensor:
        return self.unet(z, timestep).sample


def pair_condition(cond: Any, *, model: str, names: tuple[str, str], prompts: str) -> tuple[Tensor, Tensor]:
    """(hidden (B, L, D), pooled (B, P)) from a two-part text condition: that pair as a tuple / list, or a
    dict with the two keys ``names`` (the model's own argument names).  Text prompts are refused with
    ``prompts`` (what to do instead), anything else with one line; ``model`` names the caller."""
    if isinstance(cond, str) or (isinstance(cond, (list, tuple)) and cond and all(isinstance(c, str) for c in cond)):
        raise ConfigError(f"{model}: {prompts}")
    if isinstance(cond, dict) and set(cond) == set(names):
        cond = (cond[names[0]], cond[names[1]])
    if (isinstance(cond, (list, tuple)) and len(cond) == 2 and all(isinstance(c, Tensor) for c in cond)
            and cond[0].dim() == 3 and cond[1].dim() == 2 and cond[0].shape[0] == cond[1].shape[0]):
        return cond[0], cond[1]
    got = "None" if cond is None else type(cond).__name__
    raise ConfigError(f"{model}: the condition must be the pair ({names[0]} (B, L, D), {names[1]} (B, P)), got {got} "
                      "(unconditional: the empty prompt's pair)")


def sd3_condition(cond: Any) -> tuple[Tensor, Tensor]:
    """(encoder_hidden_states (B, L, D), pooled_projections (B, P)) from an SD3 condition (:func:`pair_condition`);
    text prompts are refused in one line (the text encoders are not loaded here)."""
    return pair_condition(cond, model="SD3 teacher", names=("encoder_hidden_states", "pooled_projections"),
                          prompts="text prompts need SD3's three text encoders, which rectflow does not load; "
                                  "pass the precomputed pair (encoder_hidden_states (B, L, D), pooled_projections (B, P))")


def sdxl_condition(cond: Any) -> tuple[Tensor, Tensor]:
    """(encoder_hidden_states (B, L, D1 + D2), text_embeds (B, P)) from an SDXL condition (:func:`pair_condition`):
    both text encoders' penultimate hidden states and text_encoder_2's pooled projection, as
    :meth:`rectflow.perflow.latent.LatentPipeline.encode_text` makes them."""
    return pair_condition(cond, model="SDXL UNet", names=("encoder_hidden_states", "text_embeds"),
                          prompts="encode text prompts first (LatentPipeline.encode_text gives the pair (encoder_hidden_states, text_embeds))")


def size_time_ids(z: Tensor, vae_scale_factor: int, dtype: torch.dtype) -> Tensor:
    """SDXL's added time ids (B, 6) for latents z (B, C, h, w): original size (H, W), crop top-left (0, 0),
    target size (H, W), with (H, W) = (h, w) x ``vae_scale_factor``: what StableDiffusionXLPipeline uses
    when it is given ``height`` and ``width`` (or takes its defaults) and no size arguments."""
    h, w = (int(n) * int(vae_scale_factor) for n in z.shape[-2:])
    return torch.tensor([h, w, 0, 0, h, w], dtype=dtype, device=z.device).expand(z.shape[0], 6)


class TextUNetAdapter(nn.Module):
    """Wrap a diffusers ``UNet2DConditionModel`` as ``f(z, timestep, cond) -> output tensor``: z (B, C, h, w)
    latents, timestep (B,) the UNet's own step index.

    SD 1.x / 2.x: cond (B, L, D), the text encoder's last hidden state, passed as ``encoder_hidden_states``.
    SDXL (``addition_embed_type="text_time"``): cond the pair (hidden (B, L, D), pooled (B, P))
    (:func:`sdxl_condition`); the UNet also gets ``added_cond_kwargs={"text_embeds": pooled,
    "time_ids": ids}`` with the size ids (B, 6) made from the latents' size (:func:`size_time_ids`,
    ``vae_scale_factor``), so a condition never carries them."""

    def __init__(self, unet: nn.Module, vae_scale_factor: int = 8) -> None:
        super().__init__()
        self.unet, self.vae_scale_factor = unet, int(vae_scale_factor)
        self.text_time = getattr(unet.config, "addition_embed_type", None) == "text_time"

    def forward(self, z: Tensor, timestep: Tensor, cond: Any = None) -> Tensor:
        if cond is None:
            raise ConfigError("a text-conditional UNet needs a condition (the text embeddings; the empty prompt's for unconditional)")
        if not self.text_time:
            return self.unet(z, timestep, encoder_hidden_states=cond).sample
        hidden, pooled = sdxl_condition(cond)
        added = {"text_embeds": pooled, "time_ids": size_time_ids(z, self.vae_scale_factor, hidden.dtype)}
        return self.unet(z, timestep, encoder_hidden_states=hidden, added_cond_kwargs=added).sample


class SD3TransformerAdapter(nn.Module):
    """Wrap a diffusers ``SD3Transformer2DModel`` as ``f(z, timestep, cond) -> u``: z (B, C, h, w)
    latents, timestep (B,) the transformer's time input sigma N (sigma = 1 - t), cond the pair
    (encoder_hidden_states (B, L, D), pooled_projections (B, P)) (:func:`sd3_condition`); returns
    the transformer's output u = noise - x0 (B, C, h, w), the ``"u"`` kind."""

    def __init__(self, transformer: nn.Module) -> None:
        super().__init__()
        self.transformer = transformer

    def forward(self, z: Tensor, timestep: Tensor, cond: Any = None) -> Tensor:
        hidden, pooled = sd3_condition(cond)
        return self.transformer(hidden_states=z, timestep=timestep, encoder_hidden_states=hidden, pooled_projections=pooled).sample


TRANSFORMERS["SD3Transformer2DModel"] = SD3TransformerAdapter


def unwrap_unet(net: nn.Module) -> nn.Module:
    """The diffusers model inside one of our adapters (or ``net`` itself)."""
    if isinstance(net, SD3TransformerAdapter):
        return net.transformer
    return net.unet if isinstance(net, (UNetAdapter, TextUNetAdapter)) else net


def adapt_unet(unet: nn.Module, vae_scale_factor: int = 8) -> nn.Module:
    """The adapter for a diffusers UNet: :class:`TextUNetAdapter` for a ``UNet2DConditionModel`` (``vae_scale_factor``:
    latent -> image size, for SDXL's size ids), else :class:`UNetAdapter`."""
    return TextUNetAdapter(unet, vae_scale_factor) if type(unet).__name__ == "UNet2DConditionModel" else UNetAdapter(unet)


def adapt_model(model: nn.Module) -> nn.Module:
    """The adapter for a diffusers model: a transformer's (e.g. :class:`SD3TransformerAdapter`), else :func:`adapt_unet`'s."""
    cls = TRANSFORMERS.get(type(model).__name__)
    return cls(model) if cls is not None else adapt_unet(model)


