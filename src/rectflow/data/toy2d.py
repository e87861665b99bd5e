"""2-D toy distributions (and user point clouds) as samplers usable as pi0 or pi1.

Each class draws fresh i.i.d. samples from an explicit ``torch.Generator``, so training
and evaluation data are reproducible and held-out sets are just another seed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from rectflow.data.image_sets import make_image_distribution, require_real
from rectflow.draws import rand, randint, randn
from rectflow.errors import DataError, reading

__all__ = [
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


@dataclass
class Gaussian:
    """N(mean, std^2 I) in ``dim`` dimensions (the usual source pi0 = N(0, I))."""

    dim: int = 2
    mean: float = 0.0
    std: float = 1.0

    def __post_init__(self) -> None:
        if self.dim < 1 or not self.std > 0:
            raise DataError(f"gaussian: need dim >= 1 and std > 0, got dim={self.dim}, std={self.std}")

    def sample(self, n: int, *, generator=None, device=None) -> Tensor:
        return self.mean + self.std * randn(n, self.dim, generator=generator, device=device)

    def log_prob(self, x: Tensor) -> Tensor:
        """log N(x; mean, std^2 I) of points (B, dim) -> (B,) (theory §3.4 needs it for likelihoods)."""
        if x.dim() != 2 or x.shape[1] != self.dim:
            raise DataError(f"gaussian: log_prob takes points of shape (B, {self.dim}), got {list(x.shape)}")
        z = (x - self.mean) / self.std
        return -0.5 * z.square().sum(-1) - self.dim * (math.log(self.std) + 0.5 * math.log(2 * math.pi))


@dataclass
class EightGaussians:
    """Eight Gaussians at radius ``radius`` on the unit-circle directions k * 45 degrees.

    The default std 0.1**0.25 (covariance sqrt(0.1) I) is the convention of the common
    8-Gaussians benchmark (TorchCFM), which the W2 goals of the issues refer to.
    """

    radius: float = 5.0
    std: float = 0.1**0.25
    dim: int = field(default=2, init=False)

    def sample(self, n: int, *, generator=None, device=None) -> Tensor:
        k = randint(8, n, generator=generator, device=device)
        angle = k.to(torch.float32) * (math.pi / 4)
        centers = self.radius * torch.stack([torch.cos(angle), torch.sin(angle)], dim=1)
        return centers + self.std * randn(n, 2, generator=generator, device=device)


@dataclass
class Moons:
    """scikit-learn's two moons (uniform angle, Gaussian noise), then mapped x -> scale * x + shift.

    The defaults (noise 0.05, 3x - 1) are the issues' standard task.
    """

    noise: float = 0.05
    scale: float = 3.0
    shift: float = -1.0
    dim: int = field(default=2, init=False)

    def sample(self, n: int, *, generator=None, device=None) -> Tensor:
        theta = math.pi * rand(n, generator=generator, device=device)
        lower = randint(2, n, generator=generator, device=device).bool()
        x = torch.where(lower, 1 - torch.cos(theta), torch.cos(theta))
        y = torch.where(lower, 0.5 - torch.sin(theta), torch.sin(theta))
        pts = torch.stack([x, y], dim=1) + self.noise * randn(n, 2, generator=generator, device=device)
        return self.scale * pts + self.shift


@dataclass
class Circle:
    """The seed example's circle: two half circles of radius ``radius`` joined, plus Gaussian noise."""

    radius: float = 1.0
    noise: float = 0.1
    dim: int = field(default=2, init=False)

    def sample(self, n: int, *, generator=None, device=None) -> Tensor:
        theta = math.pi * rand(n, generator=generator, device=device)
        sign = 1 - 2 * randint(2, n, generator=generator, device=device).to(theta.dtype)  # upper or lower half
        pts = self.radius * torch.stack([torch.cos(theta), sign * torch.sin(theta)], dim=1)
        return pts + self.noise * randn(n, 2, generator=generator, device=device)


@dataclass
class Checkerboard:
    """Uniform on the black squares of a 4 x 4 checkerboard covering [-2, 2]^2, times ``scale``."""

    scale: float = 2.0
    dim: int = field(default=2, init=False)

    def sample(self, n: int, *, generator=None, device=None) -> Tensor:
        x = 4 * rand(n, generator=generator, device=device) - 2
        row = rand(n, generator=generator, device=device) - 2 * randint(2, n, generator=generator, device=device).to(x.dtype)
        y = row + torch.remainder(torch.floor(x), 2)
        return self.scale * torch.stack([x, y], dim=1)


