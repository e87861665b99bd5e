"""Log-likelihood of data under a trained flow by the instantaneous change of variables (theory §3.4).

A flow dx/dt = v(x, t) carries the source density p0 (t = 0) to p1 (t = 1), and along a path

    d/dt log p_t(x_t) = -div v(x_t, t),  so  log p1(x1) = log p0(x0) - int_0^1 div v(x_t, t) dt,

where x0 is x1 integrated backwards from t = 1 to t = 0.  :func:`log_likelihood` integrates the
augmented state [x, int div v] backwards with any solver of :mod:`rectflow.flow.solvers`.  The
divergence is exact (D backward passes per evaluation: small D) or Hutchinson's estimate
E[eps^T (dv/dx) eps] with Rademacher or Gaussian probes eps, fixed along each path (one
vector-Jacobian product per probe: images).  The source must have a known density
(``log_prob``): a Gaussian.  For 8-bit images, :func:`dequantize` and :func:`bits_per_dim` give the
usual bits per dimension.
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple

import torch
from torch import Tensor

from rectflow.draws import rand, randn
from rectflow.errors import ConfigError, check_int
from rectflow.flow.solvers import solve

__all__ = ["Likelihood", "divergence_exact", "divergence_hutchinson", "log_likelihood", "dequantize", "bits_per_dim"]

Velocity = Callable[[Tensor, Tensor], Tensor]


class Likelihood(NamedTuple):
    """``log_prob`` (B,): log p1(x1) in nats; ``prior_log_prob`` (B,): log p0(x0); ``divergence``
    (B,): int_0^1 div v dt along each path; ``x0`` (B, ...): the source points; ``nfe``: velocity
    evaluations per sample (each costs D, or one per probe, extra backward passes)."""

    log_prob: Tensor
    prior_log_prob: Tensor
    divergence: Tensor
    x0: Tensor
    nfe: int


def _without_graph(f: Velocity, x: Tensor, t: Tensor, v: Tensor) -> Tensor:
    """v of a field that returned no autograd graph, if it truly ignores x (then its divergence is 0);
    a field that moves with x but hides its graph (run under ``torch.no_grad``, detached, an exported
    module) is refused: reading it as divergence-free would silently drop the density change."""
    with torch.no_grad():
        moved = f(x.detach() + 1e-3 * (1 + x.detach().abs()), t)
    if not torch.equal(moved, v):
        raise ConfigError("log-likelihood: the model's output depends on x but carries no autograd graph (is it run under "
                          "torch.no_grad, detached, or an exported module?); the divergence needs gradients of v with respect to x")
    return v.detach()


def divergence_exact(f: Velocity, x: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
    """v = f(x, t) (B, ...) and its exact divergence sum_i dv_i/dx_i (B,), one backward pass per dimension."""
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        v = f(x, t)
        flat = v.reshape(v.shape[0], -1)
        div = torch.zeros(v.shape[0], dtype=v.dtype, device=v.device)
        if not v.requires_grad:  # no graph to x: a translation (divergence 0), or a model that hides its graph
            return _without_graph(f, x, t, v), div
        for i in range(flat.shape[1]):
            (g,) = torch.autograd.grad(flat[:, i].sum(), x, retain_graph=i + 1 < flat.shape[1], allow_unused=True)
            if g is not None:  # None: this output does not depend on x
                div = div + g.reshape(g.shape[0], -1)[:, i]
    return v.detach(), div.detach()


def divergence_hutchinson(f: Velocity, x: Tensor, t: Tensor, probes: Tensor) -> tuple[Tensor, Tensor]:
    """v = f(x, t) and Hutchinson's divergence estimate mean_p eps_p^T (dv/dx) eps_p (B,) for
    probes (P, B, ...) with E[eps eps^T] = I; one vector-Jacobian product per probe."""
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        v = f(x, t)
        est = torch.zeros(v.shape[0], dtype=v.dtype, device=v.device)
        if not v.requires_grad:  # no graph to x: a translation (divergence 0), or a model that hides its graph
            return _without_graph(f, x, t, v), est
        for p in range(probes.shape[0]):
            (g,) = torch.autograd.grad(v, x, grad_outputs=probes[p], retain_graph=p + 1 < probes.shape[0], allow_unused=True)
            if g is not None:
                est = est + (g * probes[p]).reshape(v.shape[0], -1).sum(1)
    return v.detach(), (est / probes.shape[0]).detach()


def log_likelihood(
    model: Velocity,
    x1: Tensor,
    source: Any,
    *,
    method: str = "dopri5",
    steps: int | None = 100,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    estimator: str = "exact",
    probes: int = 1,
    noise: str = "rademacher",
    generator: torch.Generator | None = None,
) -> Likelihood:
    """log p1(x1) of data x1 (B, ...) under the flow ``model`` from ``source`` (theory §3.4).

    Args:
        model: the velocity field v(x, t), t in [0, 1] from source (0) to data (1).
        source: pi0 with a ``log_prob(x) -> (B,)`` (the library's Gaussians have one).
        method, steps, rtol, atol: the solver of the backward integration (see :func:`solve`).
        estimator: ``"exact"`` (D backward passes per evaluation) or ``"hutchinson"``.
        probes, noise, generator: Hutchinson's probe count, ``"rademacher"`` or ``"gaussian"``
            probes (drawn once per sample and kept along the path), and their generator.
    Raises:
        ConfigError: the source has no density, or a bad estimator / probe setting.
    """
    if not callable(getattr(source, "log_prob", None)):
        raise ConfigError(f"log-likelihood needs a source with a known density (log_prob), such as a Gaussian; "
                          f"{type(source).__name__} has none, so log p1 is defined only up to the unknown log p0")
    if estimator not in ("exact", "hutchinson"):
        raise ConfigError(f"estimator must be 'exact' or 'hutchinson', got {estimator!r}")
    if estimator == "hutchinson":
        check_int(probes, "probes")
        if noise not in ("rademacher", "gaussian"):
            raise ConfigError(f"noise must be 'rademacher' or 'gaussian', got {noise!r}")
        eps = randn((probes, *x1.shape), generator=generator, device=x1.device, dtype=x1.dtype, draw_on=x1.device)
        if noise == "rademacher":
            eps = eps.sign() + (eps == 0)  # +-1 with equal probability
    b, shape = x1.shape[0], x1.shape[1:]
    d = math.prod(shape)
    src_dim = getattr(source, "dim", None)
    if isinstance(src_dim, int) and src_dim != d:
        raise ConfigError(f"log-likelihood: the source {type(source).__name__} has dimension {src_dim} but the data have {d} "
                          f"(shape {list(shape)}); its density would be the wrong one")

    def augmented(s: Tensor, t: Tensor) -> Tensor:
        x = s[:, :d].reshape(b, *shape)
        v, div = divergence_exact(model, x, t) if estimator == "exact" else divergence_hutchinson(model, x, t, eps)
        return torch.cat([v.reshape(b, d), div[:, None].to(s.dtype)], dim=1)

    state = torch.cat([x1.reshape(b, d), torch.zeros(b, 1, dtype=x1.dtype, device=x1.device)], dim=1)
    res = solve(augmented, state, method=method, steps=steps, t0=1.0, t1=0.0, rtol=rtol, atol=atol)  # backwards in time
    x0 = res.x[:, :d].reshape(b, *shape)
    divergence = -res.x[:, d]  # theory §3.4: the accumulated column is int_1^0 div = -int_0^1 div
    prior = source.log_prob(x0)
    if tuple(prior.shape) != (b,):
        raise ConfigError(f"log-likelihood: the source's log_prob must return one value per sample, shape ({b},), got {tuple(prior.shape)} "
                          "(a per-coordinate density? sum it over the coordinates)")
    return Likelihood(prior - divergence, prior, divergence, x0, res.nfe)


def dequantize(images: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """uint8 images (B, C, H, W) -> floats in [-1, 1 + 2/255) with uniform noise inside each pixel's bin
    (the same scale as :func:`rectflow.data.image_sets.to_unit_range`): (x + u) / 127.5 - 1, u ~ U[0, 1)."""
    if images.dtype != torch.uint8:
        raise ConfigError(f"dequantize expects uint8 images, got {images.dtype}")
    u = rand(images.shape, generator=generator, draw_on=images.device)
    return (images.to(u.device).float() + u) * (1 / 127.5) - 1


def bits_per_dim(log_prob: Tensor, dim: int, bin_width: float = 1 / 127.5) -> Tensor:
    """Bits per dimension of dequantized 8-bit data from log densities (nats) on the [-1, 1] scale:
    -(log p + D log(bin_width)) / (D ln 2), i.e. minus log2 of the probability of each pixel bin."""
    return -(log_prob + dim * math.log(bin_width)) / (dim * math.log(2.0))
