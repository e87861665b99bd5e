"""Class-conditional rectified flow and classifier-free guidance (theory §7.2, as in SD3).

Training: the target pi1 carries labels; a :class:`LabelledCoupling` draws (x0, x1, y) and
:class:`ConditionalFlowMatchingObjective` regresses v(X_t, t, y) on the straight-line velocity,
replacing each label by :data:`NULL_LABEL` with probability ``p_uncond`` (label dropout), so one
network learns both the conditional and the unconditional velocity.

Sampling: :class:`GuidedVelocity` is a drop-in ``model(x, t)`` for every sampler of the library
(:mod:`rectflow.flow.solvers`, :func:`rectflow.sample`, :mod:`rectflow.diffusion.samplers`,
:mod:`rectflow.images.generate`) that returns

    v_w(x, t | y) = v(x, t | null) + w (v(x, t | y) - v(x, t | null)),

w = 1 the plain conditional velocity, w = 0 the unconditional one, w > 1 guided.  The combination
is linear, so it is valid for any linear parameterisation the samplers convert (velocity, eps,
x0, v).  The two branches are evaluated in ONE network call on a batch of 2B (cond | uncond).

NFE rule: NFE counts network evaluations per sample.  A guided velocity evaluation (w not in
{0, 1}) costs 2 NFE -- even though it is one batched call -- and an unguided one 1 NFE.  The
solvers report velocity evaluations; :func:`sample_guided` multiplies by
:attr:`GuidedVelocity.nfe_per_eval`.  ``forward`` mutates no state (a counter inside it would be a
guard of ``torch.compile`` and recompile the sampler on every call); the tests check the rule by
counting the rows that reach the network from outside.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from rectflow.diffusion.specs import sample, spec_label
from rectflow.errors import ConfigError, DataError, check_fraction
from rectflow.flow.guidance import drop_conditions, guidance_nfe, guided_call
from rectflow.flow.losses import FlowMatchingObjective, LossOutput, flow_matching_loss
from rectflow.flow.paths import AffinePath
from rectflow.flow.solvers import SolveResult
from rectflow.protocols import NULL_LABEL

__all__ = [
    "drop_labels",
    "num_classes_of",
    "require_conditional",
    "LabelledCoupling",
    "ConditionalFlowBatch",
    "ConditionalFlowMatchingObjective",
    "GuidedVelocity",
    "LabelConditioned",
    "sample_guided",
]


def drop_labels(y: Tensor, p_uncond: float, generator: torch.Generator | None = None) -> Tensor:
    """Replace each label by NULL_LABEL with probability ``p_uncond`` (one uniform draw per label
    from ``generator``, always made so the stream does not depend on p).  y (B,) -> (B,)."""
    check_fraction(p_uncond, "label dropout p_uncond")
    return drop_conditions(y, NULL_LABEL, p_uncond, generator)


def num_classes_of(model: nn.Module) -> int:
    """The number of classes a model is conditioned on (0: unconditional); looks through wrappers
    (DDP, torch.compile, GuidedVelocity) via ``module`` / ``_orig_mod`` / ``model`` attributes."""
    seen = 0
    while seen < 8:
        n = getattr(model, "num_classes", None)
        if isinstance(n, int):
            return n
        model = getattr(model, "module", None) or getattr(model, "_orig_mod", None) or getattr(model, "model", None)
        if model is None:
            return 0
        seen += 1
    return 0


def require_conditional(model: nn.Module, what: str = "guidance") -> int:
    """num_classes_of(model), raising ConfigError for an unconditional model."""
    n = num_classes_of(model)
    if n < 1:
        raise ConfigError(f"{what} needs a class-conditional model (model.num_classes > 0), but this model is unconditional")
    return n


@dataclass
class LabelledCoupling:
    """Independent coupling of a source pi0 with a labelled target pi1:
    ``sample(n, generator, device) -> (x0, x1, y)`` with (x1, y) from ``target.sample_labelled``."""
    source: Any
    target: Any
    heavy = False  # a draw is two sampler calls

    def __post_init__(self) -> None:
        if not hasattr(self.target, "sample_labelled"):
            raise DataError(f"class-conditional training needs a labelled target (images in class folders or digits), got {self.target!r}")

    @property
    def num_classes(self) -> int:
        return int(getattr(self.target, "num_classes", 0))

    def sample(self, n: int, *, generator=None, device=None) -> tuple[Tensor, Tensor, Tensor]:
        x0 = self.source.sample(n, generator=generator, device=device)
        x1, y = self.target.sample_labelled(n, generator=generator, device=device)
        return x0, x1, y


class ConditionalFlowBatch(NamedTuple):
    """Coupled pairs (B, ...), times (B,) and labels (B,) after dropout (NULL_LABEL = dropped)."""

    x0: Tensor
    x1: Tensor
    t: Tensor
    y: Tensor


class ConditionalFlowMatchingObjective(FlowMatchingObjective):
    """The rectified-flow loss (theory §2.2) of v(X_t, t, y), with label dropout (theory §7.2).

    Args:
        coupling: ``sample(n, generator=, device=) -> (x0, x1, y)`` (e.g. :class:`LabelledCoupling`).
        p_uncond: probability of replacing a label by NULL_LABEL (0.1 is common).
        path, time_sampler, weight: as in :class:`rectflow.flow.losses.FlowMatchingObjective`.
    Draw order per batch: the coupling, then t, then the dropout draws (all from one generator).
    """

    def __init__(self, coupling, p_uncond: float = 0.1, path: AffinePath | None = None, time_sampler=None, weight=None) -> None:
        super().__init__(coupling, path=path, time_sampler=time_sampler, weight=weight)
        self.p_uncond = check_fraction(p_uncond, "label dropout p_uncond")

    def draw(self, n: int, generator: torch.Generator, device) -> ConditionalFlowBatch:
        x0, x1, y = self.coupling.sample(n, generator=generator, device=device)
        t = self.time_sampler(n, generator=generator, device=device)
        return ConditionalFlowBatch(x0, x1, t.to(x0.dtype), drop_labels(y, self.p_uncond, generator))

    def loss(self, model, batch: ConditionalFlowBatch) -> LossOutput:
        return flow_matching_loss(model, batch.x0, batch.x1, batch.t, path=self.path, weight=self.weight, model_kwargs={"y": batch.y})


class GuidedVelocity(nn.Module):
    """Classifier-free guided ``model(x, t) -> v_w(x, t | y)`` for a fixed label batch (see module docstring).

    Args:
        model: a class-conditional network ``model(x, t, y)``.
        y: labels (B,) of the samples to draw (NULL_LABEL allowed: those rows are unconditional).
        scale: guidance scale w (w = 1: conditional, w = 0: unconditional).
    Raises:
        ConfigError: the model is unconditional.
    ``forward`` has no data-dependent Python control flow (the branch on w is fixed at
    construction), so it can be captured by torch.compile / CUDA graphs.
    """

    def __init__(self, model: nn.Module, y: Tensor, scale: float = 1.0) -> None:
        super().__init__()
        require_conditional(model, "classifier-free guidance")
        if y.dim() != 1:
            raise ValueError(f"labels y must have shape (B,), got {tuple(y.shape)}")
        self.model = model
        self.scale = float(scale)
        if not math.isfinite(self.scale):
            raise ConfigError(f"guidance scale must be a finite number, got {scale}")
        self.register_buffer("y", y.long(), persistent=False)
        # w in {0, 1} needs one branch only: 1 network evaluation instead of 2
        self.nfe_per_eval = guidance_nfe(self.scale)

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        b = x.shape[0]
        if b != self.y.shape[0]:
            raise ValueError(f"GuidedVelocity was built for {self.y.shape[0]} labels but got a batch of {b}")
        return guided_call(self._labelled, x, t, self.y, NULL_LABEL, self.scale)  # the library's one CFG combination

    def _labelled(self, x: Tensor, t: Tensor, y: Tensor) -> Tensor:
        return self.model(x, t, y=y)


class LabelConditioned(nn.Module):
    """``model(x, t, y=y)`` as ``net(x, t, y)``: class labels go to a class-conditional network by keyword, as
    :class:`GuidedVelocity` passes them, so wrappers whose forward is ``(x, t, **kwargs)`` receive them too."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor, t: Tensor, y: Tensor) -> Tensor:
        return self.model(x, t, y=y)


def sample_guided(
    model: nn.Module,
    x0: Tensor,
    y: Tensor,
    scale: float = 1.0,
    *,
    method: str = "euler",
    steps: int | None = 100,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    return_trajectory: bool = False,
    batch_size: int | None = None,
) -> SolveResult:
    """Solve the guided flow from x0 (B, ...) with labels y (B,) and guidance scale w: :func:`rectflow.sample` with
    ``cond=y``; the result's ``nfe`` counts network evaluations per sample (2 per guided velocity evaluation)."""
    require_conditional(model, "classifier-free guidance")
    if y.shape != (x0.shape[0],):
        raise DataError(f"{x0.shape[0]} samples but labels of shape {tuple(y.shape)}; give one label per sample")
    spec = spec_label(method, None if method == "dopri5" else steps)
    return sample(LabelConditioned(model), x0, spec, cond=y.long().to(x0.device), guidance=scale, null_cond=NULL_LABEL, batch_size=batch_size,
                  trajectory=return_trajectory, rtol=rtol, atol=atol)
