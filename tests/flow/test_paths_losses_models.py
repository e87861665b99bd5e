import pytest
import torch

from rectflow.flow.losses import flow_matching_loss
from rectflow.flow.paths import AffinePath, LinearPath, PathCoefficients
from rectflow.models import MLPVelocity, SinusoidalTimeEmbedding
from tests.conftest import gen


class GenericLinear(AffinePath):
    """The straight line through the generic affine code path (no specialisation)."""

    def coefficients(self, t):
        return PathCoefficients(t, 1 - t, torch.ones_like(t), -torch.ones_like(t))


def test_linear_path_endpoints_velocity_and_generic_form():
    x0, x1 = torch.randn(8, 3, 4, generator=gen(0)), torch.randn(8, 3, 4, generator=gen(1))
    p, q = LinearPath(), GenericLinear()
    assert torch.allclose(p.interpolate(x0, x1, torch.zeros(8)), x0)
    assert torch.allclose(p.interpolate(x0, x1, torch.ones(8)), x1)
    t = torch.rand(8, generator=gen(2))
    a, b = p.sample(x0, x1, t), q.sample(x0, x1, t)
    assert torch.allclose(a.x_t, b.x_t, atol=1e-6) and torch.allclose(a.velocity, b.velocity)
    # velocity is the time derivative of the interpolation (finite difference)
    h = 1e-3
    fd = (p.interpolate(x0, x1, t + h) - p.interpolate(x0, x1, t - h)) / (2 * h)
    assert torch.allclose(fd, p.velocity(x0, x1, t), atol=1e-3)


def test_loss_value_weight_and_per_sample():
    x0, x1 = torch.randn(16, 2, generator=gen(0)), torch.randn(16, 2, generator=gen(1))
    t = torch.rand(16, generator=gen(2))
    zero = lambda x, t: torch.zeros_like(x)
    out = flow_matching_loss(zero, x0, x1, t)
    assert torch.allclose(out.per_sample, (x1 - x0).square().sum(1))
    assert torch.allclose(out.loss, out.per_sample.mean())
    w = flow_matching_loss(zero, x0, x1, t, weight=lambda t: 2 * t).loss
    assert torch.allclose(w, (2 * t * out.per_sample).mean())
    perfect = flow_matching_loss(lambda x, tt: x1 - x0, x0, x1, t).loss
    assert float(perfect) == 0.0
    with pytest.raises(ValueError, match="same shape"):
        flow_matching_loss(zero, x0, x1[:, :1], t)
    with pytest.raises(ValueError, match="t must have shape"):
        flow_matching_loss(zero, x0, x1, t[:3])


def test_mlp_shapes_and_time_dependence():
    m = MLPVelocity(3, width=32, depth=2, time_dim=16)
    x = torch.randn(5, 3)
    a, b = m(x, torch.zeros(5)), m(x, torch.ones(5))
    assert a.shape == (5, 3) and not torch.allclose(a, b)
    with pytest.raises(ValueError, match=r"\(B, 3\)"):
        m(torch.randn(5, 2), torch.zeros(5))
    with pytest.raises(ValueError):
        MLPVelocity(2, activation="swish")
    e = SinusoidalTimeEmbedding(8)(torch.tensor([0.0, 0.5]))
    assert e.shape == (2, 8) and torch.allclose(e[0, :4], torch.ones(4))
