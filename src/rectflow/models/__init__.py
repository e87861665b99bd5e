"""Velocity-field networks v_theta(x, t).  All take x (B, ...) and t (B,) in [0, 1];
the image models also take optional class labels y (B,)."""

from rectflow.models.class_embedding import NULL_LABEL, ClassEmbedding
from rectflow.models.dit import DiTVelocity
from rectflow.models.embeddings import SinusoidalTimeEmbedding
from rectflow.models.mlp import MLPAverageVelocity, MLPVelocity
from rectflow.models.unet import UNetAverageVelocity, UNetVelocity

__all__ = ["SinusoidalTimeEmbedding", "MLPVelocity", "MLPAverageVelocity", "UNetVelocity", "UNetAverageVelocity", "DiTVelocity", "ClassEmbedding", "NULL_LABEL"]
