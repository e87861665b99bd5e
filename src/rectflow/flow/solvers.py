"""ODE solvers for dZ_t = v(Z_t, t) dt (theory §3.1-3.3).

All solvers are pure functions: they take the velocity ``f(x, t) -> dx/dt`` (x of shape
(B, ...), t of shape (B,)), an initial state and a time grid or interval, and return a
:class:`SolveResult` holding the final state, the number of function evaluations (NFE)
and, on request, the trajectory.  Nothing is remembered between calls.

Fixed-step methods (any time grid, increasing or decreasing): Euler (order 1), midpoint
and Heun (order 2), RK4 (order 4).  Adaptive: Dormand-Prince 5(4) ("dopri5", the RK45 of
theory §3.3) with rtol / atol step-size control.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, NamedTuple, Sequence

import torch
from torch import Tensor

from rectflow.errors import ConfigError

__all__ = [
    "concat_results",
    "Velocity",
    "SolveResult",
    "Trajectory",
    "ButcherTableau",
    "FIXED_STEP_METHODS",
    "METHODS",
    "time_grid",
    "check_grid",
    "time_vector",
    "rk_step",
    "fixed_step",
    "euler",
    "midpoint",
    "heun",
    "rk4",
    "dopri5",
    "solve",
]

Velocity = Callable[[Tensor, Tensor], Tensor]
"""f(x, t) -> dx/dt with x (B, ...) and t (B,)."""


class SolveResult(NamedTuple):
    """``x``: final state (B, ...); ``nfe``: velocity evaluations used;
    ``trajectory``: (K, B, ...) states at ``times`` (K,) or None when not requested."""

    x: Tensor
    nfe: int
    trajectory: Tensor | None
    times: Tensor


class Trajectory:
    """The states and times a solve passes through, kept only when asked for: the one collector of every solver and
    sampler.  ``add(x, t)`` after each accepted step; ``result(x, nfe, times)`` the :class:`SolveResult`, whose
    ``times`` are the kept ones, or ``times`` (the grid, or [t0, t1]) when no trajectory was kept."""

    def __init__(self, x0: Tensor, t0: float, keep: bool) -> None:
        self.states: list[Tensor] | None = [x0] if keep else None
        self.times: list[float] = [t0]

    def add(self, x: Tensor, t: float) -> None:
        if self.states is not None:
            self.states.append(x)
            self.times.append(t)

    def result(self, x: Tensor, nfe: int, times: Sequence[float]) -> SolveResult:
        kept = self.states is not None
        return SolveResult(x, nfe, torch.stack(self.states) if kept else None, torch.tensor(self.times if kept else list(times), dtype=torch.float64))


def concat_results(parts: Sequence[SolveResult]) -> SolveResult:
    """Solves of the chunks of one batch, merged: states concatenated along the batch, the NFE the largest per-chunk count
    (the evaluations each sample saw), trajectories concatenated where every chunk has one on the same times (adaptive
    solves of different chunks stop at different times: then none)."""
    if len(parts) == 1:
        return parts[0]
    trajs = [p.trajectory for p in parts]
    same_times = all(p.times.shape == parts[0].times.shape and torch.equal(p.times, parts[0].times) for p in parts)
    traj = torch.cat(trajs, dim=1) if all(t is not None for t in trajs) and same_times else None
    return SolveResult(torch.cat([p.x for p in parts]), max(p.nfe for p in parts), traj, parts[0].times)


@dataclass(frozen=True)
class ButcherTableau:
    """An explicit Runge-Kutta method: stages k_i = f(x + h sum_j a_ij k_j, t + c_i h), x' = x + h sum_i b_i k_i."""

    a: tuple[tuple[float, ...], ...]
    b: tuple[float, ...]
    c: tuple[float, ...]

    @property
    def stages(self) -> int:
        return len(self.b)