@dataclass
class Spirals:
    """Two interleaved spirals (FFJORD-style), scaled to roughly [-4, 4]^2."""

    noise: float = 0.1
    turns: float = 1.5
    dim: int = field(default=2, init=False)

    def sample(self, n: int, *, generator=None, device=None) -> Tensor:
        r = torch.sqrt(rand(n, generator=generator, device=device)) * (2 * math.pi * self.turns)
        sign = 1 - 2 * randint(2, n, generator=generator, device=device).to(r.dtype)
        pts = sign[:, None] * torch.stack([-torch.cos(r) * r, torch.sin(r) * r], dim=1) / 3
        return pts + self.noise * randn(n, 2, generator=generator, device=device)


class PointCloud:
    """An empirical distribution: uniform over the rows of an (N, d) array; sampling with replacement.

    Build it from a tensor/array, or from a ``.npy`` / ``.csv`` file with :meth:`from_file`.
    """

    def __init__(self, points: Tensor | np.ndarray, name: str = "point cloud") -> None:
        raw = np.asarray(points)
        if raw.dtype.kind == "f" and raw.size and bool(np.isfinite(raw).all()):
            with np.errstate(over="ignore"):
                big = np.abs(raw) > np.finfo(np.float32).max
            if big.any():
                row = int(np.argwhere(big)[0][0])
                raise DataError(f"{name}: {int(big.any(axis=-1).sum()) if raw.ndim == 2 else int(big.sum())} rows hold values too large for float32 "
                                f"(|x| > 3.4e38, first: row {row}); rescale the data")
        pts = torch.as_tensor(raw, dtype=torch.float32)
        if pts.dim() != 2 or pts.shape[0] == 0 or pts.shape[1] == 0:
            raise DataError(f"{name}: expected a non-empty 2-D array (N points x d dims), got shape {tuple(pts.shape)}")
        bad = ~torch.isfinite(pts).all(dim=1)
        if bad.any():
            raise DataError(f"{name}: {int(bad.sum())} of {pts.shape[0]} rows contain NaN or inf (first: row {int(bad.nonzero()[0])})")
        self.points = pts
        self.dim = pts.shape[1]
        self.name = name

    @classmethod
    def from_file(cls, path: str | Path) -> "PointCloud":
        p = Path(path)
        if not p.is_file():
            raise DataError(f"{p}: no such file")
        if p.stat().st_size == 0:
            raise DataError(f"{p}: file is empty")
        with reading(p, "point cloud"):
            if p.suffix == ".npy":
                arr = np.load(p, allow_pickle=False)
            elif p.suffix == ".csv":
                arr = _load_csv(p)
            else:
                raise DataError(f"{p}: unsupported point-cloud format {p.suffix!r}; use .npy or .csv")
        if arr.ndim == 1:
            arr = arr[:, None]
        require_real(arr, str(p))
        return cls(arr, name=str(p))  # cast to float32 there, after the overflow check

    def sample(self, n: int, *, generator=None, device=None) -> Tensor:
        idx = randint(self.points.shape[0], n, generator=generator, device=None)
        return self.points[idx.cpu()].to(device)

    def __len__(self) -> int:
        return self.points.shape[0]

    def split(self, fraction: float, seed: int) -> tuple["PointCloud", "PointCloud"]:
        """Two disjoint clouds of these rows: the rest for training and a random ``fraction`` held
        out (``round(fraction * N)`` rows, chosen by a permutation seeded by ``seed``); each keeps
        the file's row order.  DataError unless both parts keep enough rows (1 and 2)."""
        n = len(self)
        k = round(fraction * n)
        if not 0 < fraction < 1 or k < 2 or n - k < 1:
            raise DataError(f"{self.name}: cannot hold out a fraction {fraction} of {n} rows (need 0 < fraction < 1, >= 2 rows held out and >= 1 to train on)")
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
        held, kept = perm[:k].sort().values, perm[k:].sort().values
        return PointCloud(self.points[kept], name=self.name), PointCloud(self.points[held], name=f"{self.name} (held out)")

    def __repr__(self) -> str:
        return f"PointCloud({self.name!r}, n={self.points.shape[0]}, dim={self.dim})"


def _load_csv(p: Path) -> np.ndarray:
    try:
        return np.loadtxt(p, delimiter=",", ndmin=2)
    except ValueError:
        return np.loadtxt(p, delimiter=",", ndmin=2, skiprows=1)  # one header line


TOY_DISTRIBUTIONS: dict[str, type] = {
    "gaussian": Gaussian,
    "8gaussians": EightGaussians,
    "moons": Moons,
    "circle": Circle,
    "checkerboard": Checkerboard,
    "spirals": Spirals,
}


