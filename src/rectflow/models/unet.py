"""A UNet velocity field for images, of the DDPM++ / ADM family.

Residual blocks with GroupNorm and a time (and class) embedding added to the features (DDPM) or
applied as a scale-and-shift of the second normalisation (ADM's "scale-shift norm"), self-attention at chosen resolutions,
dropout, strided-conv downsampling and nearest + conv upsampling, skip connections by
concatenation, residual sums scaled by 1/sqrt(2) (DDPM++), zero-initialised output layers.

Defaults are the CIFAR-10 size (35.7M parameters at 32x32 RGB, DDPM's CIFAR-10 model: base 128 channels,
multipliers (1, 2, 2, 2), two residual blocks per level, attention at 16x16); a tiny
configuration (e.g. channels 16, multipliers (1, 2), one block) serves tests.

Time convention (theory §1.2): t in [0, 1], t = 0 the source (noise), t = 1 the data.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rectflow.models.class_embedding import ClassEmbedding
from rectflow.models.embeddings import SinusoidalTimeEmbedding

__all__ = ["UNetVelocity", "UNetAverageVelocity"]

_SKIP_SCALE = 1 / math.sqrt(2)


def _norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with the most groups (<= 32) that keeps >= 4 channels per group: 32 at the usual
    widths; never one channel per group, which would cancel the added time embedding entirely."""
    groups = max([g for g in range(1, 33) if channels % g == 0 and channels // g >= 4] or [1])
    return nn.GroupNorm(groups, channels, eps=1e-6)


def _zero(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class ResBlock(nn.Module):
    """GN-SiLU-conv, add the projected embedding (DDPM) or apply it as GN * (1 + scale) + shift
    (ADM's scale-shift norm), SiLU, dropout, conv; plus the (1x1-projected) input.

    x (B, C_in, H, W), emb (B, E) -> (B, C_out, H, W).
    """

    def __init__(self, c_in: int, c_out: int, emb_dim: int, dropout: float, scale_shift: bool = False) -> None:
        super().__init__()
        self.scale_shift = scale_shift
        self.norm1 = _norm(c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.emb = nn.Linear(emb_dim, 2 * c_out if scale_shift else c_out)
        self.norm2 = _norm(c_out)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = _zero(nn.Conv2d(c_out, c_out, 3, padding=1))
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        e = self.emb(emb)[:, :, None, None]
        if self.scale_shift:
            scale, shift = e.chunk(2, dim=1)
            h = self.norm2(h) * (1 + scale) + shift
        else:
            h = self.norm2(h + e)
        h = self.conv2(self.dropout(F.silu(h)))
        return (self.skip(x) + h) * _SKIP_SCALE


class AttentionBlock(nn.Module):
    """Multi-head self-attention over the H*W positions (scaled_dot_product_attention), residual.

    x (B, C, H, W) -> (B, C, H, W).
    """

    def __init__(self, channels: int, head_channels: int) -> None:
        super().__init__()
        if channels % head_channels:
            raise ValueError(f"attention: {channels} channels are not divisible by head_channels {head_channels}")
        self.heads = channels // head_channels
        self.norm = _norm(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = _zero(nn.Conv2d(channels, channels, 1))

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        qkv = self.qkv(self.norm(x)).reshape(b, 3, self.heads, c // self.heads, h * w)
        # (B, heads, HW, d) with unit stride along d: the fused (flash / memory-efficient) kernels need it
        q, k, v = (qkv[:, i].transpose(-1, -2).contiguous() for i in range(3))
        out = F.scaled_dot_product_attention(q, k, v)
        out = out.transpose(-1, -2).reshape(b, c, h, w)
        return (x + self.proj(out)) * _SKIP_SCALE


class _Level(nn.Module):
    """ResBlock, optionally followed by attention (one unit of a UNet level)."""

    def __init__(self, c_in: int, c_out: int, emb_dim: int, dropout: float, attention: bool, head_channels: int, scale_shift: bool) -> None:
        super().__init__()
        self.res = ResBlock(c_in, c_out, emb_dim, dropout, scale_shift)
        self.attn = AttentionBlock(c_out, head_channels) if attention else None

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        x = self.res(x, emb)
        return self.attn(x) if self.attn is not None else x


class UNetVelocity(nn.Module):
    """v(x, t[, y]) for images x (B, C, H, W), t (B,) in [0, 1], optional labels y (B,).

    Args:
        in_channels: image channels C (the output has the same number).
        image_size: H = W; must be divisible by 2 ** (len(channel_mult) - 1).
        channels: base width; level i has ``channels * channel_mult[i]`` channels.
        channel_mult: width multipliers per resolution level (one downsampling between levels).
        num_res_blocks: residual blocks per level on the way down (one more on the way up).
        attention_resolutions: resolutions (e.g. 16 for 16x16) whose blocks get self-attention;
            the middle block always has it.
        dropout: dropout rate inside the residual blocks.
        head_channels: channels per attention head.
        num_classes: > 0 makes the model class-conditional (labels plus a null label, see
            :mod:`rectflow.models.class_embedding`); 0 is unconditional.
        scale_shift: apply the embedding as a GroupNorm scale and shift (ADM) instead of adding
            it (DDPM); costs about 2.6M more parameters at the default size.
    Shapes: x (B, C, H, W), t (B,), y (B,) or None -> (B, C, H, W).
    """

    def __init__(
        self,
        in_channels: int = 3,
        image_size: int = 32,
        channels: int = 128,
        channel_mult: Sequence[int] = (1, 2, 2, 2),
        num_res_blocks: int = 2,
        attention_resolutions: Sequence[int] = (16,),
        dropout: float = 0.1,
        head_channels: int = 64,
        num_classes: int = 0,
        scale_shift: bool = False,
    ) -> None:
        super().__init__()
        mult = tuple(int(m) for m in channel_mult)
        if in_channels < 1 or channels < 1 or num_res_blocks < 1 or not mult or min(mult) < 1:
            raise ValueError(
                f"UNetVelocity: in_channels, channels, num_res_blocks and channel_mult entries must be >= 1, "
                f"got {in_channels}, {channels}, {num_res_blocks}, {list(mult)}"
            )
        if image_size % 2 ** (len(mult) - 1):
            raise ValueError(f"UNetVelocity: image_size {image_size} is not divisible by 2^{len(mult) - 1} (one halving per extra level)")
        if not 0 <= dropout < 1:
            raise ValueError(f"UNetVelocity: dropout must lie in [0, 1), got {dropout}")
        self.in_channels, self.image_size, self.num_classes = in_channels, image_size, num_classes
        self.shape = (in_channels, image_size, image_size)
        emb_dim = 4 * channels
        self.time_embed = nn.Sequential(SinusoidalTimeEmbedding(channels), nn.Linear(channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.class_embed = ClassEmbedding(num_classes, emb_dim) if num_classes > 0 else None
        attn_at = {int(r) for r in attention_resolutions}

        self.conv_in = nn.Conv2d(in_channels, channels, 3, padding=1)
        self.down = nn.ModuleList()
        skips = [channels]
        c, res = channels, image_size
        for i, m in enumerate(mult):
            for _ in range(num_res_blocks):
                self.down.append(_Level(c, channels * m, emb_dim, dropout, res in attn_at, head_channels, scale_shift))
                c = channels * m
                skips.append(c)
            if i < len(mult) - 1:
                self.down.append(nn.Conv2d(c, c, 3, stride=2, padding=1))
                skips.append(c)
                res //= 2
        self.mid = nn.ModuleList([_Level(c, c, emb_dim, dropout, True, head_channels, scale_shift), _Level(c, c, emb_dim, dropout, False, head_channels, scale_shift)])
        self.up = nn.ModuleList()
        for i, m in reversed(list(enumerate(mult))):
            for _ in range(num_res_blocks + 1):
                self.up.append(_Level(c + skips.pop(), channels * m, emb_dim, dropout, res in attn_at, head_channels, scale_shift))
                c = channels * m
            if i > 0:
                self.up.append(nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(c, c, 3, padding=1)))
                res *= 2
        self.norm_out = _norm(c)
        self.conv_out = _zero(nn.Conv2d(c, in_channels, 3, padding=1))

    def forward(self, x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        return self.body(x, self.embed(x, t, y))

    def embed(self, x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        """The conditioning vector (B, 4 * channels) of times t (B,) (or one time) and labels y."""
        if x.dim() != 4 or tuple(x.shape[1:]) != self.shape:
            raise ValueError(f"{type(self).__name__} expects x of shape (B, {', '.join(map(str, self.shape))}), got {tuple(x.shape)}")
        emb = self.time_embed(t.reshape(-1).expand(x.shape[0]) if t.numel() == 1 else t).to(x.dtype)
        if self.class_embed is not None:
            emb = emb + self.class_embed(y, x.shape[0], x.device).to(emb.dtype)
        elif y is not None:
            raise ValueError("this model is unconditional (num_classes = 0) but labels y were given")
        return emb

    def body(self, x: Tensor, emb: Tensor) -> Tensor:
        """The network on images x (B, C, H, W) given the conditioning vector ``emb`` from :meth:`embed`."""
        h = self.conv_in(x)
        hs = [h]
        for block in self.down:
            h = block(h, emb) if isinstance(block, _Level) else block(h)
            hs.append(h)
        for block in self.mid:
            h = block(h, emb)
        for block in self.up:
            h = block(torch.cat([h, hs.pop()], dim=1), emb) if isinstance(block, _Level) else block(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class UNetAverageVelocity(UNetVelocity):
    """u(x, s, t[, y]): :class:`UNetVelocity` with a second time embedding, of the gap t - s, added to
    the first (of s): the two-time network of MeanFlow and shortcut models (see
    :mod:`rectflow.flow.meanflow`).  The gap embedding's output layer starts at zero, so a fresh
    model is the plain UNet at time s.  ``gap_scale``: the highest angular frequency of the gap's
    features.  Shapes: x (B, C, H, W), s (B,), t (B,), y (B,) or None -> (B, C, H, W).
    """

    def __init__(self, *args: Any, gap_scale: float = 10.0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        c = self.time_embed[1].in_features
        emb_dim = self.time_embed[-1].out_features
        self.gap_embed = nn.Sequential(SinusoidalTimeEmbedding(c, scale=gap_scale), nn.Linear(c, emb_dim), nn.SiLU(), _zero(nn.Linear(emb_dim, emb_dim)))

    def forward(self, x: Tensor, s: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:  # type: ignore[override]
        gap = t - s
        emb = self.embed(x, s, y) + self.gap_embed(gap.reshape(-1).expand(x.shape[0]) if gap.numel() == 1 else gap).to(x.dtype)
        return self.body(x, emb)
