"""Diffusion training as a weighted MSE in log-SNR, in any parameterisation, on any schedule (theory §6.5).

Every diffusion / flow-matching loss is, per sample, (Kingma & Gao 2023; theory §6.5)

    L = E_{lambda ~ p(lambda), eps} [ w(lambda) / p(lambda) * ||eps-hat - eps||^2 ],

where the *weighting* w(lambda) is what matters (it balances frequencies) and the *training noise
schedule* p(lambda), the density of lambda = log-SNR induced by the time sampler and the path,
only sets the estimator's variance and the range [lambda_min, lambda_max].  The two are chosen
independently here.  A model predicting K (eps, x0, v, velocity, u) is trained on the same
loss through the exact identity ||K-hat - K||^2 = r_K(t) ||eps-hat - eps||^2
(:func:`rectflow.diffusion.parameterizations.error_ratio`), so each sample's squared error in K-space gets
the factor w(lambda) / (p(lambda) r_K(t)), with p(lambda) = p_T(t) / (d lambda / dt).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor

from rectflow.diffusion.parameterizations import check_parameterization, error_ratio, from_x0_eps
from rectflow.diffusion.schedules import log_snr, log_snr_derivative, time_from_log_snr
from rectflow.draws import draw_device, randn
from rectflow.flow.losses import FlowBatch, FlowMatchingObjective, LossOutput, per_sample_mse
from rectflow.flow.paths import AffinePath, exact_dtype
from rectflow.flow.time_sampling import LogitNormalTime, UniformTime

__all__ = [
    "Weighting",
    "ELBOWeighting",
    "FlowMatchingWeighting",
    "SD3Weighting",
    "EDMWeighting",
    "SigmoidWeighting",
    "make_weighting",
    "LogSNRNormalTime",
    "time_density",
    "log_snr_density",
    "implied_weighting",
    "loss_factor",
    "diffusion_loss",
    "DiffusionObjective",
]

Weighting = Callable[[Tensor], Tensor]
"""w(lambda): (B,) -> (B,), the weight on ||eps-hat - eps||^2 per unit of log-SNR."""


def _normal_pdf(x: Tensor, mean: float, std: float) -> Tensor:
    return torch.exp(-0.5 * ((x - mean) / std) ** 2) / (std * math.sqrt(2 * math.pi))


@dataclass(frozen=True)
class ELBOWeighting:
    """w = 1: the (continuous-time) ELBO, 1/2 E_t[(d lambda/dt) ||eps-hat - eps||^2] up to the factor 1/2."""

    def __call__(self, lam: Tensor) -> Tensor:
        return torch.ones_like(lam)


@dataclass(frozen=True)
class FlowMatchingWeighting:
    """w = e^(-lambda/2) / 2: exactly the flow-matching loss E_{t~U} ||u-hat - u||^2 on the FM path; the
    v-MSE with uniform time on the VP cosine schedule implies the same weighting times 2/pi (theory §6.5)."""

    def __call__(self, lam: Tensor) -> Tensor:
        return 0.5 * torch.exp(-lam / 2)


@dataclass(frozen=True)
class SD3Weighting:
    """SD3: the FM velocity loss with logit-normal time t = sigmoid(mean + std N(0, 1)) (rectflow time), so
    lambda = 2 logit(t) ~ N(2 mean, (2 std)^2) and w = N(lambda; 2 mean, 2 std) (e^(-lambda/2) + 1)^2."""

    mean: float = 0.0
    std: float = 1.0

    def __call__(self, lam: Tensor) -> Tensor:
        return _normal_pdf(lam, 2 * self.mean, 2 * self.std) * (torch.exp(-lam / 2) + 1) ** 2


@dataclass(frozen=True)
class EDMWeighting:
    """EDM (Karras et al. 2022): ln sigma ~ N(p_mean, p_std^2) with sigma = e^(-lambda/2), and loss weight
    (sigma^2 + sigma_data^2) / (sigma sigma_data)^2 on the x0-MSE, i.e.
    w = N(lambda; -2 p_mean, 2 p_std) (e^-lambda + sigma_data^2) / sigma_data^2."""

    sigma_data: float = 0.5
    p_mean: float = -1.2
    p_std: float = 1.2

    def __call__(self, lam: Tensor) -> Tensor:
        sd2 = self.sigma_data**2
        return _normal_pdf(lam, -2 * self.p_mean, 2 * self.p_std) * (torch.exp(-lam) + sd2) / sd2


@dataclass(frozen=True)
class SigmoidWeighting:
    """w = sigmoid(bias - lambda) (Kingma & Gao 2023's sigmoid weighting)."""

    bias: float = 0.0

    def __call__(self, lam: Tensor) -> Tensor:
        return torch.sigmoid(self.bias - lam)


_WEIGHTINGS = {"elbo": ELBOWeighting, "flow_matching": FlowMatchingWeighting, "sd3": SD3Weighting,
               "edm": EDMWeighting, "sigmoid": SigmoidWeighting}


def make_weighting(kind: str, **params: Any) -> Weighting:
    """A weighting by name: elbo, flow_matching, sd3 (mean, std), edm (sigma_data, p_mean, p_std), sigmoid (bias)."""
    try:
        return _WEIGHTINGS[kind](**params)
    except KeyError:
        raise ValueError(f"unknown weighting {kind!r}; choose one of {sorted(_WEIGHTINGS)}") from None
    except TypeError as e:
        raise ValueError(f"weighting {kind!r}: {e}") from None


@dataclass(frozen=True)
class LogSNRNormalTime:
    """Training noise schedule lambda ~ N(mean, std^2), mapped to rectflow time on ``path``.

    EDM's ln sigma ~ N(-1.2, 1.2^2) is ``LogSNRNormalTime(path, 2.4, 2.4)``.
    """

    path: AffinePath
    mean: float = 2.4
    std: float = 2.4

    def __call__(self, n, *, generator=None, device=None) -> Tensor:
        gdev = draw_device(generator, device)
        lam = self.mean + self.std * randn(n, generator=generator, dtype=exact_dtype(gdev if gdev is not None else "cpu"), draw_on=gdev)
        return time_from_log_snr(self.path, lam).to(device=device, dtype=torch.get_default_dtype())

    def density(self, t: Tensor) -> Tensor:
        """p_T(t) = N(lambda(t); mean, std) d lambda / dt."""
        return _normal_pdf(log_snr(self.path, t), self.mean, self.std) * log_snr_derivative(self.path, t)


def time_density(sampler: Any, t: Tensor) -> Tensor:
    """The density p_T(t) of a time sampler: the library's samplers, or any object with ``density(t)``."""
    if isinstance(sampler, UniformTime):
        inside = (t >= sampler.eps) & (t <= 1 - sampler.eps)
        return inside.to(t.dtype) / (1 - 2 * sampler.eps)
    if isinstance(sampler, LogitNormalTime):
        logit = torch.log(t) - torch.log1p(-t)
        return _normal_pdf(logit, sampler.mean, sampler.std) / (t * (1 - t))
    if hasattr(sampler, "density"):  # UShapedTime, LogSNRNormalTime, user samplers
        return sampler.density(t)
    raise TypeError(f"time sampler {sampler!r} has no known density; give it a density(t) method")


def log_snr_density(path: AffinePath, sampler: Any, t: Tensor) -> Tensor:
    """p(lambda) at lambda = lambda(t): the training noise schedule induced by ``sampler`` on ``path``."""
    return time_density(sampler, t) / log_snr_derivative(path, t)


def implied_weighting(path: AffinePath, sampler: Any, parameterization: str, t: Tensor) -> Tensor:
    """w(lambda(t)) implied by the plain, unweighted K-MSE with times from ``sampler``: p(lambda) r_K(t)."""
    return log_snr_density(path, sampler, t) * error_ratio(parameterization, path, t)


def loss_factor(t: Tensor, *, path: AffinePath, parameterization: str, weighting: Weighting | None,
                time_sampler: Any) -> Tensor:
    """Per-sample factor on ||K-hat - K||^2: w(lambda) / (p(lambda) r_K(t)); 1 when ``weighting`` is None."""
    if weighting is None:
        return torch.ones_like(t)
    t64 = t.detach().to(exact_dtype(t.device))
    lam = log_snr(path, t64)
    factor = weighting(lam) / implied_weighting(path, time_sampler, parameterization, t64)  # theory §6.5: w / p
    return factor.to(t.dtype)


def diffusion_loss(model: Callable[..., Tensor], x0: Tensor, x1: Tensor, t: Tensor, *, path: AffinePath,
                   parameterization: str = "eps", weighting: Weighting | None = None, time_sampler: Any = None,
                   model_kwargs: dict[str, Any] | None = None) -> LossOutput:
    """Weighted diffusion loss on a batch: eps = x0 (source noise), x = x1 (data), z = a(t) x + b(t) eps.

    ``model(z, t)`` predicts ``parameterization``; the loss is mean_i factor(t_i) ||K-hat_i - K_i||^2
    (:func:`loss_factor`); ``time_sampler`` is the distribution t was drawn from (needed with a weighting).
    """
    check_parameterization(parameterization)
    if weighting is not None and time_sampler is None:
        raise ValueError("diffusion_loss: a weighting needs the time_sampler that drew t (for p(lambda))")
    z = path.interpolate(x0, x1, t)
    target = from_x0_eps(x1, x0, parameterization, path, t)
    pred = model(z, t, **(model_kwargs or {}))
    err = per_sample_mse(pred, target)
    factor = loss_factor(t, path=path, parameterization=parameterization, weighting=weighting, time_sampler=time_sampler)
    return LossOutput((err * factor.to(err.dtype)).mean(), err.detach())


class DiffusionObjective(FlowMatchingObjective):
    """Trainer objective: a model in any parameterisation on any path, with any weighting.

    Args:
        coupling: ``sample(n, generator, device) -> (x0, x1)``; x0 is the Gaussian noise, x1 the data.
        path: the schedule (any :class:`AffinePath`; shared with the samplers).
        parameterization: what the model predicts (eps, x0, v, velocity, u).
        weighting: w(lambda) (see :func:`make_weighting`); None trains the plain MSE of the model's output.
        time_sampler: the training noise schedule (default U[1e-5, 1 - 1e-5], which keeps t off the
            end points where eps/x0 conversions and weights are singular).
    """

    def __init__(self, coupling, path: AffinePath, parameterization: str = "eps",
                 weighting: Weighting | None = None, time_sampler=None) -> None:
        check_parameterization(parameterization)
        # draw() and heavy_draw come from FlowMatchingObjective; only the loss differs
        super().__init__(coupling, path=path, time_sampler=time_sampler if time_sampler is not None else UniformTime(eps=1e-5))
        self.parameterization, self.weighting = parameterization, weighting

    def sample_weight(self, t: Tensor) -> Tensor:
        """The factor multiplying each sample's ||K-hat - K||^2 (see :func:`loss_factor`)."""
        return loss_factor(t, path=self.path, parameterization=self.parameterization, weighting=self.weighting,
                           time_sampler=self.time_sampler)

    def loss(self, model, batch: FlowBatch) -> LossOutput:
        return diffusion_loss(model, batch.x0, batch.x1, batch.t, path=self.path, parameterization=self.parameterization,
                              weighting=self.weighting, time_sampler=self.time_sampler)
