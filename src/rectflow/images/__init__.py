"""Images: class guidance, Frechet distances (FD/FID), classifier features and image sampling to files."""

from rectflow.images import classifier_features, guidance, metrics, sampling
from rectflow.images.classifier_features import *  # noqa: F403 (re-exports classifier_features.__all__)
from rectflow.images.guidance import *  # noqa: F403 (re-exports guidance.__all__)
from rectflow.images.metrics import *  # noqa: F403 (re-exports metrics.__all__)
from rectflow.images.sampling import *  # noqa: F403 (re-exports sampling.__all__)

__all__ = [*guidance.__all__, *metrics.__all__, *classifier_features.__all__, *sampling.__all__]
