"""Noise schedules: diffusion paths z_s = alpha_s x + sigma_s eps as affine paths in rectflow time (theory §6.1-6.2).

Diffusion papers use a time s in [0, 1] with s = 0 data and s = 1 noise; rectflow uses t with
t = 0 source (noise eps = X0) and t = 1 target (data x = X1) (theory §1.2).  The two are related by
:func:`diffusion_time`, the one and only place where s and t meet: s = 1 - t (it is its own
inverse).  A schedule is written in diffusion time (``alpha(s)``, ``sigma(s)`` and their
s-derivatives) and *is* an :class:`~rectflow.flow.paths.AffinePath` in rectflow time:

    X_t = a(t) X1 + b(t) X0,   a(t) = alpha_{s(t)},  b(t) = sigma_{s(t)},
    a'(t) = -alpha'(s),  b'(t) = -sigma'(s),

so training and sampling share the same path object.  Methods named ``alpha``/``sigma``/
``alpha_ds``/``sigma_ds`` take diffusion time s; everything else takes rectflow time t.

log-SNR lambda = log(alpha^2 / sigma^2) increases with t (from -inf or lambda_min at the noise end
to +inf at the data end).  :func:`log_snr` and :func:`time_from_log_snr` work for any affine path
(closed forms where a schedule has one, bisection otherwise); sampler grids (uniform in lambda,
EDM/Karras sigmas, custom sigmas, SD3 time shifting) are built from them.
"""

from __future__ import annotations

import math
from abc import abstractmethod
from typing import Callable, Sequence

import torch
from torch import Tensor

from rectflow.flow.paths import AffinePath, LinearPath, PathCoefficients, exact_dtype

__all__ = [
    "diffusion_time",
    "NoiseSchedule",
    "FlowMatchingSchedule",
    "DiscreteFlowMatchingSchedule",
    "VPCosineSchedule",
    "VPLinearSchedule",
    "DDPMSchedule",
    "CustomSchedule",
    "RescaledSchedule",
    "variance_preserving",
    "log_snr",
    "log_snr_derivative",
    "time_from_log_snr",
    "shift_time",
    "flow_match_grid",
    "log_snr_grid",
    "karras_sigmas",
    "times_from_sigmas",
]

ScalarFn = Callable[[Tensor], Tensor]


def diffusion_time(t: Tensor | float) -> Tensor | float:
    """THE map between rectflow time t (0 source, 1 target) and diffusion time s (0 data, 1 noise):
    s = 1 - t (theory §6.1).  It is an involution, so it also maps s back to t."""
    return 1 - t


def _grad(fn: ScalarFn, s: Tensor) -> Tensor:
    """Elementwise derivative of an elementwise function by autograd (works under no_grad)."""
    with torch.enable_grad():
        x = s.detach().clone().requires_grad_(True)
        y = fn(x)
        (g,) = torch.autograd.grad(y.sum(), x, allow_unused=True)
    return torch.zeros_like(s) if g is None else g.detach()


def _bisect_increasing(fn: ScalarFn, target: Tensor, iters: int = 64) -> Tensor:
    """Solve fn(t) = target for t in [0, 1], fn increasing; float64; +-inf map to the end points."""
    tgt = target.to(exact_dtype(target.device))  # float64 where the device has it
    lo, hi = torch.zeros_like(tgt), torch.ones_like(tgt)
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        below = fn(mid) < tgt
        lo, hi = torch.where(below, mid, lo), torch.where(below, hi, mid)
    t = 0.5 * (lo + hi)
    t = torch.where(tgt == math.inf, torch.ones_like(t), t)
    return torch.where(tgt == -math.inf, torch.zeros_like(t), t)


