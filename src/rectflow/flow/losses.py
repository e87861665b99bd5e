"""The rectified-flow regression loss (theory §2.2).

    min_v  E_{t, (X0, X1)} w(t) || dX_t/dt - v(X_t, t) ||^2,   with dX_t/dt = X1 - X0 on the linear path.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import torch
from torch import Tensor

from rectflow.flow.couplings import Coupling
from rectflow.flow.paths import AffinePath, LinearPath
from rectflow.flow.time_sampling import LossWeight, UniformTime
from rectflow.protocols import LossOutput, Objective  # re-exported: the trainer's contract, defined below both

__all__ = ["Objective", "check_coupling", "LossOutput", "FlowBatch", "FlowMatchingObjective", "flow_matching_loss", "per_sample_mse"]

VelocityModel = Callable[..., Tensor]


def per_sample_mse(pred: Tensor, target: Tensor) -> Tensor:
    """Sum of squared errors over all non-batch dims, (B, ...) -> (B,), as in the paper's ||.||^2."""
    return (pred - target).square().flatten(1).sum(dim=1)


def flow_matching_loss(
    model: VelocityModel,
    x0: Tensor,
    x1: Tensor,
    t: Tensor,
    *,
    path: AffinePath | None = None,
    weight: LossWeight | None = None,
    model_kwargs: dict[str, Any] | None = None,
) -> LossOutput:
    """Rectified-flow / flow-matching loss on a batch of pairs.

    Args:
        model: velocity field, ``model(x_t, t, **model_kwargs) -> (B, ...)``.
        x0, x1: coupled source and target samples, (B, ...).
        t: times in [0, 1], (B,).
        path: the interpolation (default :class:`LinearPath`, i.e. 1-RF).
        weight: optional w(t) -> (B,) multiplying each sample's squared error.
    Returns:
        :class:`LossOutput` with the batch mean of w(t) ||target - v||^2 and the per-sample errors.
    """
    if x0.shape != x1.shape:
        raise ValueError(f"x0 and x1 must have the same shape, got {tuple(x0.shape)} and {tuple(x1.shape)}")
    if t.shape != (x0.shape[0],):
        raise ValueError(f"t must have shape ({x0.shape[0]},), got {tuple(t.shape)}")
    path = path or LinearPath()
    x_t, target, _ = path.sample(x0, x1, t)
    pred = model(x_t, t, **(model_kwargs or {}))
    err = per_sample_mse(pred, target)  # theory §2.2: ||(X1 - X0) - v(X_t, t)||^2
    loss = (err * weight(t)).mean() if weight is not None else err.mean()
    return LossOutput(loss, err.detach())


def check_coupling(coupling: Any) -> Coupling:
    """``coupling`` itself if it has the :class:`~rectflow.flow.couplings.Coupling` interface, else TypeError."""
    if not isinstance(coupling, Coupling):
        raise TypeError(f"{type(coupling).__name__} is not a coupling: it needs sample(n, *, generator, device) -> (x0, x1) and a bool attribute 'heavy'")
    return coupling


class FlowBatch(NamedTuple):
    """One training batch: coupled pairs (B, ...) and times (B,)."""
    x0: Tensor
    x1: Tensor
    t: Tensor


class FlowMatchingObjective:
    """The rectified-flow objective as the trainer sees it: draw pairs from a coupling and
    times from a time sampler, then regress the path's velocity (theory §2.2).

    Args:
        coupling: a :class:`~rectflow.flow.couplings.Coupling` (``sample(n, generator, device) -> (x0, x1)`` and ``heavy``), or None for loss-only use.
        path: the interpolation (default straight line).
        time_sampler: ``sampler(n, generator=, device=) -> (n,)`` (default uniform).
        weight: optional per-sample loss weight w(t).
    """

    def __init__(self, coupling: Coupling | None, path: AffinePath | None = None, time_sampler=None, weight: LossWeight | None = None):
        self.coupling = None if coupling is None else check_coupling(coupling)  # None: loss only, no draw
        self.path = path or LinearPath()
        self.time_sampler = time_sampler or UniformTime()
        self.weight = weight

    @property
    def heavy_draw(self) -> bool:
        return self.coupling is not None and self.coupling.heavy

    def draw(self, n: int, generator: torch.Generator, device) -> FlowBatch:
        x0, x1 = self.coupling.sample(n, generator=generator, device=device)
        t = self.time_sampler(n, generator=generator, device=device)
        return FlowBatch(x0, x1, t.to(x0.dtype))

    def loss(self, model, batch: FlowBatch) -> LossOutput:
        return flow_matching_loss(model, batch.x0, batch.x1, batch.t, path=self.path, weight=self.weight)
