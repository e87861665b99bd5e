"""Network output parameterisations of a Gaussian path, and conversions between them (theory §6.3).

On an affine path z = a(t) x + b(t) eps (rectflow time t; a = alpha_s, b = sigma_s with s = 1 - t,
see :mod:`rectflow.diffusion.schedules`), a network may predict

* ``"eps"``: the noise eps (epsilon-prediction);
* ``"x0"``: the data x (x-hat, the denoiser);
* ``"v"``: v = alpha eps - sigma x (v-prediction, Salimans & Ho);
* ``"velocity"``: dz/dt = a'(t) x + b'(t) eps in rectflow time, what :mod:`rectflow.flow.solvers` integrate
  (on the flow-matching path this is X1 - X0 = x - eps);
* ``"u"``: dz/ds = -velocity in diffusion time (on the flow-matching path u = eps - x, SD3's output).

Given z and the path, any one of them determines (x, eps) and hence all others.  The conversions
divide by alpha (eps -> x), sigma (x -> eps), alpha^2 + sigma^2 (v) or a b' - b a' (velocity, u).
Rule at singular points: when a divisor vanishes (|divisor| <= 16 machine-eps x its scale) or the
path's coefficients are not finite, :class:`SingularConversionError` is raised naming t and the
reason; nothing is clamped silently.  Typical cases: eps -> x0 at the pure-noise end (alpha = 0),
x0 -> eps at the data end (sigma = 0).
"""

from __future__ import annotations

from typing import Any, Callable, Literal, NamedTuple

import torch
from torch import Tensor, nn

from rectflow.errors import RectflowError
from rectflow.flow.paths import AffinePath, exact_dtype, expand_like

__all__ = [
    "Parameterization",
    "PARAMETERIZATIONS",
    "SingularConversionError",
    "check_parameterization",
    "to_x0_eps",
    "from_x0_eps",
    "convert",
    "error_ratio",
    "ConvertedModel",
    "EDMCoefficients",
    "edm_coefficients",
    "EDMPreconditioned",
]

Parameterization = Literal["eps", "x0", "v", "velocity", "u"]
PARAMETERIZATIONS: tuple[str, ...] = ("eps", "x0", "v", "velocity", "u")


class SingularConversionError(RectflowError, ValueError):
    """A conversion between parameterisations is undefined at this t (a divisor vanishes)."""


def check_parameterization(kind: str) -> None:
    """ValueError unless ``kind`` is one of :data:`PARAMETERIZATIONS`."""
    if kind not in PARAMETERIZATIONS:
        raise ValueError(f"unknown parameterization {kind!r}; choose one of {list(PARAMETERIZATIONS)}")


def _require(divisor: Tensor, scale: Tensor, t: Tensor, what: str) -> None:
    """Raise unless divisor is finite and clearly non-zero relative to ``scale``."""
    tol = 16 * torch.finfo(divisor.dtype).eps
    bad = ~torch.isfinite(divisor) | ~torch.isfinite(scale) | (divisor.abs() <= tol * scale.abs())
    if bool(bad.any()):
        tb = t.reshape(-1)[bad.reshape(-1)] if t.dim() > 0 and t.numel() == bad.numel() else t.reshape(-1)
        raise SingularConversionError(
            f"{what} is singular at t = {float(tb[0]):.6g} ({int(bad.sum())} of {bad.numel()} samples); "
            "keep t off that end point (start a sampling grid at t > 0 or stop it before t = 1), or use a 'v' "
            "model, which is regular everywhere"
        )