EULER = ButcherTableau(a=((),), b=(1.0,), c=(0.0,))  # theory §3.1: Z_{t+1/N} = Z_t + v(Z_t, t)/N
MIDPOINT = ButcherTableau(a=((), (0.5,)), b=(0.0, 1.0), c=(0.0, 0.5))
HEUN = ButcherTableau(a=((), (1.0,)), b=(0.5, 0.5), c=(0.0, 1.0))
RK4 = ButcherTableau(
    a=((), (0.5,), (0.0, 0.5), (0.0, 0.0, 1.0)), b=(1 / 6, 1 / 3, 1 / 3, 1 / 6), c=(0.0, 0.5, 0.5, 1.0)
)
FIXED_STEP_METHODS: dict[str, ButcherTableau] = {"euler": EULER, "midpoint": MIDPOINT, "heun": HEUN, "rk4": RK4}
METHODS = (*FIXED_STEP_METHODS, "dopri5")


def time_grid(steps: int, t0: float = 0.0, t1: float = 1.0) -> Tensor:
    """A uniform grid of ``steps`` intervals from t0 to t1: a float64 tensor of steps + 1 times."""
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"steps (NFE per stage) must be an integer >= 1, got {steps!r}")
    return torch.linspace(t0, t1, steps + 1, dtype=torch.float64)


def check_grid(grid: Tensor | Sequence[float], *, name: str = "time grid", increasing: bool = False, unit_interval: bool = False) -> list[float]:
    """The one time-grid check of the library: at least 2 finite times, strictly monotone
    (``increasing``: strictly increasing only, noise -> data), inside [0, 1] if ``unit_interval``.
    Returns the times as Python floats; raises ConfigError (a ValueError) naming ``name``."""
    g = [float(v) for v in (grid.tolist() if isinstance(grid, Tensor) else grid)]
    if len(g) < 2:
        raise ConfigError(f"{name}: needs at least 2 points, got {len(g)}")
    if not all(math.isfinite(v) for v in g):
        raise ConfigError(f"{name}: contains NaN or inf")
    if unit_interval and not all(-1e-12 <= v <= 1 + 1e-12 for v in g):
        raise ConfigError(f"{name}: times must lie in [0, 1], got {g[:4]}{'...' if len(g) > 4 else ''}")
    d = [b - a for a, b in zip(g, g[1:])]
    if not all(s > 0 for s in d) and (increasing or not all(s < 0 for s in d)):
        raise ConfigError(f"{name}: must be strictly increasing (noise -> data)" if increasing else f"{name}: must be strictly increasing or strictly decreasing")
    return g


def time_vector(x: Tensor, t: float) -> Tensor:
    """The time t for each row of x, (B,): the one way a sampler builds a model's time input.  In float32
    at least (float64 with float64 states): bf16 would read t = 0.99 as 0.98828125, another noise level."""
    return torch.full((x.shape[0],), t, dtype=torch.promote_types(x.dtype, torch.float32), device=x.device)


def rk_step(f: Velocity, x: Tensor, t: float, h: float, tableau: ButcherTableau, k1: Tensor | None = None) -> tuple[Tensor, list[Tensor]]:
    """One explicit Runge-Kutta step of size ``h`` (either sign) from (x, t) over ``tableau``:
    the one stage loop of the library (fixed-step solvers, dopri5 and the compiled image sampler).

    ``k1``: f(x, t) when already known (first-same-as-last), saving one evaluation.  Returns
    (x + h sum_i b_i k_i, [k_1 .. k_s]); the NFE spent is ``s`` (``s - 1`` with ``k1``).  Plain
    Python floats drive the loop, so ``torch.compile`` unrolls it with no host synchronisation.
    """
    ks: list[Tensor] = [] if k1 is None else [k1]
    for a_row, c in zip(tableau.a[len(ks):], tableau.c[len(ks):]):
        xi = x
        for a_ij, k in zip(a_row, ks):
            if a_ij != 0.0:
                xi = xi + (h * a_ij) * k
        ks.append(f(xi, time_vector(x, t + c * h)).to(x.dtype))  # a field that multiplies by the float32 t must not promote x
    for b_i, k in zip(tableau.b, ks):
        if b_i != 0.0:
            x = x + (h * b_i) * k
    return x, ks