class NoiseSchedule(AffinePath):
    """z_s = alpha_s x + sigma_s eps, written in diffusion time s, used as a path in rectflow time t.

    Subclasses implement ``alpha(s)`` and ``sigma(s)``; the s-derivatives default to autograd and
    ``t_from_log_snr`` to bisection (override both with closed forms where they exist).
    """

    @abstractmethod
    def alpha(self, s: Tensor) -> Tensor:
        """Signal scale alpha_s in diffusion time s."""

    @abstractmethod
    def sigma(self, s: Tensor) -> Tensor:
        """Noise scale sigma_s in diffusion time s."""

    def alpha_ds(self, s: Tensor) -> Tensor:
        """d alpha / ds."""
        return _grad(self.alpha, s)

    def sigma_ds(self, s: Tensor) -> Tensor:
        """d sigma / ds."""
        return _grad(self.sigma, s)

    def coefficients(self, t: Tensor) -> PathCoefficients:
        s = diffusion_time(t)
        # theory §6.1: a(t) = alpha_{1-t}, b(t) = sigma_{1-t}; the chain rule flips the derivatives' sign.
        return PathCoefficients(self.alpha(s), self.sigma(s), -self.alpha_ds(s), -self.sigma_ds(s))

    def log_snr(self, t: Tensor) -> Tensor:
        """lambda(t) = log(alpha^2 / sigma^2) at rectflow time t."""
        s = diffusion_time(t)
        return 2 * (torch.log(self.alpha(s)) - torch.log(self.sigma(s)))  # theory §6.2: lambda = log(alpha^2/sigma^2)

    def t_from_log_snr(self, lam: Tensor) -> Tensor:
        """The rectflow time t with lambda(t) = lam (bisection; lam beyond the range clamps to 0 or 1)."""
        return _bisect_increasing(self.log_snr, lam).to(lam.dtype)

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_") and isinstance(v, (int, float, str)))
        return f"{type(self).__name__}({fields})"


class FlowMatchingSchedule(NoiseSchedule):
    """alpha_s = 1 - s, sigma_s = s: the rectified-flow straight line X_t = t X1 + (1 - t) X0 (theory §6.1)."""

    def alpha(self, s: Tensor) -> Tensor:
        return 1 - s

    def sigma(self, s: Tensor) -> Tensor:
        return s

    def alpha_ds(self, s: Tensor) -> Tensor:
        return -torch.ones_like(s)

    def sigma_ds(self, s: Tensor) -> Tensor:
        return torch.ones_like(s)

    def log_snr(self, t: Tensor) -> Tensor:
        return 2 * (torch.log(t) - torch.log1p(-t))  # lambda = 2 logit(t)

    def t_from_log_snr(self, lam: Tensor) -> Tensor:
        return torch.sigmoid(lam / 2)


class DiscreteFlowMatchingSchedule(FlowMatchingSchedule):
    """The flow-matching line of a model trained the way diffusers' ``FlowMatchEulerDiscreteScheduler``
    describes it (Stable Diffusion 3): z_sigma = (1 - sigma) x + sigma eps with sigma = s = 1 - t, the
    network's output u = eps - x (``"u"``), its time input sigma N (theory §6.10).

    The path IS :class:`FlowMatchingSchedule`'s: ``num_train_timesteps`` N and ``shift`` change no
    coefficient.  N fixes the network's time input (:meth:`t_to_timestep`); ``shift`` only says which
    times the stock K-step sampler visits (:meth:`sampling_grid`), a warp of the sampling grid and
    not of the path.
    """

    def __init__(self, num_train_timesteps: int = 1000, shift: float = 1.0) -> None:
        if int(num_train_timesteps) < 1 or not float(shift) > 0:
            raise ValueError(f"DiscreteFlowMatchingSchedule: need num_train_timesteps >= 1 and shift > 0, got {num_train_timesteps}, {shift}")
        self.num_steps, self.shift = int(num_train_timesteps), float(shift)

    def t_to_timestep(self, t: Tensor) -> Tensor:
        """The network's time input sigma N at rectflow time t (sigma = 1 - t; diffusers passes ``timestep = sigma * N``)."""
        return diffusion_time(t) * self.num_steps

    def timestep_to_t(self, timestep: Tensor) -> Tensor:
        """Rectflow time of a time input sigma N: t = 1 - timestep / N."""
        return diffusion_time(timestep / self.num_steps)

    def sampling_grid(self, steps: int) -> Tensor:
        """The stock scheduler's ``steps``-step grid in rectflow time: :func:`flow_match_grid` with this shift and N."""
        return flow_match_grid(steps, self.shift, self.num_steps)

    def __repr__(self) -> str:
        return f"DiscreteFlowMatchingSchedule(num_train_timesteps={self.num_steps}, shift={self.shift:g})"


