"""Probability paths X_t between a source sample X0 (t = 0) and a target sample X1 (t = 1).

Every path here is affine in (X0, X1):  X_t = a(t) X1 + b(t) X0,  with target velocity
dX_t/dt = a'(t) X1 + b'(t) X0.  Rectified flow (theory §2.1) is the straight line
a = t, b = 1 - t; the diffusion / Gaussian-flow-matching paths of theory §6.1 are
other choices of (a, b) and slot in as further subclasses of :class:`AffinePath`.

Time convention (theory §1.2): t = 0 is the source pi0, t = 1 the target pi1.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import NamedTuple

import torch
from torch import Tensor

__all__ = ["AffinePath", "LinearPath", "PathCoefficients", "PathSample", "expand_like", "exact_dtype"]


def exact_dtype(device: torch.device | str) -> torch.dtype:
    """The dtype of the careful time arithmetic (schedule knots, window boundaries) on ``device``: float64 where the device
    has it (CPU, CUDA), float32 elsewhere (Apple's MPS has no float64)."""
    return torch.float64 if torch.device(device).type in ("cpu", "cuda") else torch.float32


def expand_like(t: Tensor, x: Tensor) -> Tensor:
    """Reshape a per-sample time ``t`` of shape (B,) to (B, 1, ..., 1) so it broadcasts with ``x`` (B, ...)."""
    if t.dim() == 0:
        return t
    return t.reshape(t.shape[0], *([1] * (x.dim() - 1)))


class PathCoefficients(NamedTuple):
    """a(t), b(t) and their time derivatives, each shaped like the ``t`` given."""

    a: Tensor
    b: Tensor
    da: Tensor
    db: Tensor


class PathSample(NamedTuple):
    """A point on the path and the velocity the model regresses onto."""

    x_t: Tensor  # (B, ...)
    velocity: Tensor  # (B, ...) = dX_t/dt
    t: Tensor  # (B,)


class AffinePath(ABC):
    """X_t = a(t) X1 + b(t) X0 for t in [0, 1]; subclasses define the coefficients."""

    @abstractmethod
    def coefficients(self, t: Tensor) -> PathCoefficients:
        """Return a(t), b(t), a'(t), b'(t) for a tensor of times ``t``."""

    def interpolate(self, x0: Tensor, x1: Tensor, t: Tensor) -> Tensor:
        """X_t for x0, x1 of shape (B, ...) and t of shape (B,)."""
        c = self.coefficients(t)
        return expand_like(c.a, x1) * x1 + expand_like(c.b, x0) * x0

    def velocity(self, x0: Tensor, x1: Tensor, t: Tensor) -> Tensor:
        """Conditional target velocity dX_t/dt = a'(t) X1 + b'(t) X0."""
        c = self.coefficients(t)
        return expand_like(c.da, x1) * x1 + expand_like(c.db, x0) * x0

    def sample(self, x0: Tensor, x1: Tensor, t: Tensor) -> PathSample:
        """X_t and its target velocity in one pass (shapes as in :meth:`interpolate`)."""
        c = self.coefficients(t)
        a, b = expand_like(c.a, x1), expand_like(c.b, x0)
        da, db = expand_like(c.da, x1), expand_like(c.db, x0)
        return PathSample(a * x1 + b * x0, da * x1 + db * x0, t)


class LinearPath(AffinePath):
    """The rectified-flow straight line X_t = t X1 + (1 - t) X0, velocity X1 - X0 (theory §2.1)."""

    def coefficients(self, t: Tensor) -> PathCoefficients:
        one = torch.ones_like(t)
        return PathCoefficients(t, 1 - t, one, -one)

    # Specialised versions: cheaper than the generic affine form on the training hot path.
    def interpolate(self, x0: Tensor, x1: Tensor, t: Tensor) -> Tensor:
        return torch.lerp(x0, x1, expand_like(t, x0))  # theory §2.1: X_t = t X1 + (1 - t) X0

    def velocity(self, x0: Tensor, x1: Tensor, t: Tensor) -> Tensor:
        return x1 - x0  # theory §2.1: d/dt X_t = X1 - X0

    def sample(self, x0: Tensor, x1: Tensor, t: Tensor) -> PathSample:
        return PathSample(self.interpolate(x0, x1, t), x1 - x0, t)

    def __repr__(self) -> str:
        return "LinearPath()"
