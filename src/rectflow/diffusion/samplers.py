"""Diffusion-style samplers for any affine path and any parameterisation (theory §6.4-6.9).

Every sampler is a pure function ``sampler(model, x, grid, *, path, parameterization, ...)`` where
``model(z, t)`` (z (B, ...), t (B,)) predicts ``parameterization`` (eps, x0, v, velocity, u; see
:mod:`rectflow.diffusion.parameterizations`), ``x`` is the state at ``grid[0]`` and ``grid`` is a rectflow time
grid (t = 0 noise, t = 1 data; build one with :func:`rectflow.flow.solvers.time_grid` or the helpers of
:mod:`rectflow.diffusion.schedules`: shifted, uniform in log-SNR, EDM/custom sigmas).  Each returns a
:class:`~rectflow.flow.solvers.SolveResult` with the final state, the NFE (model calls) and optionally
the trajectory.  Stochastic samplers draw all their noise from the explicit ``generator``.

* :func:`ddim`: z' = a(t') x-hat + b(t') eps-hat, deterministic; on the flow-matching path it *is*
  Euler (theory §6.4), and it is invariant to rescaling the schedule.
* :func:`euler_eta`: Euler on z-tilde = z / alpha against eta = sigma / alpha, dz-tilde/d eta = eps-hat
  (equal to DDIM step by step).
* :func:`ddpm`: ancestral sampling from the forward process's posterior q(z_t' | z_t, x = x-hat).
* :func:`churn`: DDIM step overshooting in log-SNR by a fraction ``churn`` of the step, then
  re-noising back; churn = 0 is DDIM, churn = 1 is DDPM (theory §6.6).
* :func:`flow_sde`: Euler-Maruyama on dZ = [v + e(t) score] dt + sqrt(2 e(t)) dW, the score coming from
  the velocity (Gaussian source), with a noise-level schedule e(t) >= 0; e = 0 is the flow ODE.
* :func:`dpm_solver_pp_2m`, :func:`dpm_solver_pp_3m`: DPM-Solver++(2M) / (3M), the multistep
  data-prediction solvers, one model call per step (theory §6.9).
* :func:`edm_heun`: EDM's Heun sampler in sigma = b / a with its optional stochastic churn; use it on
  Karras sigmas (:func:`~rectflow.diffusion.schedules.karras_sigmas` + ``times_from_sigmas``); NFE = 2 N - 1.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor

from rectflow.diffusion.parameterizations import SingularConversionError, to_x0_eps
from rectflow.diffusion.schedules import log_snr, log_snr_derivative, time_from_log_snr
from rectflow.draws import randn
from rectflow.flow.paths import AffinePath
from rectflow.flow.solvers import SolveResult, Trajectory, check_grid, time_vector

__all__ = [
    "Model",
    "NoiseLevel",
    "predict_x0_eps",
    "ddim_step",
    "posterior",
    "renoise",
    "ddim",
    "euler_eta",
    "ddpm",
    "churn",
    "flow_sde",
    "natural_noise_level",
    "sigma_noise_level",
    "dpm_solver_pp_2m",
    "dpm_solver_pp_3m",
    "edm_heun",
]

Model = Callable[[Tensor, Tensor], Tensor]
NoiseLevel = Callable[[float], float]
"""e(t) >= 0, the stochastic-interpolant noise level of :func:`flow_sde`."""


def _coef(path: AffinePath, t: float) -> tuple[float, float, float, float]:
    """a(t), b(t), a'(t), b'(t) as Python floats (evaluated in float64)."""
    c = path.coefficients(torch.tensor([t], dtype=torch.float64))
    return float(c.a[0]), float(c.b[0]), float(c.da[0]), float(c.db[0])


def _randn(like: Tensor, generator: torch.Generator | None) -> Tensor:
    return randn(like.shape, generator=generator, device=like.device, dtype=like.dtype, draw_on=like.device)


def _lam(path: AffinePath, t: float) -> float:
    return float(log_snr(path, torch.tensor([t], dtype=torch.float64))[0])


def predict_x0_eps(model: Model, z: Tensor, t: float, path: AffinePath, parameterization: str) -> tuple[Tensor, Tensor]:
    """One model call at time t, converted to (x-hat, eps-hat)."""
    tv = time_vector(z, t)
    return to_x0_eps(model(z, tv), parameterization, z, path, tv)


def ddim_step(x0: Tensor, eps: Tensor, t_next: float, path: AffinePath) -> Tensor:
    """DDIM: z' = alpha(t') x-hat + sigma(t') eps-hat (theory §6.4)."""
    a, b, _, _ = _coef(path, t_next)
    return a * x0 + b * eps if b != 0 else a * x0


def posterior(z: Tensor, x0: Tensor, t: float, t_next: float, path: AffinePath) -> tuple[Tensor, float]:
    """Mean and std of q(z_t' | z_t, x = x0) for t < t' (t' less noisy), the DDPM reverse step.

    Forward kernel from t' to t: z_t = (a/a') z_t' + sqrt(b^2 - (a/a')^2 b'^2) noise.
    """
    a, b, _, _ = _coef(path, t)
    a_n, b_n, _, _ = _coef(path, t_next)
    if not (t_next > t and a_n > 0 and b > 0):
        raise SingularConversionError(f"posterior: needs t < t' with alpha(t') > 0 and sigma(t) > 0, got t={t}, t'={t_next}")
    ratio = a / a_n
    var_kernel = max(b * b - ratio * ratio * b_n * b_n, 0.0)
    mean = (ratio * b_n * b_n / (b * b)) * z + (a_n * var_kernel / (b * b)) * x0
    return mean, math.sqrt(var_kernel) * b_n / b


def renoise(z: Tensor, t_from: float, t_to: float, path: AffinePath, noise: Tensor) -> Tensor:
    """Forward process from t_from to the noisier t_to <= t_from: z' = (a_to/a_from) z + sqrt(b_to^2 - (a_to/a_from)^2 b_from^2) noise."""
    a_f, b_f, _, _ = _coef(path, t_from)
    a_t, b_t, _, _ = _coef(path, t_to)
    if not (t_to <= t_from and a_f > 0):
        raise SingularConversionError(f"renoise: needs t_to <= t_from and alpha(t_from) > 0, got {t_from} -> {t_to}")
    ratio = a_t / a_f
    return ratio * z + math.sqrt(max(b_t * b_t - ratio * ratio * b_f * b_f, 0.0)) * noise


def _run(step: Callable[[Tensor, float, float], Tensor], x: Tensor, g: list[float], trajectory: bool) -> SolveResult:
    traj = Trajectory(x, g[0], trajectory)
    for t, t_next in zip(g, g[1:]):
        x = step(x, t, t_next)
        traj.add(x, t_next)
    return traj.result(x, len(g) - 1, g)


def ddim(model: Model, x: Tensor, grid, *, path: AffinePath, parameterization: str = "velocity",
         return_trajectory: bool = False) -> SolveResult:
    """Deterministic DDIM along ``grid`` (increasing: sampling; decreasing: DDIM inversion). NFE = steps."""
    g = check_grid(grid, name="ddim: the time grid", increasing=False, unit_interval=True)

    def step(z: Tensor, t: float, t_next: float) -> Tensor:
        x0, eps = predict_x0_eps(model, z, t, path, parameterization)
        return ddim_step(x0, eps, t_next, path)

    return _run(step, x, g, return_trajectory)


def euler_eta(model: Model, x: Tensor, grid, *, path: AffinePath, parameterization: str = "velocity",
              return_trajectory: bool = False) -> SolveResult:
    """Euler in (z-tilde, eta): z-tilde = z / alpha, eta = sigma / alpha, d z-tilde / d eta = eps-hat (theory §6.4).

    The same map as :func:`ddim`, written as the Euler method of the ODE in these variables; needs alpha > 0
    at every grid point but the last.
    """
    g = check_grid(grid, name="euler_eta: the time grid", increasing=False, unit_interval=True)

    def step(z: Tensor, t: float, t_next: float) -> Tensor:
        a, b, _, _ = _coef(path, t)
        a_n, b_n, _, _ = _coef(path, t_next)
        if a <= 0 or a_n <= 0:
            raise SingularConversionError(f"euler_eta: alpha must be > 0 on the grid (eta = sigma/alpha), got alpha = {min(a, a_n)} near t = {t}")
        _, eps = predict_x0_eps(model, z, t, path, parameterization)
        z_tilde = z / a + (b_n / a_n - b / a) * eps  # Euler: z~' = z~ + (eta' - eta) eps-hat
        return a_n * z_tilde

    return _run(step, x, g, return_trajectory)


def ddpm(model: Model, x: Tensor, grid, *, path: AffinePath, parameterization: str = "velocity",
         generator: torch.Generator | None = None, return_trajectory: bool = False) -> SolveResult:
    """Ancestral DDPM: z' ~ q(z_t' | z_t, x = x-hat(z_t)) at each step (no noise on the step to sigma = 0)."""
    g = check_grid(grid, name="ddpm: the time grid", increasing=True, unit_interval=True)

    def step(z: Tensor, t: float, t_next: float) -> Tensor:
        x0, _ = predict_x0_eps(model, z, t, path, parameterization)
        mean, std = posterior(z, x0, t, t_next, path)
        return mean + std * _randn(z, generator) if _coef(path, t_next)[1] > 0 else mean

    return _run(step, x, g, return_trajectory)


def churn(model: Model, x: Tensor, grid, *, path: AffinePath, parameterization: str = "velocity",
          churn: float = 0.5, generator: torch.Generator | None = None, return_trajectory: bool = False) -> SolveResult:
    """DDIM step from lambda to lambda' + churn (lambda' - lambda), then re-noise back to lambda' (theory §6.6).

    churn = 0 is DDIM, churn = 1 is DDPM (same noise draws as :func:`ddpm`); any churn >= 0 is a valid
    sampler: it only moves weight from early to late predictions.  The step to sigma = 0 is plain DDIM.
    """
    if not churn >= 0:
        raise ValueError(f"churn must be >= 0, got {churn}")
    g = check_grid(grid, name="churn: the time grid", increasing=True, unit_interval=True)

    def step(z: Tensor, t: float, t_next: float) -> Tensor:
        x0, eps = predict_x0_eps(model, z, t, path, parameterization)
        lam, lam_next = _lam(path, t), _lam(path, t_next)
        if churn == 0 or not math.isfinite(lam_next) or _coef(path, t_next)[1] <= 0:
            return ddim_step(x0, eps, t_next, path)
        lam_far = lam_next + churn * (lam_next - lam)
        t_far = float(time_from_log_snr(path, torch.tensor([lam_far], dtype=torch.float64))[0])
        t_far = max(t_far, t_next)  # guard against round-off in the inverse
        return renoise(ddim_step(x0, eps, t_far, path), t_far, t_next, path, _randn(z, generator))

    return _run(step, x, g, return_trajectory)


def flow_sde(model: Model, x: Tensor, grid, *, path: AffinePath, noise_level: float | NoiseLevel,
             parameterization: str = "velocity", generator: torch.Generator | None = None,
             return_trajectory: bool = False) -> SolveResult:
    """Euler-Maruyama for dZ = [v(Z, t) + e(t) score(Z, t)] dt + sqrt(2 e(t)) dW, t increasing (theory §6.6).

    With a Gaussian source the score follows from the model: score = -eps-hat / sigma(t), eps-hat from
    the velocity (or any other parameterisation).  Every e(t) >= 0 keeps the path's marginals;
    e = 0 is the flow's Euler sampler.  ``noise_level`` is a constant or a function of t (see
    :func:`natural_noise_level`, :func:`sigma_noise_level`).
    """
    level = noise_level if callable(noise_level) else (lambda t, c=float(noise_level): c)
    g = check_grid(grid, name="flow_sde: the time grid", increasing=True, unit_interval=True)

    def step(z: Tensor, t: float, t_next: float) -> Tensor:
        a, b, da, db = _coef(path, t)
        e = float(level(t))
        if not (math.isfinite(e) and e >= 0):
            raise ValueError(f"flow_sde: the noise level must be finite and >= 0, got {e} at t = {t}")
        x0, eps = predict_x0_eps(model, z, t, path, parameterization)
        h = t_next - t
        velocity = da * x0 + db * eps  # theory §6.3: dz/dt = a' x + b' eps
        if e == 0:
            return z + h * velocity
        if b <= 0:
            raise SingularConversionError(f"flow_sde: the score -eps/sigma is undefined at t = {t} (sigma = 0)")
        drift = velocity - (e / b) * eps  # score = -eps-hat / sigma
        return z + h * drift + math.sqrt(2 * e * h) * _randn(z, generator)

    return _run(step, x, g, return_trajectory)


def natural_noise_level(path: AffinePath, eta: float = 1.0) -> NoiseLevel:
    """e(t) = eta^2 g(t)^2 / 2 with g^2 = sigma^2 d lambda/dt the forward process's diffusion: eta = 1 is the
    DDPM-like reverse SDE, eta = 0 the probability-flow ODE (theory §6.6).  On paths with alpha(0) = 0 (flow
    matching, VP cosine) it is infinite at t = 0: start the grid at t > 0 or use :func:`sigma_noise_level`."""

    def level(t: float) -> float:
        tt = torch.tensor([t], dtype=torch.float64)
        b = path.coefficients(tt).b
        return float(0.5 * eta**2 * (b * b * log_snr_derivative(path, tt))[0])

    return level


def sigma_noise_level(path: AffinePath, scale: float = 1.0) -> NoiseLevel:
    """e(t) = scale * sigma(t): finite at the noise end, vanishing at the data end (e score = -scale eps-hat)."""
    if not scale >= 0:
        raise ValueError(f"sigma_noise_level: scale must be >= 0, got {scale}")
    return lambda t: scale * _coef(path, t)[1]


def dpm_solver_pp_2m(model: Model, x: Tensor, grid, *, path: AffinePath, parameterization: str = "velocity",
                     return_trajectory: bool = False) -> SolveResult:
    """DPM-Solver++(2M) along an increasing ``grid`` (theory §6.9).  NFE = steps.

    With h_i = lambda_i - lambda_{i-1} in the half log-SNR lambda = log(a / b), one step is
    z_i = (b_i / b_{i-1}) z_{i-1} + a_i (1 - e^{-h_i}) D_i, where D_i = x-hat_{i-1} on the first step,
    on the last step into b = 0 and wherever a step size is infinite (then the step is DDIM), and
    otherwise D_i = (1 + 1 / (2 r)) x-hat_{i-1} - 1 / (2 r) x-hat_{i-2} with r = h_{i-1} / h_i.
    """
    return _dpm_solver_pp(model, x, grid, path, parameterization, 2, return_trajectory)


def dpm_solver_pp_3m(model: Model, x: Tensor, grid, *, path: AffinePath, parameterization: str = "velocity",
                     return_trajectory: bool = False) -> SolveResult:
    """A third-order multistep DPM-Solver++ along an increasing ``grid`` (theory §6.9).  NFE = steps.

    Not the reference DPM-Solver++(3M) of Lu et al., which applies multistep corrections to the
    second-order update: this one integrates the quadratic extrapolation of the data prediction
    exactly, which converges faster than the reference.  The spec ``dpm++3m`` names it.

    The exact integral of the data prediction over one step, with x-hat(lambda) replaced by the
    quadratic through the last three predictions (in lambda):
    z_i = (b_i / b_{i-1}) z_{i-1} + a_i [phi_1 x-hat + phi_2 x-hat' + phi_3 x-hat''],
    phi_1 = 1 - e^{-h}, phi_2 = h - 1 + e^{-h}, phi_3 = h^2 / 2 - h + 1 - e^{-h}.  The second step
    uses the line through two predictions, the first step, the last step into b = 0 and steps of
    infinite size are DDIM.
    """
    return _dpm_solver_pp(model, x, grid, path, parameterization, 3, return_trajectory)


def _dpm_solver_pp(model: Model, x: Tensor, grid, path: AffinePath, parameterization: str, order: int,
                   return_trajectory: bool) -> SolveResult:
    """The multistep loop of DPM-Solver++(2M) and (3M): the step of ``order`` from the last predictions."""
    g = check_grid(grid, name=f"dpm_solver_pp_{order}m: the time grid", increasing=True, unit_interval=True)
    traj = Trajectory(x, g[0], return_trajectory)
    preds: list[Tensor] = []  # the last x-hats, newest first, at half log-SNRs lams
    lams: list[float] = []
    for t, t_next in zip(g, g[1:]):
        x0, _ = predict_x0_eps(model, x, t, path, parameterization)
        a, b, _, _ = _coef(path, t)
        a_n, b_n, _, _ = _coef(path, t_next)
        lam = 0.5 * _lam(path, t)
        h = 0.5 * _lam(path, t_next) - lam  # half log-SNR step (inf from pure noise or into data)
        preds, lams = [x0, *preds[: order - 1]], [lam, *lams[: order - 1]]
        k = 1  # the order of this step: as many past predictions as have finite log-SNRs, up to order
        if math.isfinite(h) and b_n > 0:
            while k < len(lams) and math.isfinite(lams[k]) and math.isfinite(lams[k - 1]):
                k += 1
        steps = [lams[j] - lams[j + 1] for j in range(k - 1)]
        decay = (a * b_n) / (a_n * b) if a > 0 and b > 0 else 0.0  # e^{-h}, finite at both ends
        if k == 1:
            d = x0
        elif order == 2:
            r = steps[0] / h
            d = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * preds[1]
        else:
            d1_0 = (preds[0] - preds[1]) / steps[0]
            if k == 2:  # the line through two predictions
                slope, curve = d1_0, torch.zeros_like(x0)
            else:
                second = (d1_0 - (preds[1] - preds[2]) / steps[1]) / (steps[0] + steps[1])
                slope, curve = d1_0 + steps[0] * second, 2 * second
            phi1, phi2, phi3 = 1 - decay, h - 1 + decay, h * h / 2 - h + 1 - decay
            d = x0 + (phi2 / phi1) * slope + (phi3 / phi1) * curve
        x = (b_n / b) * x + a_n * (1 - decay) * d if b > 0 else a_n * d
        traj.add(x, t_next)
    return traj.result(x, len(g) - 1, g)


def edm_heun(model: Model, x: Tensor, grid, *, path: AffinePath, parameterization: str = "velocity",
             s_churn: float = 0.0, s_tmin: float = 0.0, s_tmax: float = math.inf, s_noise: float = 1.0,
             generator: torch.Generator | None = None, return_trajectory: bool = False) -> SolveResult:
    """EDM's stochastic Heun sampler (Karras et al. 2022, Algorithm 2) on any affine path (theory §6.9).

    EDM's state is y = z / a at noise level sigma = b / a; a step from sigma_i first raises the noise
    to sigma-hat = sigma_i (1 + gamma) with gamma = min(s_churn / N, sqrt(2) - 1) when s_tmin <=
    sigma_i <= s_tmax (fresh noise of std s_noise sqrt(sigma-hat^2 - sigma_i^2)), then takes a Heun step
    of dy/dsigma = (y - x-hat(y, sigma)) / sigma to sigma_{i+1} (an Euler step when sigma_{i+1} = 0).
    s_churn = 0 is deterministic.  The grid must start where a > 0 (sigma finite).  sigma-hat is
    capped at the path's sigma at t = 0 (e.g. about 157 on DDPM's schedule; infinite on the flow
    path), the largest noise level the model can be told.
    NFE = 2 N - 1 with N steps into sigma = 0 (2 N otherwise).
    """
    if not (s_churn >= 0 and s_noise >= 0):
        raise ValueError(f"edm_heun: s_churn and s_noise must be >= 0, got {s_churn}, {s_noise}")
    g = check_grid(grid, name="edm_heun: the time grid", increasing=True, unit_interval=True)
    n_steps = len(g) - 1
    a0, b0, _, _ = _coef(path, g[0])
    if not a0 > 0:
        raise SingularConversionError(f"edm_heun: the grid starts at t = {g[0]:.6g} where alpha = 0 (sigma = b / a is infinite); start it at t > 0")
    sig = [b / a if a > 0 else math.inf for a, b, _, _ in (_coef(path, t) for t in g)]
    a_top, b_top, _, _ = _coef(path, 0.0)
    sig_top = b_top / a_top if a_top > 0 else math.inf  # the largest sigma the path can tell the model (at t = 0)

    def t_of(sigma: float) -> float:
        return float(time_from_log_snr(path, torch.tensor([-2 * math.log(sigma)], dtype=torch.float64))[0]) if sigma > 0 else 1.0

    def denoise(y: Tensor, sigma: float) -> Tensor:
        t = t_of(sigma)
        a = _coef(path, t)[0]
        return predict_x0_eps(model, a * y, t, path, parameterization)[0]

    y = x / a0
    traj = Trajectory(x, g[0], return_trajectory)
    nfe = 0
    for i in range(n_steps):
        s_i, s_next = sig[i], sig[i + 1]
        gamma = min(s_churn / n_steps, math.sqrt(2) - 1) if s_tmin <= s_i <= s_tmax else 0.0
        s_hat = min(s_i * (1 + gamma), max(sig_top, s_i))
        if s_hat > s_i:
            y = y + s_noise * math.sqrt(s_hat**2 - s_i**2) * _randn(y, generator)
        d = (y - denoise(y, s_hat)) / s_hat
        nfe += 1
        y_next = y + (s_next - s_hat) * d
        if s_next > 0:
            d2 = (y_next - denoise(y_next, s_next)) / s_next
            nfe += 1
            y_next = y + (s_next - s_hat) * 0.5 * (d + d2)
        y = y_next
        if traj.states is not None:
            traj.add(y * _coef(path, g[i + 1])[0], g[i + 1])
    return traj.result(y * _coef(path, g[-1])[0], nfe, g)
