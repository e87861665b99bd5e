"""The conventions every layer shares, at the bottom of the package so each side imports them and none imports
another: an :class:`Objective` (the contract between the maths and the training engine) draws a batch and scores a
model on it with a :class:`LossOutput`; :data:`NULL_LABEL` is the integer label that means "no condition" (what a
class embedding reads as unconditional and what classifier-free guidance and condition dropout write)."""

from __future__ import annotations

from typing import Any, NamedTuple, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

__all__ = ["NULL_LABEL", "LossOutput", "Objective"]

NULL_LABEL = -1


class LossOutput(NamedTuple):
    """``loss``: the scalar to minimise; ``per_sample``: (B,) unweighted squared errors (for logging)."""

    loss: Tensor
    per_sample: Tensor


@runtime_checkable
class Objective(Protocol):
    """What the trainer optimises: ``draw`` a batch (may be CPU-heavy: ``heavy_draw`` says whether
    to draw ahead in a worker process) and compute ``loss(model, batch) -> LossOutput``."""

    heavy_draw: bool

    def draw(self, n: int, generator: torch.Generator, device: torch.device) -> Any: ...

    def loss(self, model: nn.Module, batch: Any) -> LossOutput: ...
