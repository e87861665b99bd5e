"""The PeRFlow teacher (theory §5.2): any prediction model (eps, x0, v, velocity, u) on an affine path,
and its batched DDIM solve across one window per example."""

from __future__ import annotations

import copy
from typing import Any, Callable

import torch
from torch import Tensor

from rectflow.diffusion.parameterizations import check_parameterization, convert, to_x0_eps
from rectflow.diffusion.samplers import ddim
from rectflow.errors import ConfigError
from rectflow.flow.guidance import NULL_LABEL
from rectflow.flow.paths import AffinePath, expand_like
from rectflow.flow.solvers import SolveResult, time_grid
from rectflow.perflow.guidance_modes import Guidance, as_guidance

__all__ = ['Teacher', 'teacher_ddim_sample']


# ----------------------------------------------------------------------------------------- teacher
class Teacher:
    """A pretrained model as a prediction of kind ``parameterization`` on the affine ``path``.

    ``model(z, time_map(t))`` with z (B, ...), t (B,) rectflow time; ``time_map`` converts t into the
    model's own time input (e.g. ``DDPMSchedule.t_to_timestep``).  For a diffusers UNet use
    :func:`rectflow.perflow.diffusers_io.load_teacher`.

    Conditioning: every method takes ``cond`` (None: an unconditional model, called with two
    arguments); otherwise the model is called as ``model(z, time_map(t), cond)``, ``cond`` anything
    whose first dimension is the batch (class labels (B,), text embeddings (B, L, D), ...).

    Guidance (theory §5.5): ``guidance`` (a scale w, or a :class:`~rectflow.perflow.guidance_modes.Guidance`
    with the null condition; ``null_cond`` goes with a plain scale) makes every conditional call
    classifier-free guided, combined in the model's own output space in one batched call of 2B
    rows; ``nfe_per_eval`` is then 2.  Unconditional calls (``cond`` None) are never guided.
    """

    def __init__(self, model: Callable[..., Tensor], path: AffinePath, parameterization: str = "velocity",
                 *, time_map: Callable[[Tensor], Tensor] | None = None, guidance: Guidance | float | None = None,
                 null_cond: Any = NULL_LABEL) -> None:
        check_parameterization(parameterization)
        if not isinstance(path, AffinePath):
            raise ConfigError(f"perflow.Teacher: path must be an AffinePath (got {type(path).__name__})")
        self.model, self.path, self.parameterization, self.time_map = model, path, parameterization, time_map
        self.guidance = as_guidance(guidance, null_cond)

    @property
    def nfe_per_eval(self) -> int:
        """Network evaluations per sample of one conditional call (2 when guided, else 1)."""
        return 1 if self.guidance is None else self.guidance.nfe_per_eval

    def compiled(self, **compile_kwargs: Any) -> Teacher:
        """This teacher with ``torch.compile(model, dynamic=False, **compile_kwargs)`` as its network
        (same path, parameterisation, time map and guidance); ``self`` keeps the plain model.  The
        window solve calls the network on one fixed batch shape, so the compiled graph is reused:
        on the digits UNet the solve took 0.80x the eager time (perflow_step_cost.md)."""
        fast = copy.copy(self)
        fast.model = torch.compile(self.model, **{"dynamic": False, **compile_kwargs})
        return fast

    def raw(self, z: Tensor, t: Tensor, cond: Any = None) -> Tensor:
        """The model's own output at (z, t) (given ``cond``; guided when the teacher is)."""
        tau = self.time_map(t) if self.time_map is not None else t
        if cond is None:
            return self.model(z, tau)
        return self.model(z, tau, cond) if self.guidance is None else self.guidance(self.model, z, tau, cond)

    def x0_eps(self, z: Tensor, t: Tensor, cond: Any = None) -> tuple[Tensor, Tensor]:
        return to_x0_eps(self.raw(z, t, cond), self.parameterization, z, self.path, t)

    def velocity(self, z: Tensor, t: Tensor, cond: Any = None) -> Tensor:
        """dz/dt of the teacher's probability-flow ODE (a velocity field for the solvers)."""
        return convert(self.raw(z, t, cond), src=self.parameterization, dst="velocity", z=z, path=self.path, t=t)

    @torch.no_grad()
    def ddim(self, z: Tensor, t_from: Tensor, t_to: Tensor, steps: int, cond: Any = None) -> Tensor:
        """Batched DDIM from per-example times t_from (B,) to t_to (B,) in ``steps`` equal steps."""
        t_dtype = torch.promote_types(z.dtype, torch.float32)  # a half-precision z still reads the teacher at float32 times
        for j in range(steps):
            t = t_from + (t_to - t_from) * (j / steps)
            t_next = t_from + (t_to - t_from) * ((j + 1) / steps)
            x0, eps = self.x0_eps(z, t.to(t_dtype), cond)
            c = self.path.coefficients(t_next.to(t_dtype))
            z = (expand_like(c.a, z) * x0 + expand_like(c.b, z) * eps).to(z.dtype)  # theory §6.4: z' = alpha' x-hat + sigma' eps-hat
        return z


def teacher_ddim_sample(teacher: Teacher, x: Tensor, steps: int, cond: Any = None) -> SolveResult:
    """The teacher's own DDIM from t = 0 to 1 in ``steps`` uniform steps (the baseline), given
    ``cond`` (guided when the teacher is); NFE = steps x network evaluations per step (1 or 2)."""
    f = teacher.raw if cond is None else (lambda z, t: teacher.raw(z, t, cond))
    res = ddim(f, x, time_grid(steps), path=teacher.path, parameterization=teacher.parameterization)
    per = 1 if cond is None else teacher.nfe_per_eval
    return SolveResult(res.x, res.nfe * per, res.trajectory, res.times)
