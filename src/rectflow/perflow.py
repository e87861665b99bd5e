"""PeRFlow: piecewise rectified flow that accelerates a pretrained diffusion or flow model (SPEC 5).

Rectflow time t: 0 = noise, 1 = data (diffusion time s = 1 - t, see :mod:`rectflow.schedules`).

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
  :class:`~rectflow.solvers.SolveResult` with the NFE.
"""

from __future__ import annotations

import copy

from pathlib import Path
from typing import Any, Callable, NamedTuple, Sequence

import torch
from torch import Tensor, nn

from .errors import ConfigError
from .io import load_tensors, save_tensors
from .losses import LossOutput, per_sample_mse
from .parameterizations import _check_kind, convert, to_x0_eps
from .paths import AffinePath, PathCoefficients, expand_like
from .schedules import log_snr, time_from_log_snr
from .solvers import SolveResult, euler

__all__ = [
    "make_windows",
    "validate_windows",
    "window_index",
    "WindowPath",
    "Teacher",
    "PeRFlowStudent",
    "PeRFlowBatch",
    "PeRFlowObjective",
    "PairsObjective",
    "straight_loss",
    "teacher_ddim_sample",
    "sample",
    "window_grid",
    "weight_delta",
    "save_delta",
    "load_delta",
    "apply_delta",
]


# ----------------------------------------------------------------------------------------- windows
def validate_windows(boundaries: Tensor | Sequence[float]) -> Tensor:
    """Check user boundaries: start at 0, end at 1, strictly increasing, >= 1 window -> float64 (K+1,)."""
    b = torch.as_tensor(boundaries, dtype=torch.float64).flatten()
    if b.numel() < 2:
        raise ConfigError(f"perflow.windows: need at least 2 boundaries (one window), got {b.tolist()}")
    if not bool(torch.isfinite(b).all()):
        raise ConfigError(f"perflow.windows: boundaries must be finite, got {b.tolist()}")
    if abs(float(b[0])) > 1e-12 or abs(float(b[-1]) - 1) > 1e-12:
        raise ConfigError(f"perflow.windows: boundaries must start at 0 and end at 1 (cover [0, 1]), got {b.tolist()}")
    if not bool((b[1:] > b[:-1]).all()):
        raise ConfigError(f"perflow.windows: boundaries must strictly increase, got {b.tolist()}")
    b[0], b[-1] = 0.0, 1.0
    return b


def make_windows(k: int | None = None, *, spacing: str = "time", path: AffinePath | None = None,
                 boundaries: Sequence[float] | Tensor | None = None, lam_min: float = -10.0,
                 lam_max: float = 10.0) -> Tensor:
    """K windows over rectflow t in [0, 1] as a float64 tensor of K + 1 boundaries.

    ``spacing="time"``: t_k = k / K.  ``spacing="log_snr"``: inner boundaries uniform in the log-SNR of
    ``path`` between max(lambda(0), lam_min) and min(lambda(1), lam_max) (the clip keeps infinite
    end points usable).  ``boundaries``: user-given (validated; ``k`` and ``spacing`` are ignored).
    """
    if boundaries is not None:
        return validate_windows(boundaries)
    if not isinstance(k, int) or k < 1:
        raise ConfigError(f"perflow.windows: K must be an integer >= 1, got {k!r}")
    if spacing == "time":
        return torch.linspace(0, 1, k + 1, dtype=torch.float64)
    if spacing == "log_snr":
        if path is None:
            raise ConfigError("perflow.windows: spacing='log_snr' needs the teacher's path")
        ends = log_snr(path, torch.tensor([0.0, 1.0], dtype=torch.float64))
        lo, hi = max(float(ends[0]), lam_min), min(float(ends[1]), lam_max)
        if not lo < hi:
            raise ConfigError(f"perflow.windows: empty log-SNR range [{lo}, {hi}]")
        lam = torch.linspace(lo, hi, k + 1, dtype=torch.float64)
        b = time_from_log_snr(path, lam).double()
        b[0], b[-1] = 0.0, 1.0
        return validate_windows(b)
    raise ConfigError(f"perflow.windows: spacing must be 'time' or 'log_snr', got {spacing!r}")


def window_index(boundaries: Tensor, t: Tensor) -> Tensor:
    """Window k (0-based) holding each t; a boundary t_k belongs to the window it starts, t = 1 to the last."""
    k = torch.searchsorted(boundaries.to(t.device, torch.float64), t.double().contiguous(), right=True) - 1
    return k.clamp(0, boundaries.numel() - 2)


