"""Images: class conditioning and guidance, sample quality (FD/FID, precision/recall), classifier features, and
generating images in batches to files."""

from rectflow.images import classifier_features, conditional, generate, quality
from rectflow.images.classifier_features import *  # noqa: F403 (re-exports classifier_features.__all__)
from rectflow.images.conditional import *  # noqa: F403 (re-exports conditional.__all__)
from rectflow.images.generate import *  # noqa: F403 (re-exports generate.__all__)
from rectflow.images.quality import *  # noqa: F403 (re-exports quality.__all__)

__all__ = [*conditional.__all__, *quality.__all__, *classifier_features.__all__, *generate.__all__]