class VPCosineSchedule(NoiseSchedule):
    """Variance preserving, alpha_s = cos(pi s / 2), sigma_s = sin(pi s / 2) (theory §6.1)."""

    def alpha(self, s: Tensor) -> Tensor:
        return torch.cos(0.5 * math.pi * s)

    def sigma(self, s: Tensor) -> Tensor:
        return torch.sin(0.5 * math.pi * s)

    def alpha_ds(self, s: Tensor) -> Tensor:
        return -0.5 * math.pi * torch.sin(0.5 * math.pi * s)

    def sigma_ds(self, s: Tensor) -> Tensor:
        return 0.5 * math.pi * torch.cos(0.5 * math.pi * s)

    def log_snr(self, t: Tensor) -> Tensor:
        return -2 * torch.log(torch.tan(0.5 * math.pi * diffusion_time(t)))  # lambda = -2 log tan(pi s / 2)

    def t_from_log_snr(self, lam: Tensor) -> Tensor:
        return diffusion_time(torch.atan(torch.exp(-lam / 2)) * (2 / math.pi))


class VPLinearSchedule(NoiseSchedule):
    """Continuous VP with linear beta(s) = beta_min + s (beta_max - beta_min) (Song et al. 2021):
    alpha_s^2 = exp(-B(s)), B(s) = beta_min s + (beta_max - beta_min) s^2 / 2, sigma_s^2 = 1 - alpha_s^2."""

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0) -> None:
        if not 0 < beta_min <= beta_max:
            raise ValueError(f"VPLinearSchedule: need 0 < beta_min <= beta_max, got {beta_min}, {beta_max}")
        self.beta_min, self.beta_max = float(beta_min), float(beta_max)

    def _big_b(self, s: Tensor) -> Tensor:
        return self.beta_min * s + 0.5 * (self.beta_max - self.beta_min) * s * s

    def alpha(self, s: Tensor) -> Tensor:
        return torch.exp(-0.5 * self._big_b(s))

    def sigma(self, s: Tensor) -> Tensor:
        return torch.sqrt(-torch.expm1(-self._big_b(s)))

    def alpha_ds(self, s: Tensor) -> Tensor:
        return -0.5 * (self.beta_min + (self.beta_max - self.beta_min) * s) * self.alpha(s)

    def sigma_ds(self, s: Tensor) -> Tensor:
        return -self.alpha(s) * self.alpha_ds(s) / self.sigma(s)  # from alpha^2 + sigma^2 = 1

    def log_snr(self, t: Tensor) -> Tensor:
        return -torch.log(torch.expm1(self._big_b(diffusion_time(t))))  # lambda = -log(e^B - 1)

    def t_from_log_snr(self, lam: Tensor) -> Tensor:
        big_b = torch.nn.functional.softplus(-lam)  # B = log(1 + e^-lambda)
        d = self.beta_max - self.beta_min
        s = big_b / self.beta_min if d == 0 else (torch.sqrt(self.beta_min**2 + 2 * d * big_b) - self.beta_min) / d
        return diffusion_time(s.clamp(0, 1))


