"""Solver specs as users write them (``euler:4``, ``dopri5``, ``dpm++2m:10``, ``edm:8``): the flow
solvers of :mod:`rectflow.flow.solvers` and the diffusion samplers of :mod:`rectflow.diffusion.samplers`
applied to a velocity model, behind one name for the CLI, configs and evaluations.

A velocity model v on the straight path x_t = (1 - t) x0 + t x1 is a model of the flow-matching
schedule (a = t, b = 1 - t) with the ``velocity`` parameterisation, so the diffusion samplers apply to
it unchanged (theory §6.4, §6.9):

* ``dpm++2m:N`` / ``dpm++3m:N``: DPM-Solver++(2M) / (3M) on N uniform steps (NFE N);
* ``edm:N``: EDM's deterministic Heun on N - 1 Karras sigmas (0.002 .. 80) plus the step into
  sigma = 0 (NFE 2N - 1); it starts at sigma_max, where the state is taken as b(t_0) x0 (the
  data's share a(t_0) = 1/81 is dropped, as EDM does).
"""

from __future__ import annotations

from torch import Tensor, nn

from rectflow.diffusion.samplers import dpm_solver_pp_2m, dpm_solver_pp_3m, edm_heun
from rectflow.diffusion.schedules import FlowMatchingSchedule, karras_sigmas, times_from_sigmas
from rectflow.errors import ConfigError
from rectflow.flow.sampling import parse_solver_spec, run_sampler, sample_model
from rectflow.flow.solvers import SolveResult, time_grid

__all__ = ["DIFFUSION_SOLVERS", "check_solver", "solve_spec"]

DIFFUSION_SOLVERS = ("dpm++2m", "dpm++3m", "edm")


def check_solver(spec: str) -> tuple[str, int | None]:
    """``"dpm++2m:10"`` -> ("dpm++2m", 10), else :func:`rectflow.flow.sampling.parse_solver_spec`.  Raises ConfigError."""
    name, _, steps = str(spec).partition(":")
    if name not in DIFFUSION_SOLVERS:
        try:
            return parse_solver_spec(spec)
        except ConfigError as e:
            raise ConfigError(f"{e}; or one of the diffusion samplers {list(DIFFUSION_SOLVERS)} (e.g. dpm++2m:10)") from None
    try:
        n = int(steps)
    except ValueError:
        raise ConfigError(f"solver {spec!r}: write {name}:STEPS with an integer number of steps") from None
    low = 2 if name == "edm" else 1
    if n < low:
        raise ConfigError(f"solver {spec!r}: {name} needs at least {low} steps, got {n}")
    return name, n


def solve_spec(model: nn.Module, x0: Tensor, spec: str, *, rtol: float = 1e-5, atol: float = 1e-5) -> SolveResult:
    """Integrate the velocity model from source samples x0 (B, ...) with the solver ``spec``."""
    method, steps = check_solver(spec)
    if method in ("dpm++2m", "dpm++3m"):
        solver = dpm_solver_pp_2m if method == "dpm++2m" else dpm_solver_pp_3m
        return run_sampler(model, lambda: solver(model, x0, time_grid(steps), path=FlowMatchingSchedule(), parameterization="velocity"), spec)
    if method == "edm":
        path = FlowMatchingSchedule()
        grid = times_from_sigmas(path, karras_sigmas(steps - 1), append_data_end=True)
        start = float(path.coefficients(grid[:1]).b[0])
        return run_sampler(model, lambda: edm_heun(model, start * x0, grid, path=path, parameterization="velocity"), spec)
    return sample_model(model, x0, method=method, steps=steps, rtol=rtol, atol=atol)
