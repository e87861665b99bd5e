"""Sampling a trained velocity model: the ODE solvers of :mod:`rectflow.flow.solvers` applied to
``model(x, t)`` without autograd, plus the NFE bookkeeping the CLI and benchmarks report."""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn

from rectflow.errors import ConfigError
from rectflow.flow.solvers import FIXED_STEP_METHODS, METHODS, SolveResult, solve

__all__ = ["sample_model", "run_sampler", "parse_solver_spec", "solver_label"]


def sample_model(
    model: nn.Module,
    x0: Tensor,
    *,
    method: str = "euler",
    steps: int | None = 100,
    grid: Tensor | Sequence[float] | None = None,
    t0: float = 0.0,
    t1: float = 1.0,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    return_trajectory: bool = False,
    batch_size: int | None = None,
    model_kwargs: dict[str, Any] | None = None,
) -> SolveResult:
    """Integrate dZ/dt = model(Z, t) from t0 to t1 starting at x0 (B, ...) (theory §3).

    ``batch_size`` splits x0 into chunks to bound memory; the NFE reported is then the largest
    per-chunk count (the evaluations each sample saw).  Non-finite samples raise FloatingPointError
    (never returned silently).
    """
    kw = model_kwargs or {}

    def f(x: Tensor, t: Tensor) -> Tensor:
        return model(x, t, **kw)

    def run() -> SolveResult:
        chunks = [x0] if batch_size is None or batch_size >= x0.shape[0] else list(x0.split(batch_size))
        parts = [solve(f, c, method=method, steps=steps, grid=grid, t0=t0, t1=t1, rtol=rtol, atol=atol, return_trajectory=return_trajectory) for c in chunks]
        if len(parts) == 1:
            return parts[0]
        traj = torch.cat([p.trajectory for p in parts], dim=1) if return_trajectory and method != "dopri5" else None
        return SolveResult(torch.cat([p.x for p in parts]), max(p.nfe for p in parts), traj, parts[0].times)

    return run_sampler(model, run, method)


def run_sampler(model: nn.Module, sampler: Callable[[], SolveResult], name: str) -> SolveResult:
    """Run ``sampler()`` the way every sampling entry point must: the model in eval mode (dropout off) and restored after,
    no autograd graph, and a non-finite result raised as FloatingPointError, never returned."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            res = sampler()
    finally:
        model.train(was_training)
    if not bool(torch.isfinite(res.x).all()):
        raise FloatingPointError(f"sampling with {name} produced NaN or inf: the model's output is not finite (diverged weights or a bad input)")
    return res


def parse_solver_spec(spec: str) -> tuple[str, int | None]:
    """``"euler:4"`` -> ("euler", 4); ``"dopri5"`` -> ("dopri5", None).  Raises ConfigError."""
    name, _, steps = str(spec).partition(":")
    if name not in METHODS:
        raise ConfigError(f"solver {spec!r}: unknown method {name!r}; choose one of {list(METHODS)}")
    if name == "dopri5":
        if steps:
            raise ConfigError(f"solver {spec!r}: dopri5 is adaptive and takes no step count (set rtol/atol)")
        return name, None
    if name in FIXED_STEP_METHODS:
        try:
            n = int(steps)
        except ValueError:
            raise ConfigError(f"solver {spec!r}: write {name}:STEPS with an integer number of steps >= 1") from None
        if n < 1:
            raise ConfigError(f"solver {spec!r}: steps (NFE) must be >= 1, got {n}")
        return name, n
    raise ConfigError(f"solver {spec!r} is not understood")


def solver_label(method: str, steps: int | None) -> str:
    return method if steps is None else f"{method}:{steps}"
