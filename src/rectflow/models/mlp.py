"""An MLP velocity field for low-dimensional data (2-D toys, point clouds, vectors)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from rectflow.models.embeddings import SinusoidalTimeEmbedding

_ACTIVATIONS = {"silu": nn.SiLU, "gelu": nn.GELU, "relu": nn.ReLU, "tanh": nn.Tanh}
DEFAULT_TIME_SCALE = 10.0
"""The MLPs' default top frequency of the time features (since 0.2; before: 1000)."""


def _mlp(name: str, dim: int, in_features: int, width: int, depth: int, activation: str) -> nn.Sequential:
    """Checked ``depth`` hidden layers of ``width`` units from ``in_features`` inputs to ``dim`` outputs."""
    if dim < 1 or width < 1 or depth < 1:
        raise ValueError(f"{name}: dim, width and depth must be >= 1, got {dim}, {width}, {depth}")
    if activation not in _ACTIVATIONS:
        raise ValueError(f"{name}: unknown activation {activation!r}; choose one of {sorted(_ACTIVATIONS)}")
    act = _ACTIVATIONS[activation]
    layers: list[nn.Module] = [nn.Linear(in_features, width), act()]
    for _ in range(depth - 1):
        layers += [nn.Linear(width, width), act()]
    layers.append(nn.Linear(width, dim))
    return nn.Sequential(*layers)


class MLPVelocity(nn.Module):
    """v(x, t) = MLP([x, emb(t)]) with ``depth`` hidden layers of ``width`` units.

    Args:
        dim: data dimension d (input and output).
        width: hidden units per layer (the issues' "3x256 MLP" is depth=3, width=256).
        depth: number of hidden layers (>= 1).
        time_dim: size of the sinusoidal time embedding.
        activation: one of silu, gelu, relu, tanh.
        time_scale: the highest angular frequency of the time features (t in [0, 1] is multiplied
            by it; see :class:`SinusoidalTimeEmbedding`).  10 since version 0.2 (before: 1000, the
            diffusion models' choice): as good in W2 and 4-7x fewer dopri5 steps
            (benchmarks/results/mlp_time_scale.md).  The frequencies are not in the state dict, so
            weights saved from a 0.1 MLPVelocity load into ``MLPVelocity(..., time_scale=1000)``.
    Shapes: x (B, d), t (B,) -> (B, d).
    """

    def __init__(self, dim: int, width: int = 256, depth: int = 3, time_dim: int = 64, activation: str = "silu", time_scale: float = DEFAULT_TIME_SCALE):
        super().__init__()
        self.net = _mlp("MLPVelocity", dim, dim + time_dim, width, depth, activation)
        self.dim = dim
        # the constructor's arguments: a run trained on this network as a user's object records them, so the
        # time frequencies (not in the state dict) are rebuilt as trained, whatever the defaults become
        self.config = {"dim": dim, "width": width, "depth": depth, "time_dim": time_dim, "activation": activation, "time_scale": float(time_scale)}
        self.time_embed = SinusoidalTimeEmbedding(time_dim, scale=time_scale)

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        if x.dim() != 2 or x.shape[1] != self.dim:
            raise ValueError(f"MLPVelocity expects x of shape (B, {self.dim}), got {tuple(x.shape)}")
        return self.net(torch.cat([x, self.time_embed(t).to(x.dtype)], dim=1))



class MLPAverageVelocity(nn.Module):
    """u(x, s, t) = MLP([x, emb(s), emb(t - s)]): an average velocity over [s, t] for MeanFlow-style
    one-step models (see :mod:`rectflow.flow.meanflow`).  Same options as :class:`MLPVelocity`, plus
    ``time_scale``, the highest angular frequency of the time features: MeanFlow differentiates the
    network in time, and with the diffusion-style 1000 training diverged on a 2-D Gaussian task
    (10 and 1 both trained; measured in tests/flow/test_meanflow.py's slow test).
    Shapes: x (B, d), s (B,), t (B,) -> (B, d).
    """

    def __init__(self, dim: int, width: int = 256, depth: int = 3, time_dim: int = 64, activation: str = "silu", time_scale: float = DEFAULT_TIME_SCALE):
        super().__init__()
        self.net = _mlp("MLPAverageVelocity", dim, dim + 2 * time_dim, width, depth, activation)
        self.dim = dim
        self.config = {"dim": dim, "width": width, "depth": depth, "time_dim": time_dim, "activation": activation, "time_scale": float(time_scale)}
        self.time_embed = SinusoidalTimeEmbedding(time_dim, scale=time_scale)
        self.gap_embed = SinusoidalTimeEmbedding(time_dim, scale=time_scale)

    def forward(self, x: Tensor, s: Tensor, t: Tensor) -> Tensor:
        if x.dim() != 2 or x.shape[1] != self.dim:
            raise ValueError(f"MLPAverageVelocity expects x of shape (B, {self.dim}), got {tuple(x.shape)}")
        return self.net(torch.cat([x, self.time_embed(s).to(x.dtype), self.gap_embed(t - s).to(x.dtype)], dim=1))
