"""Classifier-free guidance inside PeRFlow (theory §5.5): a guided teacher solve, condition dropout
for the student, and guided K-step sampling of the student.

Two ways to train a student of a conditional teacher, as in the PeRFlow paper:

* ``mode="teacher"`` (guidance baked into the teacher's solve): the teacher's window solve runs at
  scale w (2 network evaluations per step), the student learns the guided flow without condition
  dropout and samples at w = 1: K NFE.
* ``mode="student"`` (guidance at student inference): the teacher solves at w = 1 on conditions
  dropped with probability ``p_uncond`` (the null rows follow the teacher's unconditional flow),
  so the student keeps a conditional and an unconditional branch and samples with guidance at w:
  2K NFE.

The combination itself is :func:`rectflow.flow.guidance.guided_call` (one batched network call);
:class:`Guidance` carries the scale and the null condition to it for teachers and students alike.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from rectflow.errors import ConfigError, DataError, check_fraction
from rectflow.flow.guidance import NULL_LABEL, check_guidance_scale, drop_conditions, guidance_nfe, guided_call

__all__ = ["GUIDANCE_MODES", "NULL_LABEL", "Guidance", "LabelledData", "as_guidance", "drop_conditions", "guidance_plan"]

GUIDANCE_MODES = ("teacher", "student")


@dataclass(frozen=True, eq=False)  # null_cond may be a tensor: no field-wise ==
class Guidance:
    """Classifier-free guidance at ``scale`` w with ``null_cond`` as the unconditional input
    (NULL_LABEL for class labels; the empty prompt's embedding, shape (L, D) or (1, L, D), for text).

    ``guidance(net, z, tau, cond)`` is the guided output of ``net(z, tau, cond)`` in the network's
    own output space; ``nfe_per_eval`` the network evaluations per sample it costs (1 or 2).
    """

    scale: float = 1.0
    null_cond: Any = NULL_LABEL

    def __post_init__(self) -> None:
        object.__setattr__(self, "scale", check_guidance_scale(self.scale))

    @property
    def nfe_per_eval(self) -> int:
        return guidance_nfe(self.scale)

    def __call__(self, net: Callable[..., Tensor], z: Tensor, tau: Tensor, cond: Any) -> Tensor:
        return guided_call(net, z, tau, cond, self.null_cond, self.scale)


def as_guidance(guidance: Guidance | float | None, null_cond: Any = NULL_LABEL) -> Guidance | None:
    """A :class:`Guidance` from a scale (with ``null_cond``), a Guidance, or None (no guidance)."""
    if guidance is None or isinstance(guidance, Guidance):
        return guidance
    return Guidance(guidance, null_cond)


def guidance_plan(mode: str, scale: float, p_uncond: float) -> tuple[float, float]:
    """(teacher's scale in the window solve, student's scale at sampling) of a guidance mode.

    "teacher": (w, 1); "student": (1, w), which needs ``p_uncond`` > 0 whenever w != 1 (the
    student's unconditional branch is trained only by condition dropout)."""
    w = check_guidance_scale(scale)
    if mode not in GUIDANCE_MODES:
        raise ConfigError(f"perflow: guidance_mode must be one of {list(GUIDANCE_MODES)}, got {mode!r}")
    p_uncond = check_fraction(p_uncond, "perflow: p_uncond")
    if mode == "teacher":
        return w, 1.0
    if w != 1.0 and p_uncond <= 0.0:
        raise ConfigError("perflow: guidance_mode 'student' samples the student with guidance, so it needs p_uncond > 0 "
                          "(condition dropout keeps the student's unconditional branch)")
    return 1.0, w


class LabelledData:
    """A labelled image set as PeRFlow data: ``sample(n, generator=, device=) -> (x, y)`` from its
    ``sample_labelled`` (x (n, C, H, W), y (n,) int64)."""

    def __init__(self, data: Any) -> None:
        if not hasattr(data, "sample_labelled") or int(getattr(data, "num_classes", 0) or 0) < 1:
            raise DataError(f"a class-conditional teacher needs labelled images (class folders or digits), got {data!r}")
        self.data = data

    @property
    def num_classes(self) -> int:
        return int(self.data.num_classes)

    def sample(self, n: int, *, generator: torch.Generator | None = None, device=None) -> tuple[Tensor, Tensor]:
        return self.data.sample_labelled(n, generator=generator, device=device)

    def __repr__(self) -> str:
        return f"LabelledData({self.data!r})"
