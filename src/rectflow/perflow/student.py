"""The PeRFlow student (theory §5.3-5.4): the teacher's network in the teacher's own output space on the
window path, so a fresh copy reproduces the teacher's K-step DDIM; and its K-window Euler sampler."""

from __future__ import annotations

import copy
from typing import Any, Callable

from torch import Tensor, nn

from rectflow.diffusion.parameterizations import check_parameterization, convert
from rectflow.errors import ConfigError
from rectflow.flow.guidance import NULL_LABEL
from rectflow.flow.paths import AffinePath
from rectflow.flow.solvers import SolveResult, euler
from rectflow.perflow.guidance_modes import Guidance, as_guidance
from rectflow.perflow.teacher import Teacher
from rectflow.perflow.windows import WindowPath, step_grid, window_grid

__all__ = ['PeRFlowStudent', 'sample_perflow']


# ----------------------------------------------------------------------------------------- student
class PeRFlowStudent(nn.Module):
    """The student: ``net`` (initialised from the teacher's weights) predicting the teacher's kind on
    the :class:`WindowPath`; ``forward(z, t)`` returns the piecewise-straight velocity dz/dt.
    ``cond`` as for :class:`Teacher` (None: ``net`` is called with two arguments); ``guidance`` (a
    :class:`~rectflow.perflow.guidance_modes.Guidance`, given with a condition) guides ``net``'s own
    output before it is read on the window path (theory §5.5)."""

    def __init__(self, net: nn.Module, teacher_path: AffinePath, boundaries: Tensor, parameterization: str,
                 *, time_map: Callable[[Tensor], Tensor] | None = None) -> None:
        super().__init__()
        check_parameterization(parameterization)
        self.net, self.parameterization, self.time_map = net, parameterization, time_map
        self.window_path = WindowPath(teacher_path, boundaries)

    @property
    def boundaries(self) -> Tensor:
        return self.window_path.boundaries

    def sampling_grid(self, steps: int) -> Tensor:
        """The times (steps + 1,) float64 of ``steps`` Euler steps on the window path (steps >= K, spread over the windows
        as the exported scheduler spreads them): what ``rectflow.sample(student, x0, "perflow:N")`` integrates on."""
        return step_grid(self.boundaries, steps)

    def raw(self, z: Tensor, t: Tensor, cond: Any = None, guidance: Guidance | None = None) -> Tensor:
        tau = self.time_map(t) if self.time_map is not None else t
        if cond is None:
            return self.net(z, tau)
        return self.net(z, tau, cond) if guidance is None else guidance(self.net, z, tau, cond)

    def forward(self, z: Tensor, t: Tensor, cond: Any = None, guidance: Guidance | None = None) -> Tensor:
        return convert(self.raw(z, t, cond, guidance), src=self.parameterization, dst="velocity", z=z, path=self.window_path, t=t)

    @classmethod
    def from_teacher(cls, teacher: Teacher, boundaries: Tensor, net: nn.Module | None = None) -> "PeRFlowStudent":
        """Student with a deep copy of the teacher's network (or ``net``) and the teacher's kind/time map."""
        if net is None:
            if not isinstance(teacher.model, nn.Module):
                raise ConfigError("perflow: the teacher's model must be an nn.Module to initialise a student from it")
            net = copy.deepcopy(teacher.model).requires_grad_(True)  # a frozen (e.g. EMA) teacher gives a trainable copy
        elif not isinstance(net, nn.Module):
            raise ConfigError("perflow: the student's net must be an nn.Module")
        return cls(net, teacher.path, boundaries, teacher.parameterization, time_map=teacher.time_map)


def sample_perflow(student: Callable[..., Tensor], x: Tensor, boundaries: Tensor, steps_per_window: int = 1,
           *, cond: Any = None, guidance: Guidance | float | None = None, null_cond: Any = NULL_LABEL,
           return_trajectory: bool = False) -> SolveResult:
    """Euler with ``steps_per_window`` steps per window from noise x at t = 0; NFE = K * steps_per_window.
    The solver under the sampling verb's ``perflow:N`` spec (``rectflow.sample(student, x, "perflow:4")``, which adds eval
    mode, no graph, the non-finite check and batching); this one takes any callable and explicit ``boundaries``.
    With m = 1 and a :class:`PeRFlowStudent` this is one straight step per window (K-step generation).
    ``cond``: the condition of every row of x (None: ``student(z, t)``, else ``student(z, t, cond)``).
    ``guidance``: classifier-free guidance at that scale with ``null_cond`` as the unconditional input
    (NULL_LABEL for labels; the empty prompt's embedding for text), in a :class:`PeRFlowStudent`'s own
    output space (any other callable: in what it returns); a guided evaluation counts 2 NFE."""
    g = as_guidance(guidance, null_cond)
    if g is not None and cond is None:
        raise ConfigError("perflow: sampling with guidance needs the samples' condition (cond)")
    if cond is None:
        f = student
    elif g is None or g.scale == 1.0:
        f = lambda z, t: student(z, t, cond)
    elif isinstance(student, PeRFlowStudent):
        f = lambda z, t: student(z, t, cond, guidance=g)
    else:
        f = lambda z, t: g(student, z, t, cond)
    res = euler(f, x, window_grid(boundaries, steps_per_window), return_trajectory=return_trajectory)
    per = 1 if g is None else g.nfe_per_eval
    return SolveResult(res.x, res.nfe * per, res.trajectory, res.times)