def fixed_step(
    f: Velocity,
    x: Tensor,
    grid: Tensor | Sequence[float],
    tableau: ButcherTableau,
    *,
    return_trajectory: bool = False,
) -> SolveResult:
    """Integrate from grid[0] to grid[-1] with one explicit RK step per grid interval.

    NFE = tableau.stages * (len(grid) - 1).
    """
    g = check_grid(grid)
    traj = Trajectory(x, g[0], return_trajectory)
    nfe = 0
    for t, t_next in zip(g, g[1:]):
        x, ks = rk_step(f, x, t, t_next - t, tableau)
        nfe += len(ks)
        traj.add(x, t_next)
    return traj.result(x, nfe, g)


def euler(f: Velocity, x: Tensor, grid, *, return_trajectory: bool = False) -> SolveResult:
    """Euler's method (order 1); one step from 0 to 1 is one-step generation Z_1 = Z_0 + v(Z_0, 0)."""
    return fixed_step(f, x, grid, EULER, return_trajectory=return_trajectory)


def midpoint(f: Velocity, x: Tensor, grid, *, return_trajectory: bool = False) -> SolveResult:
    """Explicit midpoint method (order 2, 2 NFE per step)."""
    return fixed_step(f, x, grid, MIDPOINT, return_trajectory=return_trajectory)


def heun(f: Velocity, x: Tensor, grid, *, return_trajectory: bool = False) -> SolveResult:
    """Heun's method / explicit trapezoid (order 2, 2 NFE per step)."""
    return fixed_step(f, x, grid, HEUN, return_trajectory=return_trajectory)


def rk4(f: Velocity, x: Tensor, grid, *, return_trajectory: bool = False) -> SolveResult:
    """Classical Runge-Kutta (order 4, 4 NFE per step)."""
    return fixed_step(f, x, grid, RK4, return_trajectory=return_trajectory)


# Dormand-Prince 5(4) coefficients (Dormand & Prince 1980), the RK45 of theory §3.3.
_DP_C = (0.0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0, 1.0)
_DP_A = (
    (),
    (1 / 5,),
    (3 / 40, 9 / 40),
    (44 / 45, -56 / 15, 32 / 9),
    (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729),
    (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656),
    (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84),
)
_DP_B5 = (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84, 0.0)
_DP_B4 = (5179 / 57600, 0.0, 7571 / 16695, 393 / 640, -92097 / 339200, 187 / 2100, 1 / 40)
_DP_E = tuple(b5 - b4 for b5, b4 in zip(_DP_B5, _DP_B4))
DOPRI5 = ButcherTableau(a=_DP_A, b=_DP_B5, c=_DP_C)  # 7 stages, the last one at x_new (first-same-as-last)


def _rms_norm(err: Tensor, x_old: Tensor, x_new: Tensor, rtol: float, atol: float) -> float:
    scale = atol + rtol * torch.maximum(x_old.abs(), x_new.abs())
    return float((err / scale).square().mean().sqrt())


