"""One verb for sampling a trained model: ``sample(model, x0, "dpm++2m:10")``.

Every sampler of the library is a *spec*, a name and (for fixed-step samplers) a step count, as users write it in
configs and on the command line:

==============  ==========================================================  ===========================
spec            what runs                                                   NFE per sample
==============  ==========================================================  ===========================
``euler:N``     the flow ODE, Euler on N uniform steps (theory §3.1)        N
``midpoint:N``  explicit midpoint (2nd order)                               2N
``heun:N``      Heun (2nd order)                                            2N
``rk4:N``       classical Runge-Kutta (4th order)                           4N
``dopri5``      Dormand-Prince 5(4), adaptive (``rtol`` / ``atol``)         counted
``dpm++2m:N``   DPM-Solver++(2M) on N uniform steps (theory §6.9)           N
``dpm++3m:N``   the 3M step that integrates the quadratic exactly (§6.9)    N
``edm:N``       EDM's Heun on N - 1 Karras sigmas and a last Euler (§6.9)   2N - 1
``meanflow:N``  the average-velocity map u(z, s, t) in N jumps (§2.6)       N
``perflow:N``   a PeRFlow student: Euler on its window path, N >= K steps   N
                spread over the K windows (§5.4; N = K: one per window)
==============  ==========================================================  ===========================

A velocity model on the straight path is a model of the flow-matching schedule (a = t, b = 1 - t) with the
``velocity`` parameterisation, so the diffusion samplers apply to it unchanged.  ``edm:N`` starts at sigma_max = 80,
where the state is b(t_0) x0: the data's share a(t_0) = 1/81 is dropped, as EDM does.  ``perflow:N`` asks the model for
its grid (``model.sampling_grid(N)``, as :class:`rectflow.perflow.PeRFlowStudent` has): guidance on the student's
velocity equals guidance on its network's own output, since the window velocity is affine in that output.

:func:`sample` owns what every sampling must do: the model in eval mode and restored after, no autograd graph, a
non-finite result raised (never returned), batching (``batch_size``), classifier-free guidance (``cond`` with a guidance
scale: the network runs on cat([cond, null]) and the NFE doubles) and NFE counting.  The module sits in the diffusion
layer because that is the lowest layer that sees both the flow solvers and the diffusion samplers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from torch import Tensor, nn

from rectflow.diffusion.samplers import dpm_solver_pp_2m, dpm_solver_pp_3m, edm_heun
from rectflow.diffusion.schedules import FlowMatchingSchedule, karras_sigmas, times_from_sigmas
from rectflow.errors import ConfigError, check_int
from rectflow.flow.guidance import NULL_LABEL, check_guidance_scale, condition_batch, guidance_nfe, guided_call, map_condition, null_condition
from rectflow.flow.meanflow import sample_mean_flow
from rectflow.flow.sampling import run_sampler
from rectflow.flow.solvers import SolveResult, concat_results, euler, solve, time_grid

__all__ = ["SPECS", "Spec", "parse_spec", "spec_label", "sample"]


@dataclass(frozen=True)
class Spec:
    """A sampler name: ``min_steps`` None for adaptive samplers (no step count), ``mean_flow`` for models u(z, s, t)."""

    min_steps: int | None
    description: str
    mean_flow: bool = False
    windows: bool = False


SPECS: dict[str, Spec] = {
    "euler": Spec(1, "flow ODE, Euler"),
    "midpoint": Spec(1, "flow ODE, explicit midpoint"),
    "heun": Spec(1, "flow ODE, Heun"),
    "rk4": Spec(1, "flow ODE, classical Runge-Kutta"),
    "dopri5": Spec(None, "flow ODE, adaptive Dormand-Prince 5(4)"),
    "dpm++2m": Spec(1, "DPM-Solver++(2M) on the flow-matching schedule"),
    "dpm++3m": Spec(1, "3rd-order multistep DPM-Solver++ step on the flow-matching schedule"),
    "edm": Spec(2, "EDM's deterministic Heun on Karras sigmas"),
    "meanflow": Spec(1, "average-velocity (MeanFlow / shortcut) jumps", mean_flow=True),
    "perflow": Spec(1, "a PeRFlow student: Euler on its window path (N >= K steps)", windows=True),
}


MAX_STEPS = 1_000_000  # a step count beyond this is a typo, not a sampler setting


def parse_spec(spec: str, *, mean_flow: bool = False, windows: bool = False) -> tuple[str, int | None]:
    """``"euler:4"`` -> ("euler", 4); ``"dopri5"`` -> ("dopri5", None).  The library's one spec parser.

    ``mean_flow``: the model is an average-velocity model u(z, s, t) (MeanFlow, shortcut), sampled by ``meanflow:N``
    only; else a velocity model v(x, t), which every other spec samples.  ``windows``: the velocity model is a PeRFlow
    student (it has ``sampling_grid(N)``), which ``perflow:N`` samples too; no other model takes ``perflow:N``.

    Raises:
        ConfigError: an unknown name, a spec of the other kind of model, a missing or non-integer step count, too few
        or too many steps, or steps given to dopri5.
    """
    name, colon, steps = str(spec).partition(":")
    entry = SPECS.get(name)
    if entry is None:
        raise ConfigError(f"solver {spec!r}: unknown sampler {name!r}; choose one of {list(SPECS)} (e.g. euler:4, dopri5, dpm++2m:10)")
    if entry.mean_flow != mean_flow:
        raise ConfigError(f"solver {spec!r}: meanflow:N samples average-velocity models u(z, s, t) and the other samplers velocity models "
                          f"v(x, t); this one is {'an average-velocity' if mean_flow else 'a velocity'} model")
    if entry.windows and not windows:
        raise ConfigError(f"solver {spec!r}: perflow:N samples a PeRFlow student (a model with sampling_grid(N), e.g. rectflow.perflow.PeRFlowStudent); "
                          "this model is not one: use euler:N")
    if entry.min_steps is None:
        if colon:
            raise ConfigError(f"solver {spec!r}: {name} is adaptive and takes no step count (set rtol/atol)")
        return name, None
    if not steps.isascii() or not steps.isdigit():
        raise ConfigError(f"solver {spec!r}: write {name}:STEPS with an integer number of steps >= {entry.min_steps}")
    n = int(steps)
    if not entry.min_steps <= n <= MAX_STEPS:
        raise ConfigError(f"solver {spec!r}: {name} steps must be >= {entry.min_steps} (and at most {MAX_STEPS:,}), got {n}")
    return name, n


def spec_label(method: str, steps: int | None) -> str:
    """The spec string of (method, steps): the inverse of :func:`parse_spec`."""
    return method if steps is None else f"{method}:{steps}"


def _run(name: str, steps: int | None, f: Callable[..., Tensor], x: Tensor, *, trajectory: bool, rtol: float, atol: float,
         grid: Tensor | None) -> SolveResult:
    """One chunk through the sampler ``name`` with the (already guided) network ``f``; ``grid``: perflow's."""
    if name == "perflow":
        return euler(f, x, grid, return_trajectory=trajectory)
    if name == "meanflow":
        if trajectory:
            raise ConfigError("meanflow: trajectories are not recorded; use a flow spec (euler:N) for paths")
        return sample_mean_flow(f, x, steps)
    if name in ("dpm++2m", "dpm++3m"):
        solver = dpm_solver_pp_2m if name == "dpm++2m" else dpm_solver_pp_3m
        return solver(f, x, time_grid(steps), path=FlowMatchingSchedule(), parameterization="velocity", return_trajectory=trajectory)
    if name == "edm":
        path = FlowMatchingSchedule()
        grid = times_from_sigmas(path, karras_sigmas(steps - 1), append_data_end=True)
        start = float(path.coefficients(grid[:1]).b[0])
        return edm_heun(f, start * x, grid, path=path, parameterization="velocity", return_trajectory=trajectory)
    return solve(f, x, method=name, steps=steps, rtol=rtol, atol=atol, return_trajectory=trajectory)


