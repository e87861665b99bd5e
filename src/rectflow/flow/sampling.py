"""Sampling a trained velocity model with the ODE solvers of :mod:`rectflow.flow.solvers`, and :func:`run_sampler`, the
guard every sampling entry point runs under (eval mode, no autograd, finite output).

The library's one sampling verb, with every sampler by name (flow solvers, diffusion samplers, mean-flow and PeRFlow
maps), guidance and batching, is :func:`rectflow.diffusion.specs.sample` (``rectflow.sample``).  :func:`sample_model`
is only for what a spec cannot say, a custom time grid or a partial interval [t0, t1] of the flow ODE, under the same
guard; it is not exported at the top of the package."""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn

from rectflow.flow.solvers import SolveResult, concat_results, solve

__all__ = ["sample_model", "run_sampler"]


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
    """Integrate dZ/dt = model(Z, t) from t0 to t1 starting at x0 (B, ...) (theory §3.1-3.3).

    ``batch_size`` splits x0 into chunks to bound memory; the NFE reported is then the largest
    per-chunk count (the evaluations each sample saw).  Non-finite samples raise FloatingPointError
    (never returned silently).
    """
    kw = model_kwargs or {}

    def f(x: Tensor, t: Tensor) -> Tensor:
        return model(x, t, **kw)

    def run() -> SolveResult:
        chunks = [x0] if batch_size is None or batch_size >= x0.shape[0] else list(x0.split(batch_size))
        return concat_results([solve(f, c, method=method, steps=steps, grid=grid, t0=t0, t1=t1, rtol=rtol, atol=atol, return_trajectory=return_trajectory)
                               for c in chunks])

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