class DDPMSchedule(NoiseSchedule):
    """DDPM's discrete schedule: alphas_cumprod[n] = prod_{k<=n} (1 - beta_k) is the noise level of
    training step n = 0 .. N-1, placed at s = (n + 1) / N (and alpha = 1 at s = 0).  Between knots
    log(alphas_cumprod) is interpolated linearly in s, so the path is continuous in t.

    ``betas`` defaults to DDPM's ``linear`` schedule (1e-4 .. 0.02, N = 1000); ``scaled_linear`` is
    Stable Diffusion's (sqrt-linear 0.00085 .. 0.012); or pass the betas of any discrete model.
    """

    def __init__(self, betas: Tensor | Sequence[float] | None = None, *, num_steps: int = 1000,
                 beta_schedule: str = "linear", beta_start: float = 1e-4, beta_end: float = 0.02) -> None:
        if betas is None:
            if beta_schedule == "linear":
                betas = torch.linspace(beta_start, beta_end, num_steps, dtype=torch.float64)
            elif beta_schedule == "scaled_linear":
                betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_steps, dtype=torch.float64) ** 2
            else:
                raise ValueError(f"DDPMSchedule: unknown beta_schedule {beta_schedule!r}; use 'linear' or 'scaled_linear'")
        betas = torch.as_tensor(betas, dtype=torch.float64).flatten()
        if betas.numel() < 1 or not bool(((betas > 0) & (betas < 1)).all()):
            raise ValueError("DDPMSchedule: betas must be a non-empty sequence in (0, 1)")
        self.betas = betas
        self.num_steps = betas.numel()
        self.alphas_cumprod = torch.cumprod(1 - betas, 0)
        self._log_abar = torch.cat([torch.zeros(1, dtype=torch.float64), torch.log(self.alphas_cumprod)])

    def _interp(self, s: Tensor) -> tuple[Tensor, Tensor]:
        """log(alphabar) at s and its s-derivative (piecewise linear between knots s = n / N)."""
        exact = exact_dtype(s.device)  # float64 where the device has it
        knots = self._log_abar.to(s.device, exact)
        pos = (s.to(exact) * self.num_steps).clamp(0, self.num_steps)
        i = pos.floor().clamp(max=self.num_steps - 1).long()
        slope = knots[i + 1] - knots[i]
        return (knots[i] + (pos - i) * slope).to(s.dtype), (slope * self.num_steps).to(s.dtype)

    def alpha(self, s: Tensor) -> Tensor:
        return torch.exp(0.5 * self._interp(s)[0])

    def sigma(self, s: Tensor) -> Tensor:
        return torch.sqrt(-torch.expm1(self._interp(s)[0]))

    def alpha_ds(self, s: Tensor) -> Tensor:
        log_abar, slope = self._interp(s)
        return 0.5 * slope * torch.exp(0.5 * log_abar)

    def sigma_ds(self, s: Tensor) -> Tensor:
        return -self.alpha(s) * self.alpha_ds(s) / self.sigma(s)  # from alpha^2 + sigma^2 = 1

    def log_snr(self, t: Tensor) -> Tensor:
        log_abar = self._interp(diffusion_time(t))[0]
        return log_abar - torch.log(-torch.expm1(log_abar))  # lambda = log(abar / (1 - abar))

    def t_from_log_snr(self, lam: Tensor) -> Tensor:
        target = -torch.nn.functional.softplus(-lam.to(exact_dtype(lam.device)))  # log(abar) = log sigmoid(lambda)
        neg = -self._log_abar.to(lam.device, target.dtype)  # increasing in s
        j = torch.searchsorted(neg, (-target).contiguous()).clamp(1, self.num_steps)
        lo, hi = neg[j - 1], neg[j]
        s = (j - 1 + ((-target) - lo) / (hi - lo)) / self.num_steps
        return diffusion_time(s.clamp(0, 1)).to(lam.dtype)

    def timestep_to_t(self, n: Tensor) -> Tensor:
        """Rectflow time of discrete training step n (0 .. N-1): s = (n + 1) / N."""
        return diffusion_time((n + 1) / self.num_steps)

    def t_to_timestep(self, t: Tensor) -> Tensor:
        """Continuous DDPM step index n = N s - 1 for rectflow time t (a model's time input)."""
        return diffusion_time(t) * self.num_steps - 1

    def __repr__(self) -> str:
        return f"DDPMSchedule(num_steps={self.num_steps}, beta=[{float(self.betas[0]):.3g} .. {float(self.betas[-1]):.3g}])"


class CustomSchedule(NoiseSchedule):
    """A user-supplied pair alpha(s), sigma(s) of elementwise torch functions of diffusion time s.

    Derivatives come from autograd unless given.  The pair is checked on a grid: finite,
    alpha, sigma >= 0, and log-SNR strictly decreasing in s (needed by every sampler).
    """

    def __init__(self, alpha: ScalarFn, sigma: ScalarFn, *, alpha_ds: ScalarFn | None = None,
                 sigma_ds: ScalarFn | None = None, name: str = "custom", check: bool = True) -> None:
        self._alpha, self._sigma, self._alpha_ds, self._sigma_ds = alpha, sigma, alpha_ds, sigma_ds
        self.name = name
        if check:
            s = torch.linspace(0, 1, 257, dtype=torch.float64)
            a, b = self.alpha(s), self.sigma(s)
            if not (torch.isfinite(a).all() and torch.isfinite(b).all() and (a >= 0).all() and (b >= 0).all()):
                raise ValueError(f"{name}: alpha(s) and sigma(s) must be finite and >= 0 on [0, 1]")
            lam = 2 * (torch.log(a) - torch.log(b))
            if not bool((lam[1:] < lam[:-1]).all()):
                raise ValueError(f"{name}: log-SNR log(alpha^2/sigma^2) must decrease strictly in s (noise grows with s)")

    def alpha(self, s: Tensor) -> Tensor:
        return self._alpha(s)

    def sigma(self, s: Tensor) -> Tensor:
        return self._sigma(s)

    def alpha_ds(self, s: Tensor) -> Tensor:
        return self._alpha_ds(s) if self._alpha_ds is not None else _grad(self._alpha, s)

    def sigma_ds(self, s: Tensor) -> Tensor:
        return self._sigma_ds(s) if self._sigma_ds is not None else _grad(self._sigma, s)


