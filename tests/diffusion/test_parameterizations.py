"""Parameterisations eps / x0 / v / velocity / u: conversions, loss identities, end points, wrapper (theory §6)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import nn

from rectflow.data import Gaussian, make_distribution
from rectflow.diffusion.parameterizations import PARAMETERIZATIONS, ConvertedModel, SingularConversionError, convert, error_ratio, from_x0_eps, to_x0_eps
from rectflow.diffusion.schedules import CustomSchedule, DDPMSchedule, FlowMatchingSchedule, RescaledSchedule, VPCosineSchedule, VPLinearSchedule, diffusion_time, log_snr
from rectflow.engine.trainer import TrainConfig, Trainer
from rectflow.flow.couplings import IndependentCoupling
from rectflow.flow.losses import FlowMatchingObjective
from rectflow.flow.paths import LinearPath
from rectflow.flow.solvers import euler, solve, time_grid
from rectflow.models import MLPVelocity

F64 = torch.float64
PATHS = {
    "linear": LinearPath(),
    "fm": FlowMatchingSchedule(),
    "vp_cosine": VPCosineSchedule(),
    "vp_linear": VPLinearSchedule(),
    "ddpm": DDPMSchedule(),
    "custom": CustomSchedule(lambda s: 1 - s**2, lambda s: torch.sqrt(s)),
    "rescaled": RescaledSchedule(VPCosineSchedule(), lambda s: 1 + s * s),
}


def _batch(seed: int, n: int = 64, d: int = 3, lo: float = 0.03, hi: float = 0.97):
    g = torch.Generator().manual_seed(seed)
    x, eps = torch.randn(n, d, generator=g, dtype=F64), torch.randn(n, d, generator=g, dtype=F64)
    t = lo + (hi - lo) * torch.rand(n, generator=g, dtype=F64)
    return x, eps, t


@pytest.mark.parametrize("name", sorted(PATHS))
def test_true_targets_recover_x_and_eps(name):
    path = PATHS[name]
    x, eps, t = _batch(0)
    z = path.interpolate(eps, x, t)
    for kind in PARAMETERIZATIONS:
        target = from_x0_eps(x, eps, kind, path, t)
        x_hat, eps_hat = to_x0_eps(target, kind, z, path, t)
        torch.testing.assert_close(x_hat, x, rtol=1e-9, atol=1e-9, msg=f"{name}: {kind} -> x0")
        torch.testing.assert_close(eps_hat, eps, rtol=1e-9, atol=1e-9, msg=f"{name}: {kind} -> eps")
    c = path.coefficients(t)
    a, b = c.a[:, None], c.b[:, None]
    torch.testing.assert_close(from_x0_eps(x, eps, "v", path, t), a * eps - b * x, rtol=0, atol=0)
    torch.testing.assert_close(from_x0_eps(x, eps, "velocity", path, t), path.velocity(eps, x, t), rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(from_x0_eps(x, eps, "u", path, t), -path.velocity(eps, x, t), rtol=1e-14, atol=1e-14)


def test_flow_matching_targets_are_the_spec_formulas():
    x, eps, t = _batch(1)
    fm = FlowMatchingSchedule()
    torch.testing.assert_close(from_x0_eps(x, eps, "velocity", fm, t), x - eps, rtol=0, atol=0)  # X1 - X0
    torch.testing.assert_close(from_x0_eps(x, eps, "u", fm, t), eps - x, rtol=0, atol=0)  # u = eps - x


@pytest.mark.parametrize("name", sorted(PATHS))
def test_round_trips_of_every_conversion(name):
    path = PATHS[name]
    x, eps, t = _batch(2)
    z = path.interpolate(eps, x, t)
    g = torch.Generator().manual_seed(3)
    for src, dst in itertools.product(PARAMETERIZATIONS, repeat=2):
        pred = torch.randn(z.shape, generator=g, dtype=F64)  # an arbitrary (wrong) model output
        there = convert(pred, src=src, dst=dst, z=z, path=path, t=t)
        back = convert(there, src=dst, dst=src, z=z, path=path, t=t)
        torch.testing.assert_close(back, pred, rtol=1e-9, atol=1e-9, msg=f"{name}: {src} -> {dst} -> {src}")
        via_eps = convert(convert(pred, src=src, dst="eps", z=z, path=path, t=t), src="eps", dst=dst, z=z, path=path, t=t)
        torch.testing.assert_close(there, via_eps, rtol=1e-9, atol=1e-9, msg=f"{name}: {src} -> {dst} direct vs via eps")


def _errors(path, kind, seed=4):
    """||K-hat - K||^2 / ||eps-hat - eps||^2 for a random wrong eps-hat, per sample."""
    x, eps, t = _batch(seed)
    z = path.interpolate(eps, x, t)
    eps_hat = eps + torch.randn(eps.shape, generator=torch.Generator().manual_seed(seed + 1), dtype=F64)
    k_hat = convert(eps_hat, src="eps", dst=kind, z=z, path=path, t=t)
    k = from_x0_eps(x, eps, kind, path, t)
    return (k_hat - k).square().sum(1) / (eps_hat - eps).square().sum(1), t


@pytest.mark.parametrize("name", sorted(PATHS))
def test_loss_identities_x0_and_v_hold_on_every_schedule(name):
    path = PATHS[name]
    ratio_x, t = _errors(path, "x0")
    lam = log_snr(path, t)
    torch.testing.assert_close(ratio_x, torch.exp(-lam), rtol=1e-9, atol=0)  # ||x-hat - x||^2 = e^-lambda ||eps-hat - eps||^2
    ratio_v, _ = _errors(path, "v")
    alpha = path.coefficients(t).a
    torch.testing.assert_close(ratio_v, alpha**2 * (torch.exp(-lam) + 1) ** 2, rtol=1e-9, atol=0)
    for kind in PARAMETERIZATIONS:
        torch.testing.assert_close(_errors(path, kind)[0], error_ratio(kind, path, t), rtol=1e-9, atol=0)


def test_loss_identity_u_holds_for_the_flow_matching_schedule_only():
    for path in (FlowMatchingSchedule(), LinearPath()):
        ratio_u, t = _errors(path, "u")
        lam = log_snr(path, t)
        torch.testing.assert_close(ratio_u, (torch.exp(-lam / 2) + 1) ** 2, rtol=1e-9, atol=0)
    ratio_u, t = _errors(VPCosineSchedule(), "u")
    lam = log_snr(VPCosineSchedule(), t)
    # on VP cosine the velocity error ratio is (pi/2)^2 (1 + e^-lambda), not (e^(-lambda/2) + 1)^2
    torch.testing.assert_close(ratio_u, (math.pi / 2) ** 2 * (1 + torch.exp(-lam)), rtol=1e-9, atol=0)
    assert float(((ratio_u - (torch.exp(-lam / 2) + 1) ** 2).abs() / ratio_u).max()) > 0.1


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_singular_end_points_raise_clearly(dtype):
    z = torch.randn(4, 2, dtype=dtype)
    pred = torch.randn(4, 2, dtype=dtype)
    t0, t1 = torch.zeros(4, dtype=dtype), torch.ones(4, dtype=dtype)
    for path in (FlowMatchingSchedule(), VPCosineSchedule(), LinearPath()):  # alpha = 0 at t = 0 (pure noise)
        with pytest.raises(SingularConversionError, match=r"eps -> x0.*t = 0"):
            convert(pred, src="eps", dst="x0", z=z, path=path, t=t0)
        with pytest.raises(SingularConversionError, match=r"x0 -> eps.*t = 1"):
            convert(pred, src="x0", dst="eps", z=z, path=path, t=t1)
        # v is regular everywhere: at t = 0, z = eps and x-hat = -v
        x_hat, eps_hat = to_x0_eps(pred, "v", z, path, t0)
        torch.testing.assert_close(eps_hat, z, rtol=0, atol=1e-6)
        torch.testing.assert_close(x_hat, -pred, rtol=0, atol=1e-6)
    fm = FlowMatchingSchedule()
    for t in (t0, t1):  # the FM velocity is regular at both ends: x = z + (1 - t) w, eps = z - t w
        x_hat, eps_hat = to_x0_eps(pred, "velocity", z, fm, t)
        torch.testing.assert_close(x_hat, z + (1 - t[:, None]) * pred, rtol=0, atol=1e-6)
        torch.testing.assert_close(eps_hat, z - t[:, None] * pred, rtol=0, atol=1e-6)
    with pytest.raises(SingularConversionError, match="infinite"):  # VP linear: d sigma / dt = -inf at t = 1
        from_x0_eps(z, pred, "velocity", VPLinearSchedule(), t1)
    mixed = torch.tensor([0.5, 0.0, 0.5, 0.5], dtype=dtype)
    with pytest.raises(SingularConversionError, match=r"1 of 4 samples"):
        convert(pred, src="eps", dst="velocity", z=z, path=fm, t=mixed)
    with pytest.raises(ValueError, match="unknown parameterization"):
        convert(pred, src="score", dst="eps", z=z, path=fm, t=mixed)


class _LinearEps(nn.Module):
    """A toy eps-model eps-hat = W z + c(t), taking diffusion time as input."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.tensor([[0.9, 0.1], [-0.2, 0.8]], dtype=F64))
        self.seen_times = None

    def forward(self, z, s):
        self.seen_times = s
        return z @ self.w.T + s[:, None]


