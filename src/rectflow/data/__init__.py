"""Data: samplers of the distributions pi0 and pi1.

Every sampler has ``dim`` (or ``shape``) and ``sample(n, generator=None, device=None) -> (n, ...)``;
any of them can be the source pi0 or the target pi1 (domain transfer, theory §1.3).
"""

from rectflow.data.image_sets import ImageArray, ImageDataset, ImageGaussian, load_digits_images, load_images
from rectflow.data.toy2d import (
    TOY_DISTRIBUTIONS,
    Checkerboard,
    Circle,
    EightGaussians,
    Gaussian,
    Moons,
    ObjectDistribution,
    PointCloud,
    Spirals,
    absolute_spec,
    as_distribution,
    make_distribution,
    point_file_path,
)

__all__ = [
    "ImageArray",
    "ImageDataset",
    "ImageGaussian",
    "load_images",
    "load_digits_images",
    "Gaussian",
    "EightGaussians",
    "Moons",
    "Circle",
    "Checkerboard",
    "Spirals",
    "PointCloud",
    "TOY_DISTRIBUTIONS",
    "make_distribution",
    "absolute_spec",
    "point_file_path",
    "ObjectDistribution",
    "as_distribution",
]