class RescaledSchedule(NoiseSchedule):
    """(alpha, sigma) -> (c_s alpha_s, c_s sigma_s) for a positive c(s): same log-SNR, other z scale (theory §6.4)."""

    def __init__(self, base: NoiseSchedule, scale: ScalarFn, scale_ds: ScalarFn | None = None) -> None:
        self.base, self.scale, self._scale_ds = base, scale, scale_ds

    def _c(self, s: Tensor) -> tuple[Tensor, Tensor]:
        return self.scale(s), (self._scale_ds(s) if self._scale_ds is not None else _grad(self.scale, s))

    def alpha(self, s: Tensor) -> Tensor:
        return self.scale(s) * self.base.alpha(s)

    def sigma(self, s: Tensor) -> Tensor:
        return self.scale(s) * self.base.sigma(s)

    def alpha_ds(self, s: Tensor) -> Tensor:
        c, dc = self._c(s)
        return dc * self.base.alpha(s) + c * self.base.alpha_ds(s)

    def sigma_ds(self, s: Tensor) -> Tensor:
        c, dc = self._c(s)
        return dc * self.base.sigma(s) + c * self.base.sigma_ds(s)

    def log_snr(self, t: Tensor) -> Tensor:
        return self.base.log_snr(t)

    def t_from_log_snr(self, lam: Tensor) -> Tensor:
        return self.base.t_from_log_snr(lam)

    def __repr__(self) -> str:
        return f"RescaledSchedule({self.base!r})"


def variance_preserving(base: NoiseSchedule) -> RescaledSchedule:
    """The VP schedule with the same log-SNR: c_s = 1 / sqrt(alpha_s^2 + sigma_s^2) (e.g. FM -> VP)."""
    def scale(s: Tensor) -> Tensor:
        return torch.rsqrt(base.alpha(s) ** 2 + base.sigma(s) ** 2)

    def scale_ds(s: Tensor) -> Tensor:  # d/ds (a^2 + b^2)^(-1/2) = -(a a' + b b') c^3
        return -(base.alpha(s) * base.alpha_ds(s) + base.sigma(s) * base.sigma_ds(s)) * scale(s) ** 3

    return RescaledSchedule(base, scale, scale_ds)


def _as_schedule(path: AffinePath) -> AffinePath:
    return FlowMatchingSchedule() if isinstance(path, LinearPath) else path


def log_snr(path: AffinePath, t: Tensor) -> Tensor:
    """lambda(t) = log(a(t)^2 / b(t)^2) for any affine path (closed form when the schedule has one)."""
    path = _as_schedule(path)
    if isinstance(path, NoiseSchedule):
        return path.log_snr(t)
    c = path.coefficients(t)
    return 2 * (torch.log(c.a.abs()) - torch.log(c.b.abs()))


def log_snr_derivative(path: AffinePath, t: Tensor) -> Tensor:
    """d lambda / dt = 2 (a'/a - b'/b) (> 0: the SNR grows towards the data)."""
    c = path.coefficients(t)
    return 2 * (c.da / c.a - c.db / c.b)


def time_from_log_snr(path: AffinePath, lam: Tensor) -> Tensor:
    """Inverse of :func:`log_snr`: the t in [0, 1] with lambda(t) = lam (+inf -> 1, -inf -> 0)."""
    lam = torch.as_tensor(lam)
    path = _as_schedule(path)
    if isinstance(path, NoiseSchedule):
        t = path.t_from_log_snr(lam)
    else:
        t = _bisect_increasing(lambda u: log_snr(path, u), lam).to(lam.dtype)
    t = torch.where(lam == math.inf, torch.ones_like(t), t)
    return torch.where(lam == -math.inf, torch.zeros_like(t), t)


