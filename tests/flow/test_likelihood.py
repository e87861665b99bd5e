"""Likelihood by the change of variables (theory §3.4): exact and Hutchinson divergence against a
Gaussian -> Gaussian flow whose density is known at every time, an affine map, bits per dimension."""

import math

import pytest
import torch

from rectflow.data import Gaussian, make_distribution
from rectflow.errors import ConfigError
from rectflow.flow.likelihood import bits_per_dim, dequantize, divergence_exact, divergence_hutchinson, log_likelihood
from tests.conftest import gen

MU, SIGMA = torch.tensor([1.5, -0.5], dtype=torch.float64), 0.6


def gaussian_flow(x, t):
    """The marginal velocity of the straight path from N(0, I) to N(MU, SIGMA^2 I) with independent
    pairs: x_t ~ N(t MU, s(t)^2 I), s^2 = (1 - t)^2 + t^2 SIGMA^2, v = MU + (s'/s)(x - t MU)."""
    t = t.reshape(-1, 1).to(x.dtype)
    s2 = (1 - t) ** 2 + t**2 * SIGMA**2
    ds2 = -2 * (1 - t) + 2 * t * SIGMA**2
    return MU.to(x) + 0.5 * ds2 / s2 * (x - t * MU.to(x))


def target_log_prob(x):
    z = (x - MU) / SIGMA
    return -0.5 * z.square().sum(1) - 2 * math.log(SIGMA) - math.log(2 * math.pi)


