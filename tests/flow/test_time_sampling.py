import pytest
import torch
from scipy import stats

from rectflow.flow.time_sampling import LogitNormalTime, UniformTime, UShapedTime, make_time_sampler
from tests.conftest import gen


def test_uniform_range_and_ks():
    t = UniformTime(eps=0.1)(20000, generator=gen(0))
    assert float(t.min()) >= 0.1 and float(t.max()) <= 0.9
    assert stats.kstest(t.numpy(), stats.uniform(0.1, 0.8).cdf).pvalue > 1e-3


def test_logit_normal_matches_its_law():
    t = LogitNormalTime(mean=0.5, std=0.8)(20000, generator=gen(1))
    z = torch.logit(t.double())
    assert float(z.mean()) == pytest.approx(0.5, abs=0.03) and float(z.std()) == pytest.approx(0.8, abs=0.03)


def test_u_shaped_matches_cosh_density():
    s = UShapedTime(a=4.0)
    t = s(40000, generator=gen(2)).double()
    assert float(t.min()) >= 0 and float(t.max()) <= 1
    grid = torch.linspace(0, 1, 2001, dtype=torch.float64)
    dens = s.density(grid)
    assert float(torch.trapezoid(dens, grid)) == pytest.approx(1.0, abs=1e-6)
    cdf_vals = torch.cumulative_trapezoid(dens, grid)
    cdf = lambda x: torch.from_numpy(__import__("numpy").interp(x, grid[1:].numpy(), cdf_vals.numpy())).numpy()
    assert stats.kstest(t.numpy(), cdf).pvalue > 1e-3
    assert (t < 0.1).float().mean() > (t.sub(0.5).abs() < 0.05).float().mean()  # more mass at the ends


def test_factory_and_errors():
    assert isinstance(make_time_sampler("u_shaped", a=2.0), UShapedTime)
    with pytest.raises(ValueError, match="unknown time sampler"):
        make_time_sampler("beta")
    with pytest.raises(ValueError, match="std"):
        LogitNormalTime(std=0.0)
    with pytest.raises(ValueError, match="time sampler 'uniform'"):
        make_time_sampler("uniform", a=1.0)
