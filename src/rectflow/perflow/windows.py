"""PeRFlow's time windows (theory §5.1): K windows 0 = t_0 < ... < t_K = 1, uniform in t, uniform in
the teacher's log-SNR, or given; and the piecewise-linear path the student follows inside them."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from rectflow.diffusion.schedules import log_snr, time_from_log_snr
from rectflow.errors import ConfigError
from rectflow.flow.paths import AffinePath, PathCoefficients, exact_dtype
from rectflow.flow.solvers import check_grid

__all__ = ['make_windows', 'validate_windows', 'window_index', 'WindowPath', 'window_grid', 'step_grid']


# ----------------------------------------------------------------------------------------- windows
def validate_windows(boundaries: Tensor | Sequence[float]) -> Tensor:
    """Check user boundaries: start at 0, end at 1, strictly increasing, >= 1 window -> float64 (K+1,)."""
    b = torch.as_tensor(boundaries, dtype=torch.float64).flatten()
    g = check_grid(b, name="perflow.windows: the boundaries", increasing=True, unit_interval=True)
    if abs(g[0]) > 1e-12 or abs(g[-1] - 1) > 1e-12:
        raise ConfigError(f"perflow.windows: boundaries must start at 0 and end at 1 (cover [0, 1]), got {g}")
    g[0], g[-1] = 0.0, 1.0
    return torch.tensor(g, dtype=torch.float64, device=b.device)


def make_windows(k: int | None = None, *, spacing: str = "time", path: AffinePath | None = None,
                 boundaries: Sequence[float] | Tensor | None = None, lam_min: float = -10.0,
                 lam_max: float = 10.0) -> Tensor:
    """K windows over rectflow t in [0, 1] as a float64 tensor of K + 1 boundaries.

    ``spacing="time"``: t_k = k / K.  ``spacing="log_snr"``: inner boundaries uniform in the log-SNR of
    ``path`` between max(lambda(0), lam_min) and min(lambda(1), lam_max) (the clip keeps infinite
    end points usable).  ``spacing="teacher"``: the teacher scheduler's own K-step grid, where its
    stock sampler steps (``path.sampling_grid(K)``: SD3's shifted grid; a path without one, e.g. the
    DDPM family whose trailing DDIM grid is uniform in t, gets k / K).  ``boundaries``: user-given
    (validated; ``k`` and ``spacing`` are ignored).
    """
    if boundaries is not None:
        return validate_windows(boundaries)
    if not isinstance(k, int) or k < 1:
        raise ConfigError(f"perflow.windows: K must be an integer >= 1, got {k!r}")
    if spacing == "teacher" and path is None:
        raise ConfigError("perflow.windows: spacing='teacher' needs the teacher's path")
    if spacing == "teacher" and hasattr(path, "sampling_grid"):
        return validate_windows(path.sampling_grid(k).double())
    if spacing in ("time", "teacher"):
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
    raise ConfigError(f"perflow.windows: spacing must be 'time', 'log_snr' or 'teacher', got {spacing!r}")


def window_index(boundaries: Tensor, t: Tensor) -> Tensor:
    """Window k (0-based) holding each t; a boundary t_k belongs to the window it starts, t = 1 to the last.

    The boundaries are first rounded to ``t``'s dtype, then searched exactly: a time is in window k when
    round(t_k) <= t < round(t_{k+1}).  So the float32 copy of t_k = 1/6 (1/6 - 7e-9) is t_k itself, as it must
    be for a fresh student to reproduce the teacher's DDIM on the window grid, and a bf16 time 20 % into a
    narrow window stays in it (a tolerance of a few ulps would be 0.06 in bf16, wider than such a window).
    """
    exact = exact_dtype(t.device)  # float64 where the device has it; float32 holds every half-precision value exactly
    dtype = t.dtype if t.is_floating_point() else exact
    b = boundaries.to(dtype).to(t.device, exact)  # rounded to t's dtype where the boundaries live, then moved
    k = torch.searchsorted(b, t.to(exact).contiguous(), right=True) - 1
    return k.clamp(0, boundaries.numel() - 2)


def window_grid(boundaries: Tensor, steps_per_window: int = 1) -> Tensor:
    """The sampling grid: each window split into ``steps_per_window`` equal steps (float64)."""
    if steps_per_window < 1:
        raise ConfigError(f"perflow: steps_per_window must be >= 1, got {steps_per_window}")
    b = boundaries.double()
    r = torch.arange(steps_per_window, dtype=torch.float64) / steps_per_window
    inner = (b[:-1, None] + r[None, :] * (b[1:] - b[:-1])[:, None]).flatten()
    return torch.cat([inner, b[-1:]])


def step_grid(boundaries: Tensor, n: int) -> Tensor:
    """n Euler steps over K windows (n >= K): window k gets n // K steps, plus one for k < n mod K (float64, n + 1 times)."""
    k = boundaries.numel() - 1
    if n < k:
        raise ConfigError(f"perflow: {n} inference steps are fewer than the {k} windows; use at least {k}")
    per = [n // k + (1 if i < n % k else 0) for i in range(k)]
    parts = [boundaries[i] + (boundaries[i + 1] - boundaries[i]) * torch.arange(m, dtype=torch.float64) / m for i, m in enumerate(per)]
    return torch.cat([*parts, boundaries[-1:].double()])


class WindowPath(AffinePath):
    """The piecewise-linear path of the student: A(t), B(t) interpolate the teacher's a, b linearly
    between window boundaries (see the docstring of :mod:`rectflow.perflow`); A' and B' are constant inside a window."""

    def __init__(self, teacher_path: AffinePath, boundaries: Tensor) -> None:
        self.teacher_path = teacher_path
        self.boundaries = validate_windows(boundaries)
        c = teacher_path.coefficients(self.boundaries)
        self.a_knots, self.b_knots = c.a.double(), c.b.double()

    @classmethod
    def from_knots(cls, boundaries: Tensor | Sequence[float], a_knots: Tensor | Sequence[float], b_knots: Tensor | Sequence[float]) -> "WindowPath":
        """The window path from its knots alone (the teacher's a, b at the boundaries): what an
        exported scheduler stores instead of the teacher's whole schedule."""
        path = cls.__new__(cls)
        path.teacher_path = None
        path.boundaries = validate_windows(boundaries)
        path.a_knots = torch.as_tensor(a_knots, dtype=torch.float64).flatten()
        path.b_knots = torch.as_tensor(b_knots, dtype=torch.float64).flatten()
        if path.a_knots.shape != path.boundaries.shape or path.b_knots.shape != path.boundaries.shape:
            raise ConfigError(f"perflow: {path.boundaries.numel()} boundaries need as many a and b knots, got {path.a_knots.numel()} and {path.b_knots.numel()}")
        return path

    def coefficients(self, t: Tensor) -> PathCoefficients:
        k = window_index(self.boundaries, t)
        dev, exact = t.device, exact_dtype(t.device)
        bounds, a_knots, b_knots = (v.to(dev, exact) for v in (self.boundaries, self.a_knots, self.b_knots))
        t0, t1 = bounds[k], bounds[k + 1]
        a0, a1 = a_knots[k], a_knots[k + 1]
        b0, b1 = b_knots[k], b_knots[k + 1]
        dt = t1 - t0
        da, db = (a1 - a0) / dt, (b1 - b0) / dt
        tau = t.to(exact) - t0
        out = (a0 + tau * da, b0 + tau * db, da, db)
        dtype = torch.float32 if t.dtype in (torch.float16, torch.bfloat16) else t.dtype  # a half t: coefficients still in float32
        return PathCoefficients(*(v.to(dtype) for v in out))

    def __repr__(self) -> str:
        return f"WindowPath(K={self.boundaries.numel() - 1}, teacher={self.teacher_path!r})"