def make_distribution(spec: str | dict[str, Any]) -> Any:
    """Build a sampler from a name (``"moons"``), a file path (``"points.npy"``) or a dict
    ``{"name": "8gaussians", "radius": 5}`` / ``{"name": "file", "path": "points.csv"}``.

    Image specs (``images``, ``digits``, ``gaussian`` with a ``shape``) go to
    :func:`rectflow.data.image_sets.make_image_distribution`."""
    if isinstance(spec, (str, Path)):
        spec = {"name": str(spec)}
    if not isinstance(spec, dict) or "name" not in spec:
        raise DataError(f"a distribution is a name or a mapping with a 'name' key, got {spec!r}")
    params = dict(spec)
    name = str(params.pop("name"))
    if name in ("images", "digits") or (name == "gaussian" and "shape" in params):
        return make_image_distribution({"name": name, **params})
    if name == "file" or name.endswith((".npy", ".csv")):
        path = params.pop("path", None) if name == "file" else name
        if path is None or params:
            raise DataError(f"distribution 'file' takes exactly one parameter 'path', got {sorted(params) or 'none'}")
        return PointCloud.from_file(path)
    if name not in TOY_DISTRIBUTIONS:
        raise DataError(f"unknown distribution {name!r}; choose one of {sorted(TOY_DISTRIBUTIONS)}, or a .npy/.csv path")
    try:
        return TOY_DISTRIBUTIONS[name](**params)
    except TypeError as e:
        raise DataError(f"distribution {name!r}: {e}") from None


def _is_point_file(name: Any) -> bool:
    return isinstance(name, (str, Path)) and str(name).endswith((".npy", ".csv"))


def point_file_path(spec: Any) -> str | None:
    """The file of a point-cloud spec (``"x.npy"``, ``{"name": "file", "path": ...}``), else None."""
    if _is_point_file(spec):
        return str(spec)
    if isinstance(spec, dict):
        if _is_point_file(spec.get("name")):
            return str(spec["name"])
        if spec.get("name") == "file" and isinstance(spec.get("path"), (str, Path)):
            return str(spec["path"])
    return None


def absolute_spec(spec: Any) -> Any:
    """``spec`` (as :func:`make_distribution` takes it) with the path of a data file or image set
    made absolute, resolved against the working directory; any other spec is returned as it is.

    A run records its data this way, so it can be used from any directory."""
    if _is_point_file(spec):
        return str(Path(spec).resolve())
    if not isinstance(spec, dict):
        return spec
    if _is_point_file(spec.get("name")):
        return {**spec, "name": str(Path(spec["name"]).resolve())}
    if spec.get("name") in ("file", "images") and isinstance(spec.get("path"), (str, Path)):
        return {**spec, "path": str(Path(spec["path"]).resolve())}
    return spec


class ObjectDistribution:
    """A user's sampler that has ``sample(n, generator=, device=)`` but no ``dim``/``shape``: the
    shape of one sample is read off one draw (from a generator of its own).  ``distribution`` is
    the user's object; attributes it has are reached through this wrapper."""

    def __init__(self, distribution: Any, name: str = "distribution") -> None:
        self.distribution = distribution
        try:
            x = distribution.sample(2, generator=torch.Generator().manual_seed(0))
        except TypeError as e:
            raise DataError(f"{name}: {type(distribution).__name__}.sample must take (n, generator=None, device=None): {e}") from None
        if not isinstance(x, Tensor) or x.dim() < 2 or x.shape[0] != 2:
            raise DataError(f"{name}: {type(distribution).__name__}.sample(2) must return a tensor of shape (2, ...), got {type(x).__name__} {tuple(getattr(x, 'shape', ()))}")
        self.shape = tuple(x.shape[1:]) if x.dim() > 2 else None
        self.dim = int(x[0].numel())

    def sample(self, n: int, *, generator=None, device=None) -> Tensor:
        return self.distribution.sample(n, generator=generator, device=device)

    def __getattr__(self, name: str) -> Any:  # the user's own attributes (sample_labelled, ...)
        if name.startswith("_") or name == "distribution":
            raise AttributeError(name)
        return getattr(self.distribution, name)

    def __repr__(self) -> str:
        return f"ObjectDistribution({self.distribution!r})"


def as_distribution(obj: Any, name: str = "distribution") -> Any:
    """``obj`` as a sampler of the library: any object with ``sample(n, generator=, device=)``;
    one without ``dim``/``shape`` is wrapped in :class:`ObjectDistribution`.  DataError otherwise."""
    if not callable(getattr(obj, "sample", None)):
        raise DataError(f"{name}: a {type(obj).__name__} is not a distribution: it needs sample(n, generator=None, device=None) -> (n, ...)")
    if getattr(obj, "shape", None) or getattr(obj, "dim", None):
        return obj
    return ObjectDistribution(obj, name)