def test_exact_divergence_gives_the_analytic_log_density():
    x1 = MU + SIGMA * torch.randn(64, 2, generator=gen(), dtype=torch.float64)
    res = log_likelihood(gaussian_flow, x1, Gaussian(2), rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(res.log_prob, target_log_prob(x1), atol=1e-4, rtol=0)
    torch.testing.assert_close(res.x0, (x1 - MU) / SIGMA, atol=1e-5, rtol=0)  # the flow's inverse map
    assert res.divergence.shape == (64,) and res.nfe > 10


def test_hutchinson_is_unbiased_within_its_standard_error():
    x1 = MU + SIGMA * torch.randn(1, 2, generator=gen(1), dtype=torch.float64)
    exact = log_likelihood(gaussian_flow, x1, Gaussian(2), method="rk4", steps=20).log_prob
    for noise in ("rademacher", "gaussian"):
        runs = torch.cat([log_likelihood(gaussian_flow, x1.expand(200, 2), Gaussian(2), method="rk4", steps=20, estimator="hutchinson",
                                         probes=1, noise=noise, generator=gen(7)).log_prob])
        se = runs.std() / math.sqrt(runs.numel())
        assert abs(float(runs.mean() - exact)) < 4 * float(se) + 1e-9, (noise, float(runs.mean()), float(exact), float(se))
    # the field here is isotropic linear, so Rademacher probes are exact (eps^T a I eps = a D): zero variance
    rad = log_likelihood(gaussian_flow, x1.expand(5, 2), Gaussian(2), method="rk4", steps=20, estimator="hutchinson", generator=gen(2))
    torch.testing.assert_close(rad.log_prob, exact.expand(5), atol=1e-10, rtol=0)


def test_divergence_estimators_on_an_affine_map():
    a = torch.tensor([[2.0, 1.0, 0.0], [0.5, -1.0, 3.0], [0.0, 0.2, 0.7]])
    f = lambda x, t: x @ a.T  # noqa: E731  div = trace(a) = 1.7 everywhere
    x = torch.randn(4, 3, generator=gen())
    v, div = divergence_exact(f, x, torch.zeros(4))
    torch.testing.assert_close(v, x @ a.T)
    torch.testing.assert_close(div, torch.full((4,), 1.7))
    probes = torch.randn(20000, 4, 3, generator=gen(3))
    _, est = divergence_hutchinson(f, x, torch.zeros(4), probes)
    assert torch.allclose(est, torch.full((4,), 1.7), atol=0.1)


def test_change_of_variables_through_a_linear_flow_on_images():
    # v(x, t) = c x scales every pixel by e^c over [0, 1]: log p1(x) = log p0(x e^-c) - D c
    src = make_distribution({"name": "gaussian", "shape": [1, 4, 4]})
    c = 0.3
    x1 = torch.randn(3, 1, 4, 4, generator=gen(), dtype=torch.float64)
    res = log_likelihood(lambda x, t: c * x, x1, src, method="rk4", steps=50, estimator="hutchinson", probes=2, generator=gen(4))
    want = src.log_prob(x1 * math.exp(-c)) - 16 * c
    torch.testing.assert_close(res.log_prob, want, atol=1e-6, rtol=0)


def test_bits_per_dim_and_dequantization():
    u8 = torch.tensor([[[[0, 255]]]], dtype=torch.uint8)
    y = dequantize(u8, generator=gen())
    assert y.shape == (1, 1, 1, 2) and -1 <= float(y.min()) and float(y.max()) < 1 + 2 / 255
    # a uniform density over [-1, 1 + 2/255)^D puts 1/256 on every bin: exactly 8 bits per dimension
    d = 3
    log_p = torch.tensor([-d * math.log(256 / 127.5)])
    assert float(bits_per_dim(log_p, d)) == pytest.approx(8.0)


def test_a_source_without_a_density_is_refused():
    with pytest.raises(ConfigError, match="known density"):
        log_likelihood(gaussian_flow, torch.zeros(2, 2), make_distribution("moons"))
    with pytest.raises(ConfigError, match="estimator"):
        log_likelihood(gaussian_flow, torch.zeros(2, 2), Gaussian(2), estimator="magic")
    with pytest.raises(ConfigError, match="probes"):
        log_likelihood(gaussian_flow, torch.zeros(2, 2), Gaussian(2), estimator="hutchinson", probes=0)


@pytest.mark.parametrize("estimator", ["exact", "hutchinson"])
def test_a_field_that_ignores_x_has_zero_divergence(estimator):
    """A translation v = c (no graph to x at all) moves the density without changing it."""
    from rectflow.data import make_distribution

    source = make_distribution("gaussian")
    shift = torch.tensor([0.5, -1.0], dtype=torch.float64)
    x1 = torch.randn(6, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    res = log_likelihood(lambda x, t: shift.expand_as(x), x1, source, method="rk4", steps=3, estimator=estimator,
                         generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(res.log_prob, source.log_prob(x1 - shift))
    assert torch.equal(res.divergence, torch.zeros(6, dtype=torch.float64))
    # half of it ignores x: v = (-x_0, 1) has divergence -1
    half = log_likelihood(lambda x, t: torch.stack([-x[:, 0], torch.ones_like(x[:, 1])], 1), x1, source, method="rk4", steps=3,
                          estimator=estimator, probes=64, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(half.divergence, torch.full((6,), -1.0, dtype=torch.float64), atol=1e-9 if estimator == "exact" else 0.5)


def test_a_model_that_hides_its_graph_is_refused_not_read_as_divergence_free():
    """A field that depends on x but returns no autograd graph (run under no_grad, detached, exported)
    must not be taken for a translation: its log-density would silently lose the divergence."""
    def frozen(x, t):
        with torch.no_grad():
            return gaussian_flow(x, t)
    x1 = torch.randn(3, 2, dtype=torch.float64, generator=gen(4))
    for estimator in ("exact", "hutchinson"):
        with pytest.raises(ConfigError, match="autograd graph"):
            log_likelihood(frozen, x1, Gaussian(2), method="rk4", steps=4, estimator=estimator, generator=gen(5))


def test_a_source_that_does_not_fit_the_data_is_refused():
    zero = lambda x, t: 0 * x  # noqa: E731
    with pytest.raises(ConfigError, match="dimension"):  # 2-D Gaussian for 3-D points: off by log(2 pi) / 2 otherwise
        log_likelihood(zero, torch.randn(4, 3, dtype=torch.float64), Gaussian(2), method="euler", steps=2)
    with pytest.raises(ConfigError, match="dimension"):  # and for images
        log_likelihood(zero, torch.randn(2, 1, 2, 2, dtype=torch.float64), Gaussian(2), method="euler", steps=2)
    normal = torch.distributions.Normal(torch.zeros(2, dtype=torch.float64), torch.ones(2, dtype=torch.float64))
    with pytest.raises(ConfigError, match=r"log_prob.*\(2,\)"):  # a per-coordinate log_prob (B, D), not (B,)
        log_likelihood(zero, torch.randn(2, 2, dtype=torch.float64), normal, method="euler", steps=2)
