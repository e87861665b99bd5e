"""One-step distillation (theory §4): the t = 0 regression, pluggable losses, and the
conditional-mean failure of distilling the random coupling."""

import math

import pytest
import torch
from torch import nn

from rectflow.data import PointCloud
from rectflow.engine.trainer import TrainConfig, Trainer
from rectflow.flow.couplings import IndependentCoupling
from rectflow.flow.sampling import sample_model
from rectflow.models import MLPVelocity
from rectflow.reflow.distill import DistillationObjective, PseudoHuberLoss, distillation_loss, l2_loss, make_distill_loss, one_step
from tests.conftest import gen


class Deterministic:
    """The coupling that pairs x0 = -1 with x1 = -3 and x0 = +1 with x1 = +5 (a straight coupling)."""

    heavy = False

    def sample(self, n, *, generator=None, device=None):
        i = torch.randint(2, (n,), generator=generator)
        return torch.tensor([[-1.0], [1.0]])[i], torch.tensor([[-3.0], [5.0]])[i]


def _distill(coupling, steps=400):
    torch.manual_seed(0)
    model = MLPVelocity(1, width=32, depth=2, time_dim=16)
    cfg = TrainConfig(steps=steps, batch_size=256, lr=1e-2, lr_schedule="cosine", ema_decay=0.98, progress=False, device="cpu")
    trainer = Trainer(model, DistillationObjective(coupling), cfg).fit()
    return one_step(trainer.eval_model, torch.tensor([[-1.0], [1.0]])).squeeze(1)


def test_two_point_example_random_coupling_learns_the_conditional_mean():
    """X0 in {-1, +1}, X1 in {-3, +5}, independent: E[X1 | X0] = 1 for both points, so the one-step
    map sends both to 1 (the blurry failure); on the straight coupling it learns the pairing."""
    x0, x1 = PointCloud(torch.tensor([[-1.0], [1.0]])), PointCloud(torch.tensor([[-3.0], [5.0]]))
    blurry = _distill(IndependentCoupling(x0, x1))
    torch.testing.assert_close(blurry, torch.tensor([1.0, 1.0]), atol=0.15, rtol=0)
    sharp = _distill(Deterministic())
    torch.testing.assert_close(sharp, torch.tensor([-3.0, 5.0]), atol=0.15, rtol=0)


class TimeSpy(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(2))
        self.seen = []

    def forward(self, x, t):
        self.seen.append(t.clone())
        return x * self.w


def test_regresses_at_t_zero_only():
    spy = TimeSpy()
    x0, x1 = torch.randn(8, 2, generator=gen(0)), torch.randn(8, 2, generator=gen(1))
    out = distillation_loss(spy, x0, x1)
    assert torch.equal(spy.seen[0], torch.zeros(8))
    torch.testing.assert_close(out.per_sample, (x1 - x0).square().sum(1))  # v = 0: ||(Z1 - Z0) - 0||^2
    torch.testing.assert_close(out.loss, out.per_sample.mean())
    with pytest.raises(ValueError, match="same shape"):
        distillation_loss(spy, x0, x1[:, :1])


def test_losses():
    pred, target = torch.zeros(3, 4), torch.tensor([[0.0] * 4, [1e-3, 0, 0, 0], [30.0, 40.0, 0, 0]])
    torch.testing.assert_close(l2_loss(pred, target), torch.tensor([0.0, 1e-6, 2500.0]))
    h = PseudoHuberLoss(c=0.5)(pred, target)
    torch.testing.assert_close(h, torch.sqrt(torch.tensor([0.0, 1e-6, 2500.0]) + 0.25) - 0.5)
    assert h[2] == pytest.approx(50 - 0.5, rel=1e-4)  # L1-like in the tails
    auto = make_distill_loss("pseudo_huber")
    c = 0.00054 * math.sqrt(4)
    torch.testing.assert_close(auto(pred, target)[1], torch.tensor(math.sqrt(1e-6 + c * c) - c))
    assert make_distill_loss("l2") is l2_loss
    with pytest.raises(ValueError, match="unknown distillation loss"):
        make_distill_loss("lpips")
    with pytest.raises(ValueError):
        PseudoHuberLoss(c=-1.0)


def test_one_step_is_euler_with_one_step():
    torch.manual_seed(0)
    model = MLPVelocity(2, width=16, depth=1)
    x0 = torch.randn(10, 2, generator=gen(0))
    torch.testing.assert_close(one_step(model, x0), sample_model(model, x0, method="euler", steps=1).x)


def test_an_object_without_the_coupling_interface_is_refused():
    class NoHeavy:
        def sample(self, n, *, generator=None, device=None):
            return torch.zeros(n, 1), torch.ones(n, 1)

    with pytest.raises(TypeError, match="heavy"):
        DistillationObjective(NoHeavy())