def window_grid(boundaries: Tensor, steps_per_window: int = 1) -> Tensor:
    """The sampling grid: each window split into ``steps_per_window`` equal steps (float64)."""
    if steps_per_window < 1:
        raise ConfigError(f"perflow: steps_per_window must be >= 1, got {steps_per_window}")
    b = boundaries.double()
    r = torch.arange(steps_per_window, dtype=torch.float64) / steps_per_window
    inner = (b[:-1, None] + r[None, :] * (b[1:] - b[:-1])[:, None]).flatten()
    return torch.cat([inner, b[-1:]])


class WindowPath(AffinePath):
    """The piecewise-linear path of the student: A(t), B(t) interpolate the teacher's a, b linearly
    between window boundaries (see the module docstring); A' and B' are constant inside a window."""

    def __init__(self, teacher_path: AffinePath, boundaries: Tensor) -> None:
        self.teacher_path = teacher_path
        self.boundaries = validate_windows(boundaries)
        c = teacher_path.coefficients(self.boundaries)
        self.a_knots, self.b_knots = c.a.double(), c.b.double()

    def coefficients(self, t: Tensor) -> PathCoefficients:
        k = window_index(self.boundaries, t)
        dev = t.device
        t0, t1 = self.boundaries.to(dev)[k], self.boundaries.to(dev)[k + 1]
        a0, a1 = self.a_knots.to(dev)[k], self.a_knots.to(dev)[k + 1]
        b0, b1 = self.b_knots.to(dev)[k], self.b_knots.to(dev)[k + 1]
        dt = t1 - t0
        da, db = (a1 - a0) / dt, (b1 - b0) / dt
        tau = t.double() - t0
        out = (a0 + tau * da, b0 + tau * db, da, db)
        return PathCoefficients(*(v.to(t.dtype) for v in out))

    def __repr__(self) -> str:
        return f"WindowPath(K={self.boundaries.numel() - 1}, teacher={self.teacher_path!r})"