def sample(
    model: nn.Module,
    x0: Tensor,
    spec: str = "euler:100",
    *,
    cond: Any = None,
    guidance: float = 1.0,
    null_cond: Any = NULL_LABEL,
    batch_size: int | None = None,
    trajectory: bool = False,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    mean_flow: bool = False,
) -> SolveResult:
    """Map source samples x0 (B, ...) at t = 0 to t = 1 with the sampler ``spec`` (see the module's table).

    Args:
        model: ``model(x, t)`` (B, ...) -> (B, ...), or ``model(x, t, cond)`` when ``cond`` is given; ``meanflow:N``
            takes ``model(x, s, t)``.
        cond: the batch's conditions (class labels (B,), text embeddings (B, L, D), or a tuple / dict of such), or None.
        guidance: classifier-free guidance scale w (needs ``cond``): out_null + w (out_cond - out_null); 1 = plain
            conditional; the network runs once on 2B rows and the NFE doubles.
        null_cond: what the network reads as "no condition" (class labels: ``NULL_LABEL``; text: the empty prompt's
            embedding).
        batch_size: solve in chunks of this many samples (bounds memory; results equal the unchunked solve).
        trajectory: also return the states at every grid time (K, B, ...) (not for ``dopri5`` over several chunks,
            nor ``meanflow``).
        rtol, atol: tolerances of ``dopri5``.
        mean_flow: ``model`` is an average-velocity model u(z, s, t), sampled by ``meanflow:N`` (see :func:`parse_spec`).
    Returns:
        :class:`SolveResult`: ``x`` (B, ...) without an autograd graph, ``nfe`` network evaluations per sample
        (guidance counted twice), the trajectory when asked for, and the time grid.
    Raises:
        ConfigError: a bad spec, guidance without ``cond``, or a batch size < 1.
        FloatingPointError: the samples are not finite.
    """
    name, steps = parse_spec(spec, mean_flow=mean_flow, windows=callable(getattr(model, "sampling_grid", None)))
    w = check_guidance_scale(guidance)
    b = x0.shape[0]
    if cond is None and w != 1.0:
        raise ConfigError(f"guidance scale {w} needs conditions (cond=...): an unconditional model has nothing to guide")
    if batch_size is not None:
        check_int(batch_size, "batch_size")
    chunked = batch_size is not None and batch_size < b
    if cond is not None and mean_flow:
        raise ConfigError("meanflow: conditional average-velocity models are not supported; sample them unconditionally")
    if cond is not None and condition_batch(cond) != b:
        raise ConfigError(f"cond has {condition_batch(cond)} rows for {b} samples: give one condition per sample")
    if trajectory and chunked and name == "dopri5":
        raise ConfigError("dopri5 with a trajectory cannot be batched (each chunk stops at its own times); drop batch_size or the trajectory")
    null = null_condition(cond, null_cond) if cond is not None and w != 1.0 else None  # full batch, split with cond; unused at w = 1
    grid = model.sampling_grid(steps) if name == "perflow" else None  # parse_spec checked that it has one

    def chunk_result(x: Tensor, c: Any, n: Any) -> SolveResult:
        f = model if c is None else (lambda z, t: guided_call(model, z, t, c, n, w))
        res = _run(name, steps, f, x, trajectory=trajectory, rtol=rtol, atol=atol, grid=grid)
        return res if c is None else res._replace(nfe=res.nfe * guidance_nfe(w))

    def rows(c: Any, i: int) -> Any:
        return None if c is None else map_condition(lambda part: part[i:i + batch_size], c)

    def run() -> SolveResult:
        if not chunked:
            return chunk_result(x0, cond, null)
        return concat_results([chunk_result(x0[i:i + batch_size], rows(cond, i), rows(null, i)) for i in range(0, b, batch_size)])

    return run_sampler(model, run, spec)

