"""Distributions of the training time t in [0, 1] (where the regression puts its effort).

Uniform is the paper's choice (theory §2.4); logit-normal is SD3's (theory §6.5);
the U-shaped density, proportional to cosh(a (t - 1/2)), puts weight near both ends, which
helps reflow and one-step models.  Each sampler is a small callable:
``sampler(n, generator=..., device=...) -> Tensor (n,)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Protocol

import torch
from torch import Tensor

from rectflow.draws import rand, randn

__all__ = [
    "TimeSampler",
    "UniformTime",
    "LogitNormalTime",
    "UShapedTime",
    "LossWeight",
    "make_time_sampler",
]

LossWeight = Callable[[Tensor], Tensor]
"""Per-sample loss weight as a function of t: (B,) -> (B,)."""


class TimeSampler(Protocol):
    def __call__(
        self, n: int, *, generator: torch.Generator | None = None, device: torch.device | str | None = None
    ) -> Tensor: ...


def _uniform(n: int, generator: torch.Generator | None, device) -> Tensor:
    return rand(n, generator=generator, device=device, draw_on=device)


@dataclass(frozen=True)
class UniformTime:
    """t ~ U[eps, 1 - eps] (eps = 0: the paper's U[0, 1])."""

    eps: float = 0.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.eps < 0.5:
            raise ValueError(f"UniformTime: eps must lie in [0, 0.5), got {self.eps}")

    def __call__(self, n, *, generator=None, device=None) -> Tensor:
        u = _uniform(n, generator, device)
        return u if self.eps == 0 else self.eps + (1 - 2 * self.eps) * u


@dataclass(frozen=True)
class LogitNormalTime:
    """t = sigmoid(m + s N(0, 1)) (SD3's logit-normal sampling)."""

    mean: float = 0.0
    std: float = 1.0

    def __post_init__(self) -> None:
        if not self.std > 0:
            raise ValueError(f"LogitNormalTime: std must be > 0, got {self.std}")

    def __call__(self, n, *, generator=None, device=None) -> Tensor:
        z = randn(n, generator=generator, device=device, draw_on=device)
        return torch.sigmoid(self.mean + self.std * z)


@dataclass(frozen=True)
class UShapedTime:
    """Density proportional to cosh(a (t - 1/2)) on [0, 1], sampled by inverting its CDF.

    CDF(t) = [sinh(a (t - 1/2)) + sinh(a / 2)] / (2 sinh(a / 2)), so
    t = 1/2 + asinh((2u - 1) sinh(a / 2)) / a for u ~ U[0, 1].
    """

    a: float = 4.0

    def __post_init__(self) -> None:
        if not self.a > 0:
            raise ValueError(f"UShapedTime: a must be > 0, got {self.a}")

    def __call__(self, n, *, generator=None, device=None) -> Tensor:
        u = _uniform(n, generator, device)
        return 0.5 + torch.asinh((2 * u - 1) * math.sinh(self.a / 2)) / self.a

    def density(self, t: Tensor) -> Tensor:
        """The normalised density at t (for tests and plots)."""
        return self.a * torch.cosh(self.a * (t - 0.5)) / (2 * math.sinh(self.a / 2))


_SAMPLERS = {"uniform": UniformTime, "logit_normal": LogitNormalTime, "u_shaped": UShapedTime}


def make_time_sampler(kind: str = "uniform", **params) -> TimeSampler:
    """Build a time sampler by name: ``uniform`` (eps), ``logit_normal`` (mean, std), ``u_shaped`` (a)."""
    try:
        cls = _SAMPLERS[kind]
    except KeyError:
        raise ValueError(f"unknown time sampler {kind!r}; choose one of {sorted(_SAMPLERS)}") from None
    try:
        return cls(**params)
    except TypeError as e:
        raise ValueError(f"time sampler {kind!r}: {e}") from None
