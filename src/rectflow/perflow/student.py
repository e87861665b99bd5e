"""PeRFlow: piecewise rectified flow that accelerates a pretrained diffusion or flow model (theory §5).

Rectflow time t: 0 = noise, 1 = data (diffusion time s = 1 - t, see :mod:`rectflow.diffusion.schedules`).

* :func:`make_windows` splits [0, 1] into K windows 0 = t_0 < t_1 < ... < t_K = 1 (uniform in t,
  uniform in the teacher's log-SNR, or user-given boundaries).
* :class:`Teacher` is any model that is a prediction (eps, x0, v, velocity, u) on an affine path
  z_t = a(t) x + b(t) eps; :meth:`Teacher.solve_windows` runs a batched DDIM across one window per
  example (each example may sit in a different window).
* :class:`PeRFlowObjective` (Trainer-compatible): real data x, noise eps, window k per example;
  z_start = a(t_{k-1}) x + b(t_{k-1}) eps (forward process), z_end = teacher DDIM across window k;
  the student regresses the straight line: at z_t = z_start + (t - t_{k-1}) v,
  v = (z_end - z_start) / (t_k - t_{k-1}).
* Parameterisation inheritance.  Inside window k the straight line from z_start to the DDIM end
  point z_end = a_k x-hat + b_k eps-hat (x-hat, eps-hat the teacher's predictions at z_start) is
  itself an affine path in (x-hat, eps-hat) with *linearly interpolated* coefficients
  A(t) = a_{k-1} + r (a_k - a_{k-1}), B(t) = b_{k-1} + r (b_k - b_{k-1}), r = (t - t_{k-1}) / (t_k - t_{k-1}):
  z_t = A(t) x-hat + B(t) eps-hat, v = (a_k - a_{k-1})/dt x-hat + (b_k - b_{k-1})/dt eps-hat.
  :class:`WindowPath` is that piecewise-linear path; the student keeps the teacher's output kind
  (e.g. eps) *on the window path*, so at each window start its prediction means exactly what the
  teacher's does, and one Euler step per window of the teacher-initialised student is the teacher's
  K-step DDIM.  The weight change is stored as a delta (:func:`save_delta` / :func:`apply_delta`).
* Samplers: :func:`sample` (m Euler steps per window; m = 1 is K-step generation), returning a
  :class:`~rectflow.flow.solvers.SolveResult` with the NFE.
"""

from __future__ import annotations

import copy
from typing import Callable

from torch import Tensor, nn

from rectflow.diffusion.parameterizations import check_parameterization, convert
from rectflow.errors import ConfigError
from rectflow.flow.paths import AffinePath
from rectflow.flow.solvers import SolveResult, euler
from rectflow.perflow.teacher import Teacher
from rectflow.perflow.windows import WindowPath, window_grid

__all__ = ['PeRFlowStudent', 'sample_perflow']


# ----------------------------------------------------------------------------------------- student
class PeRFlowStudent(nn.Module):
    """The student: ``net`` (initialised from the teacher's weights) predicting the teacher's kind on
    the :class:`WindowPath`; ``forward(z, t)`` returns the piecewise-straight velocity dz/dt."""

    def __init__(self, net: nn.Module, teacher_path: AffinePath, boundaries: Tensor, parameterization: str,
                 *, time_map: Callable[[Tensor], Tensor] | None = None) -> None:
        super().__init__()
        check_parameterization(parameterization)
        self.net, self.parameterization, self.time_map = net, parameterization, time_map
        self.window_path = WindowPath(teacher_path, boundaries)

    @property
    def boundaries(self) -> Tensor:
        return self.window_path.boundaries

    def raw(self, z: Tensor, t: Tensor) -> Tensor:
        return self.net(z, self.time_map(t) if self.time_map is not None else t)

    def forward(self, z: Tensor, t: Tensor) -> Tensor:
        return convert(self.raw(z, t), src=self.parameterization, dst="velocity", z=z, path=self.window_path, t=t)

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


def sample_perflow(student: Callable[[Tensor, Tensor], Tensor], x: Tensor, boundaries: Tensor, steps_per_window: int = 1,
           *, return_trajectory: bool = False) -> SolveResult:
    """Euler with ``steps_per_window`` steps per window from noise x at t = 0; NFE = K * steps_per_window.
    With m = 1 and a :class:`PeRFlowStudent` this is one straight step per window (K-step generation)."""
    return euler(student, x, window_grid(boundaries, steps_per_window), return_trajectory=return_trajectory)
