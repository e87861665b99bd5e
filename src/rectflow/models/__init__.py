"""Velocity-field networks v_theta(x, t).  All take x (B, ...) and t (B,) in [0, 1];
the image models also take optional class labels y (B,)."""

from .class_embedding import NULL_LABEL, ClassEmbedding
from .dit import DiTVelocity
from .embeddings import SinusoidalTimeEmbedding
from .mlp import MLPVelocity
from .unet import UNetVelocity

__all__ = ["SinusoidalTimeEmbedding", "MLPVelocity", "UNetVelocity", "DiTVelocity", "ClassEmbedding", "NULL_LABEL"]