# ----------------------------------------------------------------------------------------- teacher
class Teacher:
    """A pretrained model as a prediction of kind ``parameterization`` on the affine ``path``.

    ``model(z, time_map(t))`` with z (B, ...), t (B,) rectflow time; ``time_map`` converts t into the
    model's own time input (e.g. ``DDPMSchedule.t_to_timestep``).  For a diffusers UNet use
    :func:`rectflow.diffusers_io.load_teacher`.
    """

    def __init__(self, model: Callable[..., Tensor], path: AffinePath, parameterization: str = "velocity",
                 *, time_map: Callable[[Tensor], Tensor] | None = None) -> None:
        _check_kind(parameterization)
        if not isinstance(path, AffinePath):
            raise ConfigError(f"perflow.Teacher: path must be an AffinePath (got {type(path).__name__})")
        self.model, self.path, self.parameterization, self.time_map = model, path, parameterization, time_map

    def raw(self, z: Tensor, t: Tensor) -> Tensor:
        """The model's own output at (z, t)."""
        return self.model(z, self.time_map(t) if self.time_map is not None else t)

    def x0_eps(self, z: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        return to_x0_eps(self.raw(z, t), self.parameterization, z, self.path, t)

    def velocity(self, z: Tensor, t: Tensor) -> Tensor:
        """dz/dt of the teacher's probability-flow ODE (a velocity field for the solvers)."""
        return convert(self.raw(z, t), src=self.parameterization, dst="velocity", z=z, path=self.path, t=t)

    @torch.no_grad()
    def ddim(self, z: Tensor, t_from: Tensor, t_to: Tensor, steps: int) -> Tensor:
        """Batched DDIM from per-example times t_from (B,) to t_to (B,) in ``steps`` equal steps."""
        for j in range(steps):
            t = t_from + (t_to - t_from) * (j / steps)
            t_next = t_from + (t_to - t_from) * ((j + 1) / steps)
            x0, eps = self.x0_eps(z, t.to(z.dtype))
            c = self.path.coefficients(t_next.to(z.dtype))
            z = expand_like(c.a, z) * x0 + expand_like(c.b, z) * eps  # SPEC 6: z' = alpha' x-hat + sigma' eps-hat
        return z


# ----------------------------------------------------------------------------------------- student
class PeRFlowStudent(nn.Module):
    """The student: ``net`` (initialised from the teacher's weights) predicting the teacher's kind on
    the :class:`WindowPath`; ``forward(z, t)`` returns the piecewise-straight velocity dz/dt."""

    def __init__(self, net: nn.Module, teacher_path: AffinePath, boundaries: Tensor, parameterization: str,
                 *, time_map: Callable[[Tensor], Tensor] | None = None) -> None:
        super().__init__()
        _check_kind(parameterization)
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


def sample(student: Callable[[Tensor, Tensor], Tensor], x: Tensor, boundaries: Tensor, steps_per_window: int = 1,
           *, return_trajectory: bool = False) -> SolveResult:
    """Euler with ``steps_per_window`` steps per window from noise x at t = 0; NFE = K * steps_per_window.
    With m = 1 and a :class:`PeRFlowStudent` this is one straight step per window (K-step generation)."""
    return euler(student, x, window_grid(boundaries, steps_per_window), return_trajectory=return_trajectory)


# ----------------------------------------------------------------------------------------- training
class PeRFlowBatch(NamedTuple):
    """``z``: points on the windows' straight lines; ``t`` (B,); ``target``: velocity (B, ...)."""

    z: Tensor
    t: Tensor
    target: Tensor


class PeRFlowObjective:
    """Piecewise reflow (SPEC 5) for :class:`rectflow.training.Trainer`.

    Args:
        teacher: the frozen :class:`Teacher`.
        data: ``sample(n, generator=, device=) -> x`` of real data (e.g. :class:`ImageDataset`).
        boundaries: window boundaries (from :func:`make_windows`).
        solver_steps: DDIM steps of the teacher across one window (its NFE per example).
        loss_space: "native" (MSE of the student's own output, e.g. eps, against the target converted
            on the window path), "velocity", or a kind ("x0", "eps", "v"); see :func:`straight_loss`.
        t_margin: keeps the training t inside [t_{k-1} + margin dt, t_k - margin dt).
        start_fraction: share of each batch placed exactly at its window's start (the rest uniform in
            the window, as in the paper).  One Euler step per window only reads the student there;
            the interior of a window asks for E[z_end - z_start | z_t], which a small network learns
            slowly and at the expense of the start, so K-step students train faster with a share
            here (0 = the paper's uniform t; use 0 when sampling with several steps per window).
    Each draw costs ``solver_steps`` teacher calls on the whole batch (``teacher_nfe`` counts them).
    """

    heavy_draw = False

    def __init__(self, teacher: Teacher, data: Any, boundaries: Tensor, *, solver_steps: int = 4,
                 loss_space: str = "native", t_margin: float = 1e-4, start_fraction: float = 0.0) -> None:
        if solver_steps < 1:
            raise ConfigError(f"perflow.solver_steps must be >= 1, got {solver_steps}")
        if not 0.0 <= start_fraction <= 1.0:
            raise ConfigError(f"perflow.start_fraction must lie in [0, 1], got {start_fraction}")
        self.start_fraction = float(start_fraction)
        _check_loss_space(loss_space)
        self.teacher, self.data, self.solver_steps = teacher, data, int(solver_steps)
        self.boundaries, self.loss_space, self.t_margin = validate_windows(boundaries), loss_space, float(t_margin)
        self.teacher_nfe = 0  # teacher evaluations per example, summed over draws

    @torch.no_grad()
    def draw(self, n: int, generator: torch.Generator, device) -> PeRFlowBatch:
        x = self.data.sample(n, generator=generator, device=device)
        gdev = generator.device
        eps = torch.randn(x.shape, generator=generator, device=gdev, dtype=x.dtype).to(x.device)
        k = torch.randint(0, self.boundaries.numel() - 1, (n,), generator=generator, device=gdev).to(x.device)
        u = torch.rand(n, generator=generator, device=gdev, dtype=torch.float64).to(x.device)
        b = self.boundaries.to(x.device)
        t0, t1 = b[k], b[k + 1]
        c0 = self.teacher.path.coefficients(t0.to(x.dtype))
        z0 = expand_like(c0.a, x) * x + expand_like(c0.b, x) * eps  # forward process to the window start
        z1 = self.teacher.ddim(z0, t0, t1, self.solver_steps)  # teacher ODE across this one window
        self.teacher_nfe += self.solver_steps * n
        dt = t1 - t0
        v = (z1 - z0) / expand_like(dt.to(x.dtype), x)
        tau = (self.t_margin + u * (1 - 2 * self.t_margin)) * dt
        if self.start_fraction > 0:
            at_start = torch.rand(n, generator=generator, device=gdev).to(x.device) < self.start_fraction
            tau = torch.where(at_start, torch.zeros_like(tau), tau)
        z = z0 + expand_like(tau.to(x.dtype), x) * v
        return PeRFlowBatch(z, (t0 + tau).to(x.dtype), v)

    def loss(self, model: nn.Module, batch: PeRFlowBatch) -> LossOutput:
        return straight_loss(model, batch, self.loss_space)


LOSS_SPACES = ("native", "velocity", "x0", "eps", "v")


def _check_loss_space(loss_space: str) -> None:
    if loss_space not in LOSS_SPACES:
        raise ConfigError(f"perflow.loss_space must be one of {list(LOSS_SPACES)}, got {loss_space!r}")


def straight_loss(model: nn.Module, batch: PeRFlowBatch, loss_space: str = "native") -> LossOutput:
    """MSE of a :class:`PeRFlowStudent` against straight-line velocity targets, compared in
    ``loss_space``: "native" (the student's own output kind), "velocity", or a kind ("x0", "eps",
    "v") that both sides are converted to on the window path.  The space is the loss weighting
    over t: "x0" keeps the window ends as easy as the teacher's denoising, while eps / v / velocity
    ask for the noise near the clean end of the last window, where it is hardly predictable."""
    _check_loss_space(loss_space)
    if isinstance(model, PeRFlowStudent) and loss_space != "velocity":
        dst = model.parameterization if loss_space == "native" else loss_space
        raw = model.raw(batch.z, batch.t)
        pred = raw if dst == model.parameterization else convert(raw, src=model.parameterization, dst=dst, z=batch.z, path=model.window_path, t=batch.t)
        target = convert(batch.target, src="velocity", dst=dst, z=batch.z, path=model.window_path, t=batch.t)
    else:
        pred, target = model(batch.z, batch.t), batch.target
    err = per_sample_mse(pred, target)
    return LossOutput(err.mean(), err.detach())


class PairsObjective:
    """Reflow on precomputed (noise-end, data-end) pairs (InstaFlow's 2-RF baseline): the straight line
    z_t = (1 - r) z_start + r z_end over the single window [t_0, t_1] = [0, 1] (use a K = 1 student)."""

    heavy_draw = False

    def __init__(self, z_start: Tensor, z_end: Tensor, *, loss_space: str = "native", t_margin: float = 1e-4) -> None:
        if z_start.shape != z_end.shape:
            raise ConfigError("perflow.PairsObjective: z_start and z_end must have the same shape")
        self.z_start, self.z_end, self.loss_space, self.t_margin = z_start, z_end, loss_space, float(t_margin)

    def draw(self, n: int, generator: torch.Generator, device) -> PeRFlowBatch:
        i = torch.randint(0, self.z_start.shape[0], (n,), generator=generator, device=generator.device).cpu()
        u = torch.rand(n, generator=generator, device=generator.device, dtype=torch.float64).cpu()
        z0, z1 = self.z_start[i].to(device), self.z_end[i].to(device)
        t = (self.t_margin + u * (1 - 2 * self.t_margin)).to(device)
        v = z1 - z0
        return PeRFlowBatch(z0 + expand_like(t.to(z0.dtype), z0) * v, t.to(z0.dtype), v)

    def loss(self, model: nn.Module, batch: PeRFlowBatch) -> LossOutput:
        return straight_loss(model, batch, self.loss_space)


# ----------------------------------------------------------------------------------------- deltas
def weight_delta(student: nn.Module, teacher: nn.Module) -> dict[str, Tensor]:
    """student - teacher for every floating tensor of the state dicts (same architecture required)."""
    s, t = student.state_dict(), teacher.state_dict()
    if s.keys() != t.keys():
        raise ConfigError("perflow.weight_delta: student and teacher have different parameter names")
    out = {}
    for name, v in s.items():
        if v.is_floating_point():
            if v.shape != t[name].shape:
                raise ConfigError(f"perflow.weight_delta: shape mismatch for {name}: {tuple(v.shape)} vs {tuple(t[name].shape)}")
            out[name] = (v - t[name]).detach().cpu().contiguous()
    return out


def save_delta(path: str | Path, student: nn.Module, teacher: nn.Module, boundaries: Tensor | None = None,
               metadata: dict[str, Any] | None = None) -> Path:
    """Write the weight change (safetensors) with the window boundaries in its metadata."""
    meta = dict(metadata or {})
    meta["format"] = "rectflow.perflow.delta"
    if boundaries is not None:
        meta["windows"] = [float(v) for v in boundaries]
    save_tensors(path, weight_delta(student, teacher), meta)
    return Path(path)


def load_delta(path: str | Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    return load_tensors(path)


def apply_delta(model: nn.Module, delta: dict[str, Tensor], scale: float = 1.0) -> nn.Module:
    """In place: w <- w + scale * delta for every tensor of ``delta`` (names must exist, shapes match)."""
    state = model.state_dict()
    missing = [k for k in delta if k not in state]
    if missing:
        raise ConfigError(f"perflow.apply_delta: the model lacks {len(missing)} delta tensors, e.g. {missing[0]!r}")
    with torch.no_grad():
        for name, d in delta.items():
            if state[name].shape != d.shape:
                raise ConfigError(f"perflow.apply_delta: shape mismatch for {name}: {tuple(state[name].shape)} vs {tuple(d.shape)}")
            state[name].add_(d.to(state[name].device, state[name].dtype), alpha=scale)
    return model


def teacher_ddim_sample(teacher: Teacher, x: Tensor, steps: int) -> SolveResult:
    """The teacher's own DDIM from t = 0 to 1 in ``steps`` uniform steps (the baseline; NFE = steps)."""
    from .samplers import ddim
    from .solvers import time_grid

    return ddim(teacher.raw, x, time_grid(steps), path=teacher.path, parameterization=teacher.parameterization)