def _coeffs(path: AffinePath, t: Tensor, z: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    c = path.coefficients(t)
    return tuple(expand_like(v.to(z.dtype), z) for v in c)  # type: ignore[return-value]


def _needs_derivatives(*kinds: str) -> bool:
    return any(k in ("velocity", "u") for k in kinds)


_HALF = (torch.float16, torch.bfloat16)


def to_x0_eps(pred: Tensor, kind: str, z: Tensor, path: AffinePath, t: Tensor) -> tuple[Tensor, Tensor]:
    """(x-hat, eps-hat) implied by a prediction ``pred`` of type ``kind`` at z (B, ...), t (B,).
    Half-precision z is converted in float32 and the results cast back (every conversion here does
    so): in bf16, SD's alpha(0) = 0.068 is within rounding of 0 and the divisions lose most digits."""
    check_parameterization(kind)
    if z.dtype in _HALF:
        x0, eps = to_x0_eps(pred.float(), kind, z.float(), path, t)
        return x0.to(z.dtype), eps.to(z.dtype)
    a, b, da, db = _coeffs(path, t, z)
    if kind == "eps":
        _require(a, a.abs() + b.abs(), t, "eps -> x0 (divides by alpha)")
        return (z - b * pred) / a, pred  # theory §6.3: z = alpha x + sigma eps
    if kind == "x0":
        _require(b, a.abs() + b.abs(), t, "x0 -> eps (divides by sigma)")
        return pred, (z - a * pred) / b
    if kind == "v":
        n2 = a * a + b * b
        _require(n2, n2, t, "v -> (x0, eps) (divides by alpha^2 + sigma^2)")
        return (a * z - b * pred) / n2, (b * z + a * pred) / n2  # theory §6.3: v = alpha eps - sigma x
    w = pred if kind == "velocity" else -pred  # u = dz/ds = -dz/dt
    det = a * db - b * da
    _require(det, (a * db).abs() + (b * da).abs(), t, f"{kind} -> (x0, eps) (divides by a b' - b a')")
    return (db * z - b * w) / det, (a * w - da * z) / det  # solves z = a x + b eps, w = a' x + b' eps


def from_x0_eps(x0: Tensor, eps: Tensor, kind: str, path: AffinePath, t: Tensor) -> Tensor:
    """The prediction of type ``kind`` made from (x-hat, eps-hat), shapes (B, ...), t (B,)."""
    check_parameterization(kind)
    if kind == "x0":
        return x0
    if kind == "eps":
        return eps
    if x0.dtype in _HALF:
        return from_x0_eps(x0.float(), eps.float(), kind, path, t).to(x0.dtype)
    a, b, da, db = _coeffs(path, t, x0)
    if kind == "v":
        return a * eps - b * x0  # theory §6.3: v = alpha eps - sigma x
    if not bool(torch.isfinite(da).all() and torch.isfinite(db).all()):
        bad = ~(torch.isfinite(da) & torch.isfinite(db)).reshape(-1)
        raise SingularConversionError(
            f"(x0, eps) -> {kind} is singular at t = {float(t.reshape(-1)[bad][0] if t.numel() == bad.numel() else t.reshape(-1)[0]):.6g}: "
            "the path's time derivative is infinite there"
        )
    w = da * x0 + db * eps  # theory §6.3: dz/dt = a' x + b' eps; FM: X1 - X0
    return w if kind == "velocity" else -w


def convert(pred: Tensor, *, src: str, dst: str, z: Tensor, path: AffinePath, t: Tensor) -> Tensor:
    """Convert a model output ``pred`` from parameterisation ``src`` to ``dst`` at (z, t) on ``path``."""
    check_parameterization(src)
    check_parameterization(dst)
    if src == dst:
        return pred
    if {src, dst} == {"velocity", "u"}:
        return -pred
    if z.dtype in _HALF:  # once in float32, not through half-precision (x0, eps)
        return convert(pred.float(), src=src, dst=dst, z=z.float(), path=path, t=t).to(z.dtype)
    x0, eps = to_x0_eps(pred, src, z, path, t)
    return from_x0_eps(x0, eps, dst, path, t)


def error_ratio(kind: str, path: AffinePath, t: Tensor) -> Tensor:
    """r(t) = ||K-hat - K||^2 / ||eps-hat - eps||^2 for parameterisation K, exact for every error (theory §6.3):

    eps: 1;  x0: sigma^2/alpha^2 = e^-lambda;  v: alpha^2 (e^-lambda + 1)^2 = (alpha^2 + sigma^2)^2/alpha^2;
    velocity and u: (b' - a' b/a)^2, which on the flow-matching path is (e^(-lambda/2) + 1)^2.
    """
    check_parameterization(kind)
    a, b, da, db = path.coefficients(t)
    if kind == "eps":
        return torch.ones_like(a)
    _require(a, a.abs() + b.abs(), t, f"error_ratio({kind!r}) (divides by alpha)")
    if kind == "x0":
        return (b / a) ** 2  # ||x-hat - x|| = (sigma/alpha) ||eps-hat - eps||
    if kind == "v":
        return ((a * a + b * b) / a) ** 2
    return (db - da * b / a) ** 2


class ConvertedModel(nn.Module):
    """Expose ``model`` (which predicts ``src``) as a model predicting ``dst`` on ``path``.

    With ``dst="velocity"`` (default) the wrapper is a velocity field for :func:`rectflow.flow.solvers.solve`
    and can be trained by :class:`rectflow.flow.losses.FlowMatchingObjective` (gradients flow into
    ``model``).  ``time_map`` converts rectflow time t into the wrapped model's own time input
    (e.g. :func:`rectflow.diffusion.schedules.diffusion_time`, or ``DDPMSchedule.t_to_timestep``).
    Shapes: x (B, ...), t (B,) -> (B, ...).
    """

    def __init__(self, model: Callable[..., Tensor], path: AffinePath, src: str, dst: str = "velocity",
                 *, time_map: Callable[[Tensor], Tensor] | None = None) -> None:
        super().__init__()
        check_parameterization(src)
        check_parameterization(dst)
        self.model, self.path, self.src, self.dst, self.time_map = model, path, src, dst, time_map

    def forward(self, x: Tensor, t: Tensor, **kwargs: Any) -> Tensor:
        pred = self.model(x, self.time_map(t) if self.time_map is not None else t, **kwargs)
        return convert(pred, src=self.src, dst=self.dst, z=x, path=self.path, t=t)

    def extra_repr(self) -> str:
        return f"src={self.src!r}, dst={self.dst!r}, path={self.path!r}"


class EDMCoefficients(NamedTuple):
    """EDM's preconditioning (Karras et al. 2022, Table 1) at noise level sigma: D = c_skip x + c_out F(c_in x, c_noise)."""

    c_skip: Tensor
    c_out: Tensor
    c_in: Tensor
    c_noise: Tensor


def edm_coefficients(sigma: Tensor, sigma_data: float = 0.5) -> EDMCoefficients:
    """c_skip = s_d^2 / (s^2 + s_d^2), c_out = s s_d / sqrt(s^2 + s_d^2), c_in = 1 / sqrt(s^2 + s_d^2),
    c_noise = ln(s) / 4 (theory §6.9): unit-variance network input and target at every sigma."""
    total = sigma.square() + sigma_data**2
    return EDMCoefficients(sigma_data**2 / total, sigma * sigma_data / total.sqrt(), total.rsqrt(), sigma.log() / 4)


class EDMPreconditioned(nn.Module):
    """A raw network ``net(x_in, c_noise)`` wrapped with EDM's preconditioning, as a model of our
    affine path predicting ``"x0"`` (use it with any sampler or :class:`ConvertedModel`).

    On the path z = a x + b eps, EDM's variables are x = z / a and sigma = b / a (theory §6.9), so
    forward(z, t) = c_skip(sigma) z / a + c_out(sigma) net(c_in(sigma) z / a, c_noise(sigma)).
    Shapes: z (B, ...), t (B,) -> (B, ...).  Undefined where a = 0 (pure noise: sigma infinite).
    """

    def __init__(self, net: Callable[..., Tensor], path: AffinePath, sigma_data: float = 0.5) -> None:
        super().__init__()
        if not sigma_data > 0:
            raise ValueError(f"sigma_data must be > 0, got {sigma_data}")
        self.net, self.path, self.sigma_data = net, path, float(sigma_data)

    def forward(self, z: Tensor, t: Tensor, **kwargs: Any) -> Tensor:
        c = self.path.coefficients(t.to(exact_dtype(t.device)))
        _require(c.a, torch.ones_like(c.a), t, "EDM preconditioning needs alpha > 0 (sigma = b / a is infinite at pure noise)")
        sigma = (c.b / c.a).to(z.dtype)
        k = edm_coefficients(sigma, self.sigma_data)
        x = z / expand_like(c.a.to(z.dtype), z)
        f = self.net(expand_like(k.c_in, z) * x, k.c_noise, **kwargs)
        return expand_like(k.c_skip, z) * x + expand_like(k.c_out, z) * f

    def extra_repr(self) -> str:
        return f"sigma_data={self.sigma_data}, path={self.path!r}"
