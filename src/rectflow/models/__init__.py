"""Velocity-field networks v_theta(x, t).  All take x (B, ...) and t (B,) in [0, 1]."""

from .embeddings import SinusoidalTimeEmbedding
from .mlp import MLPVelocity

__all__ = ["SinusoidalTimeEmbedding", "MLPVelocity"]
