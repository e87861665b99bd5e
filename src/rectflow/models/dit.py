"""A small Diffusion Transformer (DiT) velocity field for images.

Patchify (a p x p strided convolution) plus fixed 2-D sine-cosine position embeddings, then
transformer blocks whose LayerNorms are modulated by the conditioning c = emb(t) [+ emb(y)]
(adaLN-Zero: per-block shift, scale and a gate initialised to zero, so every block starts as
the identity), then a modulated final layer and unpatchify.  Attention uses
``scaled_dot_product_attention`` (flash/memory-efficient kernels on GPU).

Time convention (theory §1.2): t in [0, 1], t = 0 the source (noise), t = 1 the data.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rectflow.models.class_embedding import ClassEmbedding
from rectflow.models.embeddings import SinusoidalTimeEmbedding

__all__ = ["DiTVelocity", "sincos_2d", "unpatchify"]


def sincos_2d(dim: int, grid: int) -> Tensor:
    """Fixed 2-D sine-cosine position embeddings for a grid x grid of patches: (grid * grid, dim).

    Half of the features encode the row, half the column (each as sin/cos of 1/10000^(k/(dim/4)))."""
    if dim % 4:
        raise ValueError(f"sincos_2d: dim must be divisible by 4, got {dim}")
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    pos = torch.arange(grid, dtype=torch.float64)
    rows, cols = torch.meshgrid(pos, pos, indexing="ij")

    def enc(p: Tensor) -> Tensor:
        a = p.reshape(-1, 1) * omega[None, :]
        return torch.cat([torch.sin(a), torch.cos(a)], dim=1)

    return torch.cat([enc(rows), enc(cols)], dim=1).float()


def unpatchify(tokens: Tensor, patch: int, channels: int) -> Tensor:
    """Tokens (B, g*g, p*p*C), row-major over patches, features ordered (row in patch, column in
    patch, channel) -> images (B, C, g*p, g*p)."""
    b, n, _ = tokens.shape
    g = math.isqrt(n)
    h = tokens.reshape(b, g, g, patch, patch, channels).permute(0, 5, 1, 3, 2, 4)
    return h.reshape(b, channels, g * patch, g * patch)


def _modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    return x * (1 + scale[:, None, :]) + shift[:, None, :]


class DiTBlock(nn.Module):
    """x + gate * Attn(adaLN(x)), then x + gate * MLP(adaLN(x)).  x (B, N, D), c (B, D) -> (B, N, D)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim))
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        nn.init.zeros_(self.ada[1].weight)  # adaLN-Zero: the block starts as the identity
        nn.init.zeros_(self.ada[1].bias)

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        b, n, d = x.shape
        sh1, sc1, g1, sh2, sc2, g2 = self.ada(c).chunk(6, dim=1)
        qkv = self.qkv(_modulate(self.norm1(x), sh1, sc1)).reshape(b, n, 3, self.heads, d // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, heads, N, d_head)
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d)
        x = x + g1[:, None, :] * self.proj(a)
        return x + g2[:, None, :] * self.mlp(_modulate(self.norm2(x), sh2, sc2))


class DiTVelocity(nn.Module):
    """v(x, t[, y]) for images x (B, C, H, W) with a transformer over p x p patches.

    Args:
        in_channels: image channels C (output has the same).
        image_size: H = W, divisible by ``patch_size``.
        patch_size: patch side p; the sequence has (H / p)^2 tokens.
        hidden: token width D (divisible by ``heads`` and by 4).
        depth: number of transformer blocks.
        heads: attention heads.
        mlp_ratio: MLP hidden width / D.
        num_classes: > 0 for a class-conditional model (with a null label for guidance).
    Shapes: x (B, C, H, W), t (B,), y (B,) or None -> (B, C, H, W).
    """

    def __init__(
        self,
        in_channels: int = 3,
        image_size: int = 32,
        patch_size: int = 2,
        hidden: int = 384,
        depth: int = 12,
        heads: int = 6,
        mlp_ratio: float = 4.0,
        num_classes: int = 0,
    ) -> None:
        super().__init__()
        if image_size % patch_size:
            raise ValueError(f"DiTVelocity: image_size {image_size} is not divisible by patch_size {patch_size}")
        if hidden % heads or hidden % 4:
            raise ValueError(f"DiTVelocity: hidden {hidden} must be divisible by heads ({heads}) and by 4")
        if depth < 1 or in_channels < 1:
            raise ValueError(f"DiTVelocity: depth and in_channels must be >= 1, got {depth}, {in_channels}")
        self.in_channels, self.image_size, self.patch_size, self.num_classes = in_channels, image_size, patch_size, num_classes
        self.shape = (in_channels, image_size, image_size)
        self.grid = image_size // patch_size
        self.patchify = nn.Conv2d(in_channels, hidden, patch_size, stride=patch_size)
        self.register_buffer("pos", sincos_2d(hidden, self.grid)[None], persistent=False)
        self.time_embed = nn.Sequential(SinusoidalTimeEmbedding(256), nn.Linear(256, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.class_embed = ClassEmbedding(num_classes, hidden) if num_classes > 0 else None
        self.blocks = nn.ModuleList([DiTBlock(hidden, heads, mlp_ratio) for _ in range(depth)])
        self.norm_out = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.ada_out = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 2 * hidden))
        self.out = nn.Linear(hidden, patch_size * patch_size * in_channels)
        for lin in (self.ada_out[1], self.out):
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)
        nn.init.xavier_uniform_(self.patchify.weight.view(hidden, -1))

    def forward(self, x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        if x.dim() != 4 or tuple(x.shape[1:]) != self.shape:
            raise ValueError(f"DiTVelocity expects x of shape (B, {', '.join(map(str, self.shape))}), got {tuple(x.shape)}")
        b, p = x.shape[0], self.patch_size
        c = self.time_embed(t.reshape(-1).expand(b) if t.numel() == 1 else t).to(x.dtype)
        if self.class_embed is not None:
            c = c + self.class_embed(y, b, x.device).to(c.dtype)
        elif y is not None:
            raise ValueError("this model is unconditional (num_classes = 0) but labels y were given")
        h = self.patchify(x).flatten(2).transpose(1, 2) + self.pos.to(x.dtype)  # (B, N, D)
        for block in self.blocks:
            h = block(h, c)
        shift, scale = self.ada_out(c).chunk(2, dim=1)
        return unpatchify(self.out(_modulate(self.norm_out(h), shift, scale)), p, self.in_channels)
