"""One-step distillation (theory §4.2): from a coupling (Z0, Z1), train a map by regressing at
t = 0 only,

    min_v  E d( (Z1 - Z0), v(Z0, 0) ),   d = ||.||^2 (L2) or pseudo-Huber,

so that one Euler step Z0 + v(Z0, 0) lands on Z1.  On the random coupling this can only learn
the conditional mean E[X1 | X0] (blurry); on the coupling of a reflowed flow it works.

The per-sample loss ``d(pred, target) -> (B,)`` is pluggable (:data:`DistillLoss`): L2 and
pseudo-Huber now; a perceptual loss (LPIPS) for images slots in with the same signature.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch
from torch import Tensor, nn

from rectflow.flow.couplings import Coupling
from rectflow.flow.losses import LossOutput, check_coupling, per_sample_mse

__all__ = ['DistillLoss', 'DistillBatch', 'l2_loss', 'PseudoHuberLoss', 'make_distill_loss', 'distillation_loss', 'DistillationObjective', 'one_step']


DistillLoss = Callable[[Tensor, Tensor], Tensor]
"""d(pred, target) for pred, target (B, ...) -> per-sample losses (B,)."""


def l2_loss(pred: Tensor, target: Tensor) -> Tensor:
    """||pred - target||^2 per sample (B,), the loss of theory §4.2."""
    return per_sample_mse(pred, target)


@dataclass(frozen=True)
class PseudoHuberLoss:
    """sqrt(||pred - target||^2 + c^2) - c per sample (Song & Dhariwal, "Improved techniques for
    consistency models"): L2 near 0, L1 in the tails, so outlier pairs pull less.

    ``c``: the transition scale; 0 picks 0.00054 sqrt(d) (the images' choice, d = values per sample).
    """

    c: float = 0.0

    def __post_init__(self) -> None:
        if not self.c >= 0:
            raise ValueError(f"PseudoHuberLoss: c must be >= 0, got {self.c}")

    def __call__(self, pred: Tensor, target: Tensor) -> Tensor:
        c = self.c or 0.00054 * math.sqrt(pred[0].numel())
        return torch.sqrt(per_sample_mse(pred, target) + c * c) - c


def make_distill_loss(name: str = "l2", *, c: float = 0.0) -> DistillLoss:
    """A distillation loss by name: ``l2`` or ``pseudo_huber`` (with scale ``c``)."""
    if name == "l2":
        return l2_loss
    if name == "pseudo_huber":
        return PseudoHuberLoss(c)
    raise ValueError(f"unknown distillation loss {name!r}; choose one of ['l2', 'pseudo_huber']")


def distillation_loss(model: nn.Module, x0: Tensor, x1: Tensor, *, loss: DistillLoss = l2_loss, model_kwargs: dict | None = None) -> LossOutput:
    """Batch mean of d((X1 - X0), v(X0, 0)) for coupled x0, x1 (B, ...) (theory §4.2)."""
    if x0.shape != x1.shape:
        raise ValueError(f"x0 and x1 must have the same shape, got {tuple(x0.shape)} and {tuple(x1.shape)}")
    t = torch.zeros(x0.shape[0], dtype=x0.dtype, device=x0.device)
    pred = model(x0, t, **(model_kwargs or {}))
    per = loss(pred, x1 - x0)  # theory §4.2: (Z1 - Z0) vs v(Z0, 0)
    return LossOutput(per.mean(), per.detach())


class DistillBatch(NamedTuple):
    """Coupled pairs (B, ...); the time is always 0."""

    x0: Tensor
    x1: Tensor


class DistillationObjective:
    """Distillation as the trainer sees it: draw pairs from ``coupling``, regress at t = 0.

    Args:
        coupling: a :class:`~rectflow.flow.couplings.Coupling` (``sample(n, generator=, device=) -> (x0, x1)`` and ``heavy``; a
            :class:`~rectflow.reflow.pairs.PairCoupling` for reflow + distillation, or the independent
            coupling to see the conditional-mean failure).
        loss: per-sample loss d(pred, target) -> (B,) (default L2).
    """

    def __init__(self, coupling: Coupling, loss: DistillLoss = l2_loss) -> None:
        self.coupling = check_coupling(coupling)
        self.loss_fn = loss

    @property
    def heavy_draw(self) -> bool:
        return self.coupling.heavy

    def draw(self, n: int, generator: torch.Generator, device) -> DistillBatch:
        x0, x1 = self.coupling.sample(n, generator=generator, device=device)
        return DistillBatch(x0, x1)

    def loss(self, model: nn.Module, batch: DistillBatch) -> LossOutput:
        return distillation_loss(model, batch.x0, batch.x1, loss=self.loss_fn)


@torch.no_grad()
def one_step(model: nn.Module, x0: Tensor) -> Tensor:
    """One-step generation Z1 = Z0 + v(Z0, 0) (theory §3.1, Euler with N = 1)."""
    was_training = model.training
    model.eval()
    try:
        return x0 + model(x0, torch.zeros(x0.shape[0], dtype=x0.dtype, device=x0.device))  # theory §3.1: N = 1
    finally:
        model.train(was_training)