def dopri5(
    f: Velocity,
    x: Tensor,
    t0: float = 0.0,
    t1: float = 1.0,
    *,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    first_step: float | None = None,
    max_steps: int = 100_000,
    return_trajectory: bool = False,
) -> SolveResult:
    """Adaptive Dormand-Prince 5(4) from t0 to t1 (either direction), local error control on the
    RMS over the whole batch of err / (atol + rtol max(|x|, |x'|)).

    The trajectory, when requested, holds the states at the accepted step times.
    NFE counts every evaluation, including rejected steps and the initial-step estimate.
    """
    if not rtol > 0:
        raise ValueError(f"rtol must be > 0, got {rtol}")
    if not atol >= 0:
        raise ValueError(f"atol must be >= 0, got {atol}")
    t0, t1 = float(t0), float(t1)
    if t0 == t1:
        raise ValueError("dopri5: t0 and t1 must differ")
    direction = 1.0 if t1 > t0 else -1.0
    span = abs(t1 - t0)
    k1 = f(x, time_vector(x, t0)).to(x.dtype)
    nfe = 1
    if first_step is None:
        # Hairer, Norsett & Wanner (1993), II.4: h from the scale of x and f, checked by one Euler probe.
        d0 = _rms_norm(x, x, x, rtol, atol) if atol > 0 or bool((x != 0).any()) else 0.0
        d1 = _rms_norm(k1, x, x, rtol, atol)
        h0 = 1e-6 if d0 < 1e-5 or d1 < 1e-5 else 0.01 * d0 / d1
        h0 = min(h0, span)
        x_probe = x + direction * h0 * k1
        k_probe = f(x_probe, time_vector(x, t0 + direction * h0)).to(x.dtype)
        nfe += 1
        d2 = _rms_norm(k_probe - k1, x, x, rtol, atol) / h0
        h1 = max(1e-6, h0 * 1e-3) if max(d1, d2) <= 1e-15 else (0.01 / max(d1, d2)) ** (1 / 5)
        h = min(100 * h0, h1, span)
    else:
        if not first_step > 0:
            raise ValueError(f"first_step must be > 0, got {first_step}")
        h = min(float(first_step), span)
    t = t0
    traj = Trajectory(x, t0, return_trajectory)
    for _ in range(max_steps):
        if direction * (t1 - t) <= 1e-12 * max(1.0, abs(t1)):
            break
        h = min(h, abs(t1 - t))
        hs = direction * h
        x_new, ks = rk_step(f, x, t, hs, DOPRI5, k1=k1)
        nfe += DOPRI5.stages - 1
        err = sum((hs * e) * k for e, k in zip(_DP_E, ks) if e != 0.0)
        err_norm = _rms_norm(err, x, x_new, rtol, atol)
        if not math.isfinite(err_norm):
            raise FloatingPointError(f"dopri5: the state became NaN/inf at t = {t:.6g}")
        if err_norm <= 1.0:
            t = t1 if h >= abs(t1 - t) else t + hs
            x, k1 = x_new, ks[-1]  # first-same-as-last: k7 = f(x_new, t + h)
            traj.add(x, t)
        factor = 10.0 if err_norm == 0 else min(10.0, max(0.2, 0.9 * err_norm ** (-1 / 5)))
        h = h * factor
        if h < 1e-12 * max(1.0, span):
            raise FloatingPointError(f"dopri5: step size underflow at t = {t:.6g} (is the velocity finite and smooth?)")
    else:
        raise RuntimeError(f"dopri5: did not reach t1 = {t1} within max_steps = {max_steps}")
    return traj.result(x, nfe, [t0, t1])


def solve(
    f: Velocity,
    x: Tensor,
    *,
    method: str = "euler",
    steps: int | None = 100,
    grid: Tensor | Sequence[float] | None = None,
    t0: float = 0.0,
    t1: float = 1.0,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    return_trajectory: bool = False,
) -> SolveResult:
    """Integrate dx/dt = f(x, t) from t0 to t1 with any solver of this module, by name.

    Fixed-step methods use ``grid`` if given, else ``steps`` uniform intervals; ``dopri5`` uses
    rtol/atol and ignores steps/grid.
    """
    if method == "dopri5":
        return dopri5(f, x, t0, t1, rtol=rtol, atol=atol, return_trajectory=return_trajectory)
    try:
        tableau = FIXED_STEP_METHODS[method]
    except KeyError:
        raise ValueError(f"unknown solver {method!r}; choose one of {list(METHODS)}") from None
    if grid is None:
        if steps is None:
            raise ValueError("solve: give steps or grid for a fixed-step method")
        grid = time_grid(steps, t0, t1)
    return fixed_step(f, x, grid, tableau, return_trajectory=return_trajectory)
