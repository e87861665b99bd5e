"""pi0 = N(0, I), pi1 = N(mu, s^2 I), independent coupling: the rectified-flow velocity is known.

X_t ~ N(t mu, sigma_t^2 I), sigma_t^2 = t^2 s^2 + (1 - t)^2, and
v*(x, t) = E[X1 - X0 | X_t = x] = mu + (t s^2 - (1 - t)) / sigma_t^2 (x - t mu).
Its flow is Z_t = t mu + sigma_t Z_0, so Z_1 = mu + s Z_0 (the marginal is preserved).
"""

import pytest
import torch

from rectflow.data import Gaussian
from rectflow.engine.trainer import TrainConfig, Trainer
from rectflow.flow.couplings import IndependentCoupling
from rectflow.flow.losses import FlowMatchingObjective, flow_matching_loss
from rectflow.flow.solvers import solve
from rectflow.models import MLPVelocity
from tests.conftest import gen

MU = torch.tensor([2.0, -1.0], dtype=torch.float64)
S = 0.5


def v_star(x, t):
    t = t[:, None].to(x.dtype)
    var = t**2 * S**2 + (1 - t) ** 2
    return MU + (t * S**2 - (1 - t)) / var * (x - t * MU)


def draw(n, seed=0):
    g = gen(seed)
    x0 = torch.randn(n, 2, generator=g, dtype=torch.float64)
    x1 = MU + S * torch.randn(n, 2, generator=g, dtype=torch.float64)
    t = torch.rand(n, generator=g, dtype=torch.float64)
    return x0, x1, t


def test_closed_form_velocity_minimises_the_loss():
    """E||D - v* - g||^2 = E||D - v*||^2 + E||g||^2 for any g(X_t, t): v* is the minimiser."""
    x0, x1, t = draw(400_000)
    base = flow_matching_loss(v_star, x0, x1, t).loss
    for g in (lambda x, t: 0.3 * torch.ones_like(x), lambda x, t: 0.2 * x, lambda x, t: t[:, None] * x.flip(1)):
        perturbed = flow_matching_loss(lambda x, tt: v_star(x, tt) + g(x, tt), x0, x1, t).loss
        x_t = t[:, None] * x1 + (1 - t[:, None]) * x0
        gap = g(x_t, t).square().sum(1).mean()
        assert abs(float(perturbed - base - gap)) < 0.01 * float(gap) + 2e-3


@pytest.mark.parametrize("method, steps, tol", [("rk4", 40, 1e-6), ("heun", 400, 1e-4), ("dopri5", None, 1e-6)])
def test_solvers_transport_to_the_exact_map(method, steps, tol):
    x0 = torch.randn(1000, 2, generator=gen(1), dtype=torch.float64)
    res = solve(v_star, x0, method=method, steps=steps, rtol=1e-9, atol=1e-9)
    assert float((res.x - (MU + S * x0)).abs().max()) < tol


def test_transported_marginal_and_one_step_collapse():
    x0 = torch.randn(200_000, 2, generator=gen(2), dtype=torch.float64)
    z1 = solve(v_star, x0, method="rk4", steps=20).x
    assert torch.allclose(z1.mean(0), MU, atol=0.01)
    assert torch.allclose(z1.std(0), torch.full((2,), S, dtype=torch.float64), atol=0.01)
    # One Euler step lands every sample on E[X1 | X0] = mu: the conditional-mean failure of theory §4.
    one = solve(v_star, x0[:10], method="euler", steps=1).x
    assert torch.allclose(one, MU.expand(10, 2), atol=1e-12)


@pytest.mark.slow
def test_trained_mlp_recovers_the_closed_form_field():
    src, tgt = Gaussian(2), Gaussian(2, mean=0.0, std=S)

    class Shifted:
        dim = 2

        def sample(self, n, *, generator=None, device=None):
            return tgt.sample(n, generator=generator, device=device) + MU.float()

    model = MLPVelocity(2, width=128, depth=3)
    cfg = TrainConfig(steps=2500, batch_size=512, lr=2e-3, warmup_steps=100, lr_schedule="cosine", ema_decay=0.999, progress=False)
    trainer = Trainer(model, FlowMatchingObjective(IndependentCoupling(src, Shifted())), cfg).fit()
    x = torch.randn(4000, 2, generator=gen(3))
    t = torch.rand(4000, generator=gen(4)) * 0.9 + 0.05
    with torch.no_grad():
        err = (trainer.eval_model(x, t) - v_star(x.double(), t.double()).float()).square().sum(1).mean()
    ref = v_star(x.double(), t.double()).square().sum(1).mean()
    assert float(err) < 0.02 * float(ref), (float(err), float(ref))