def test_converted_model_wraps_any_parameterisation():
    path = VPCosineSchedule()
    inner = _LinearEps()
    x, eps, t = _batch(5, n=32, d=2)
    z = path.interpolate(eps, x, t)
    for dst in PARAMETERIZATIONS:
        wrapped = ConvertedModel(inner, path, "eps", dst, time_map=diffusion_time)
        expected = convert(inner(z, 1 - t), src="eps", dst=dst, z=z, path=path, t=t)
        torch.testing.assert_close(wrapped(z, t), expected, rtol=0, atol=0)
        torch.testing.assert_close(inner.seen_times, 1 - t, rtol=0, atol=0)  # the wrapped model saw diffusion time
    velocity = ConvertedModel(inner, path, "eps", time_map=diffusion_time)
    z0 = torch.randn(32, 2, dtype=F64, generator=torch.Generator().manual_seed(6))
    grid = time_grid(20, 0.05, 1.0)
    r = solve(velocity, z0, method="euler", grid=grid)
    assert r.nfe == 20 and torch.isfinite(r.x).all()
    torch.testing.assert_close(r.x, euler(velocity, z0, grid).x, rtol=0, atol=0)
    assert list(dict(velocity.named_parameters())) == ["model.w"]  # the trainer sees the inner weights
    with pytest.raises(SingularConversionError):  # eps -> velocity needs x-hat, singular at t = 0 on VP cosine
        solve(velocity, z0, method="euler", steps=4)


def test_flow_matching_objective_trains_an_eps_model_through_the_wrapper():
    torch.manual_seed(0)
    net = MLPVelocity(2, width=32, depth=2)
    before = [p.detach().clone() for p in net.parameters()]
    model = ConvertedModel(net, FlowMatchingSchedule(), "eps")
    obj = FlowMatchingObjective(IndependentCoupling(Gaussian(2), make_distribution("moons")), path=FlowMatchingSchedule(),
                                time_sampler=lambda n, generator=None, device=None: 0.05 + 0.9 * torch.rand(n, generator=generator))
    trainer = Trainer(model, obj, TrainConfig(steps=30, batch_size=64, lr=1e-3, ema_decay=0.0, progress=False, device="cpu"))
    trainer.fit()
    assert trainer.step == 30
    assert any(not torch.equal(a, b) for a, b in zip(before, net.parameters()))