def shift_time(t: Tensor, shift: float, path: AffinePath | None = None) -> Tensor:
    """SD3 time shifting: the time whose SNR is SNR(t) / shift^2 (shift > 1 spends more steps at high noise).

    On the flow-matching path this is SD3's s' = shift s / (1 + (shift - 1) s) in diffusion time;
    on any other schedule it is the same shift of log-SNR, lambda' = lambda - 2 log(shift).
    The end points t = 0 and t = 1 stay fixed.
    """
    if not shift > 0:
        raise ValueError(f"shift must be > 0, got {shift}")
    path = path if path is not None else FlowMatchingSchedule()
    t = torch.as_tensor(t)
    return time_from_log_snr(path, log_snr(path, t) - 2 * math.log(shift))


def flow_match_grid(steps: int, shift: float = 1.0, num_train_timesteps: int = 1000) -> Tensor:
    """The times diffusers' ``FlowMatchEulerDiscreteScheduler`` (static ``shift``) visits in ``steps``
    steps, as an increasing float64 grid of ``steps`` + 1 rectflow times from 0 to 1 (theory §6.10).

    Unshifted noise levels u_j run linearly from 1 to sigma_min, j = 0 .. steps - 1, where sigma_min
    is the scheduler's smallest training level 1 / N already shifted; each is shifted
    (:func:`shift_time`: sigma' = shift u / (1 + (shift - 1) u)) and the data end sigma = 0 is
    appended.  So the smallest level is shifted twice, as the stock scheduler does it.
    """
    if steps < 1:
        raise ValueError(f"flow_match_grid: need steps >= 1, got {steps}")
    sigma_min = diffusion_time(shift_time(torch.tensor([1 - 1 / num_train_timesteps], dtype=torch.float64), shift))
    u = torch.linspace(1.0, float(sigma_min[0]), steps, dtype=torch.float64)  # unshifted sigmas, noise end first
    t = shift_time(diffusion_time(u), shift)
    t[0] = 0.0  # u = 1 is pure noise at any shift
    return torch.cat([t, torch.ones(1, dtype=torch.float64)])


def log_snr_grid(path: AffinePath, steps: int, lam_min: float, lam_max: float) -> Tensor:
    """A float64 grid of ``steps`` intervals uniform in log-SNR from lam_min (noise) to lam_max (data)."""
    if steps < 1 or not lam_min < lam_max:
        raise ValueError(f"log_snr_grid: need steps >= 1 and lam_min < lam_max, got {steps}, {lam_min}, {lam_max}")
    return time_from_log_snr(path, torch.linspace(lam_min, lam_max, steps + 1, dtype=torch.float64))


def karras_sigmas(steps: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0) -> Tensor:
    """EDM's decreasing noise levels (sigma = sigma_s / alpha_s), ``steps`` + 1 of them, rho-spaced."""
    if steps < 1 or not 0 < sigma_min < sigma_max:
        raise ValueError(f"karras_sigmas: need steps >= 1 and 0 < sigma_min < sigma_max, got {steps}, {sigma_min}, {sigma_max}")
    r = torch.linspace(0, 1, steps + 1, dtype=torch.float64)
    return (sigma_max ** (1 / rho) + r * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho


def times_from_sigmas(path: AffinePath, sigmas: Tensor | Sequence[float], *, kind: str = "edm",
                      append_data_end: bool = False) -> Tensor:
    """Convert a custom noise-level grid into a rectflow time grid for the samplers.

    ``kind="edm"``: sigma = sigma_s / alpha_s (the EDM / variance-exploding noise level, any schedule);
    ``kind="schedule"``: sigma is the path's own sigma_s = b(t) (e.g. the flow-matching sigmas of SD3's
    scheduler, where t = 1 - sigma).  ``append_data_end`` adds t = 1 (sigma = 0) at the end.
    """
    sig = torch.as_tensor(sigmas, dtype=torch.float64).flatten()
    if (sig < 0).any():
        raise ValueError("times_from_sigmas: noise levels must be >= 0")
    if kind == "edm":
        t = time_from_log_snr(path, -2 * torch.log(sig))  # theory §6.2: sigma/alpha = exp(-lambda / 2)
    elif kind == "schedule":
        # b(t) decreases in t for any schedule with increasing log-SNR we ship; solve b(t) = sigma.
        t = _bisect_increasing(lambda u: -path.coefficients(u).b, -sig)
    else:
        raise ValueError(f"times_from_sigmas: kind must be 'edm' or 'schedule', got {kind!r}")
    return torch.cat([t, torch.ones(1, dtype=t.dtype)]) if append_data_end else t
