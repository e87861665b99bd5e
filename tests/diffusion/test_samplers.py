"""DDIM / Euler-in-(z~, eta) / DDPM / churn / flow-SDE samplers: each claim of theory §6 checked numerically.

Most tests use the exact denoiser E[x | z_t] of a Gaussian (mixture) target, known in closed form,
so sampler errors are separated from model errors.
"""

from __future__ import annotations

import pytest
import torch

from rectflow.data import Gaussian, make_distribution
from rectflow.diffusion.parameterizations import PARAMETERIZATIONS, ConvertedModel, SingularConversionError, to_x0_eps
from rectflow.diffusion.samplers import churn, ddim, ddim_step, ddpm, euler_eta, flow_sde, natural_noise_level, posterior, renoise, sigma_noise_level
from rectflow.diffusion.schedules import DDPMSchedule, FlowMatchingSchedule, RescaledSchedule, VPCosineSchedule, VPLinearSchedule, log_snr, shift_time, time_from_log_snr, variance_preserving
from rectflow.diffusion.weighting import DiffusionObjective
from rectflow.engine.trainer import TrainConfig, Trainer
from rectflow.flow.couplings import IndependentCoupling
from rectflow.flow.metrics import energy_distance
from rectflow.flow.paths import LinearPath
from rectflow.flow.solvers import euler, solve, time_grid
from rectflow.models import MLPVelocity

F64 = torch.float64


class Mixture:
    """sum_k w_k N(mu_k, s_k^2 I) and its exact denoiser x-hat(z, t) = E[x | z_t = z] on a path."""

    def __init__(self, means, stds, weights):
        self.means = torch.as_tensor(means, dtype=F64)
        self.stds = torch.as_tensor(stds, dtype=F64)
        self.weights = torch.as_tensor(weights, dtype=F64)

    def sample(self, n: int, g: torch.Generator) -> torch.Tensor:
        k = torch.multinomial(self.weights, n, replacement=True, generator=g)
        return self.means[k] + self.stds[k, None] * torch.randn(n, self.means.shape[1], generator=g, dtype=F64)

    def denoiser(self, path):
        d = self.means.shape[1]

        def x0_model(z, t):
            c = path.coefficients(t)
            a, b = c.a[:, None], c.b[:, None]  # (B, 1)
            var = a**2 * self.stds**2 + b**2  # (B, K): Cov(z | k) = var I
            diff = z[:, None, :] - a[:, :, None] * self.means  # (B, K, d)
            logr = torch.log(self.weights) - 0.5 * d * torch.log(var) - 0.5 * diff.square().sum(-1) / var
            x_k = self.means + (a * self.stds**2 / var)[:, :, None] * diff  # E[x | z, k]
            return (torch.softmax(logr, 1)[:, :, None] * x_k).sum(1)

        return x0_model

    def model(self, path, kind: str):
        """The exact model in parameterisation ``kind``."""
        return ConvertedModel(self.denoiser(path), path, "x0", kind)

    def marginal(self, path, t: float, n: int, g: torch.Generator) -> torch.Tensor:
        c = path.coefficients(torch.tensor([t], dtype=F64))
        x = self.sample(n, g)
        return float(c.a) * x + float(c.b) * torch.randn(x.shape, generator=g, dtype=F64)


GAUSS = Mixture([[1.0, -2.0]], [0.6], [1.0])
MIX = Mixture([[2.5, 0.0], [-1.5, 1.5], [-1.0, -2.0]], [0.4, 0.25, 0.5], [0.5, 0.2, 0.3])


@pytest.mark.parametrize("kind", PARAMETERIZATIONS)
@pytest.mark.parametrize("path", [FlowMatchingSchedule(), LinearPath()], ids=repr)
def test_ddim_with_flow_matching_schedule_is_flow_euler(kind, path):
    g = torch.Generator().manual_seed(0)
    t0 = 0.02 if kind == "eps" else 0.0  # eps -> x0 is singular at pure noise (alpha = 0)
    for grid in (time_grid(7, t0, 1.0), shift_time(time_grid(5, t0, 1.0), 3.0)):
        z = MIX.marginal(path, t0, 500, g)
        model = MIX.model(path, kind)
        r_ddim = ddim(model, z, grid, path=path, parameterization=kind, return_trajectory=True)
        r_euler = euler(ConvertedModel(model, path, kind, "velocity"), z, grid, return_trajectory=True)
        assert r_ddim.nfe == r_euler.nfe == len(grid) - 1
        torch.testing.assert_close(r_ddim.trajectory, r_euler.trajectory, rtol=0, atol=1e-12)
        torch.testing.assert_close(r_ddim.times, r_euler.times, rtol=0, atol=0)


@pytest.mark.parametrize("path", [FlowMatchingSchedule(), VPCosineSchedule(), VPLinearSchedule(), DDPMSchedule(),
                                  RescaledSchedule(VPCosineSchedule(), lambda s: 2 + torch.sin(5 * s))], ids=repr)
def test_euler_in_z_tilde_eta_is_ddim_at_any_step_count(path):
    g = torch.Generator().manual_seed(1)
    for kind in ("eps", "x0", "v", "velocity"):
        for steps in (1, 3, 10):
            grid = time_grid(steps, 0.05, 1.0)
            z = MIX.marginal(path, 0.05, 200, g)
            model = MIX.model(path, kind)
            a = ddim(model, z, grid, path=path, parameterization=kind, return_trajectory=True).trajectory
            b = euler_eta(model, z, grid, path=path, parameterization=kind, return_trajectory=True).trajectory
            torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-11)


def test_ddim_is_invariant_to_rescaling_the_schedule_but_pf_ode_euler_is_not():
    fm = FlowMatchingSchedule()
    rescaled = [variance_preserving(fm),  # c(s = 0) = 1
                RescaledSchedule(fm, lambda s: torch.exp(torch.sin(3 * s)), lambda s: 3 * torch.cos(3 * s) * torch.exp(torch.sin(3 * s)))]
    g = torch.Generator().manual_seed(2)
    z = MIX.marginal(fm, 0.0, 1000, g)
    grid = time_grid(6)
    ref = ddim(MIX.denoiser(fm), z, grid, path=fm, parameterization="x0", return_trajectory=True)
    ref_euler = euler(MIX.model(fm, "velocity"), z, grid).x
    for path in rescaled:
        c0 = float(path.coefficients(torch.zeros(1, dtype=F64)).b)  # z scales by c = sigma / s at the noise end
        out = ddim(MIX.denoiser(path), c0 * z, grid, path=path, parameterization="x0", return_trajectory=True)
        alpha = path.coefficients(grid).a[1:, None, None]
        torch.testing.assert_close(out.trajectory[1:] / alpha, ref.trajectory[1:] / grid[1:, None, None], rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(out.x, ref.x, rtol=0, atol=1e-10)  # the final samples are the same
        pf_euler = euler(MIX.model(path, "velocity"), c0 * z, grid).x
        assert float((pf_euler - ref_euler).norm(dim=1).mean()) > 0.1  # Euler on the probability-flow ODE in z changes
        gaps = []  # ... by discretisation error only: the gap is O(1/steps), both converge to the same flow
        for steps in (300, 600):
            fine = time_grid(steps)
            gap = euler(MIX.model(path, "velocity"), c0 * z[:200], fine).x - euler(MIX.model(fm, "velocity"), z[:200], fine).x
            gaps.append(float(gap.norm(dim=1).mean()))
        assert gaps[1] < 1e-2 and 0.4 < gaps[1] / gaps[0] < 0.6, gaps


def _moments_ok(x: torch.Tensor, target: Mixture) -> bool:
    """Mean and covariance of samples x (n, d) against the single Gaussian ``target``. With n = 10^4 the
    standard errors are ~0.006 (mean), ~0.005 (variance, pooled over d) and ~0.004 (covariance); the
    tolerances allow ~4 of them plus the O(1/steps) discretisation bias of 400-step samplers."""
    mean, cov = x.mean(0), torch.cov(x.T)
    var = float(target.stds[0]) ** 2
    off = cov - torch.diag(cov.diagonal())
    return (float((mean - target.means[0]).abs().max()) < 0.025 and abs(float(cov.diagonal().mean()) - var) < 0.025
            and float(off.abs().max()) < 0.015)


SAMPLERS = {
    "ddim": lambda m, z, grid, path, g: ddim(m, z, grid, path=path, parameterization="x0"),
    "ddpm": lambda m, z, grid, path, g: ddpm(m, z, grid, path=path, parameterization="x0", generator=g),
    "churn_0.5": lambda m, z, grid, path, g: churn(m, z, grid, path=path, parameterization="x0", churn=0.5, generator=g),
    "churn_2": lambda m, z, grid, path, g: churn(m, z, grid, path=path, parameterization="x0", churn=2.0, generator=g),
    "sde_sigma_0.5": lambda m, z, grid, path, g: flow_sde(m, z, grid, path=path, parameterization="x0",
                                                           noise_level=sigma_noise_level(path, 0.5), generator=g),
    "sde_sigma_2": lambda m, z, grid, path, g: flow_sde(m, z, grid, path=path, parameterization="x0",
                                                         noise_level=sigma_noise_level(path, 2.0), generator=g),
    "sde_natural_1": lambda m, z, grid, path, g: flow_sde(m, z, grid, path=path, parameterization="x0",
                                                           noise_level=natural_noise_level(path, 1.0), generator=g),
    "sde_constant_0.3": lambda m, z, grid, path, g: flow_sde(m, z, grid, path=path, parameterization="x0",
                                                              noise_level=0.3, generator=g),
    "dopri5": lambda m, z, grid, path, g: solve(ConvertedModel(m, path, "x0"), z, method="dopri5", t0=float(grid[0]),
                                                t1=float(grid[-1]) - 1e-9, rtol=1e-6, atol=1e-6),
}


@pytest.mark.parametrize("name", sorted(SAMPLERS))
@pytest.mark.parametrize("path", [FlowMatchingSchedule(), VPCosineSchedule()], ids=repr)
def test_samplers_preserve_gaussian_marginals(name, path):
    g = torch.Generator().manual_seed(3)
    t0 = 0.01  # the natural noise level is infinite at t = 0 on these paths
    z = GAUSS.marginal(path, t0, 10_000, g)
    out = SAMPLERS[name](GAUSS.denoiser(path), z, time_grid(400, t0, 1.0), path, g)
    assert _moments_ok(out.x, GAUSS), (out.x.mean(0), torch.cov(out.x.T))


def test_the_moment_check_can_fail():
    """Control: DDPM without its noise (posterior means only) collapses the variance and is caught."""
    path, g = FlowMatchingSchedule(), torch.Generator().manual_seed(3)
    z = GAUSS.marginal(path, 0.0, 10_000, g)
    grid = time_grid(400).tolist()
    for t, t_next in zip(grid, grid[1:]):
        z = posterior(z, GAUSS.denoiser(path)(z, torch.full((z.shape[0],), t, dtype=F64)), t, t_next, path)[0]
    assert not _moments_ok(z, GAUSS)


@pytest.mark.parametrize("name", ["ddim", "ddpm", "churn_0.5", "sde_sigma_0.5", "sde_sigma_2", "sde_natural_1"])
def test_samplers_reach_a_gaussian_mixture(name):
    path, g = VPCosineSchedule(), torch.Generator().manual_seed(4)
    n = 4000  # energy distance between two exact sample sets of this size: ~0.5e-3 .. 2.5e-3
    out = SAMPLERS[name](MIX.denoiser(path), MIX.marginal(path, 0.01, n, g), time_grid(200, 0.01, 1.0), path, g).x
    exact = MIX.sample(n, g)
    assert energy_distance(out, exact) < 6e-3
    assert abs(float((out[:, 0] > 1.0).double().mean()) - 0.5) < 0.035  # right-hand component's weight (SE 0.008)
    # control: the same check catches a sampler with far too few steps
    bad = SAMPLERS["ddim"](MIX.denoiser(path), MIX.marginal(path, 0.01, n, g), time_grid(4, 0.01, 1.0), path, g).x
    assert energy_distance(bad, exact) > 1.5e-2


@pytest.mark.parametrize("path", [FlowMatchingSchedule(), VPCosineSchedule(), VPLinearSchedule(), DDPMSchedule()], ids=repr)
def test_ddpm_step_is_ddim_step_twice_as_long_then_renoise(path):
    """DDPM t -> t' equals, as a Gaussian transition, DDIM to lambda'' = 2 lambda' - lambda then re-noising to t'."""
    g = torch.Generator().manual_seed(5)
    denoiser = GAUSS.denoiser(path)  # affine in z, so both transitions are Gaussian with mean affine in z
    for t, t_next in ((0.1, 0.2), (0.5, 0.55), (0.3, 0.9), (0.7, 0.71)):
        z = GAUSS.marginal(path, t, 64, g)
        x0, eps = to_x0_eps(denoiser(z, torch.full((64,), t, dtype=F64)), "x0", z, path, torch.full((64,), t, dtype=F64))
        mean, std = posterior(z, x0, t, t_next, path)
        lam, lam_next = float(log_snr(path, torch.tensor(t, dtype=F64))), float(log_snr(path, torch.tensor(t_next, dtype=F64)))
        t_far = float(time_from_log_snr(path, torch.tensor(2 * lam_next - lam, dtype=F64)))
        z_far = ddim_step(x0, eps, t_far, path)
        mean2 = renoise(z_far, t_far, t_next, path, torch.zeros_like(z))
        std2 = renoise(torch.zeros_like(z), t_far, t_next, path, torch.ones_like(z))
        torch.testing.assert_close(mean2, mean, rtol=1e-9, atol=1e-9)  # same mean for every z
        torch.testing.assert_close(std2, torch.full_like(z, std), rtol=1e-9, atol=0)  # same isotropic covariance
        assert std > 0.01 and float((mean - ddim_step(x0, eps, t_next, path)).abs().max()) > 1e-3  # not DDIM


def test_churn_one_is_ddpm_and_churn_zero_is_ddim():
    path = VPCosineSchedule()
    z = MIX.marginal(path, 0.02, 256, torch.Generator().manual_seed(6))
    grid = time_grid(20, 0.02, 1.0)
    m = MIX.model(path, "v")
    a = churn(m, z, grid, path=path, parameterization="v", churn=1.0, generator=torch.Generator().manual_seed(7))
    b = ddpm(m, z, grid, path=path, parameterization="v", generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(a.x, b.x, rtol=1e-9, atol=1e-9)
    c = churn(m, z, grid, path=path, parameterization="v", churn=0.0, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(c.x, ddim(m, z, grid, path=path, parameterization="v").x, rtol=0, atol=0)


def test_stochastic_samplers_are_seeded_and_validate_inputs():
    path, m = FlowMatchingSchedule(), MIX.model(FlowMatchingSchedule(), "velocity")
    z = MIX.marginal(path, 0.0, 64, torch.Generator().manual_seed(8))
    grid = time_grid(10)
    for fn, kw in ((ddpm, {}), (churn, {"churn": 0.7}), (flow_sde, {"noise_level": sigma_noise_level(path, 1.0)})):
        r1 = fn(m, z, grid, path=path, generator=torch.Generator().manual_seed(9), return_trajectory=True, **kw)
        r2 = fn(m, z, grid, path=path, generator=torch.Generator().manual_seed(9), **kw)
        r3 = fn(m, z, grid, path=path, generator=torch.Generator().manual_seed(10), **kw)
        assert torch.equal(r1.x, r2.x) and not torch.equal(r1.x, r3.x)
        assert r1.nfe == 10 and r1.trajectory.shape == (11, 64, 2) and torch.equal(r1.trajectory[-1], r1.x)
        with pytest.raises(ValueError, match="increasing"):
            fn(m, z, grid.flip(0), path=path, generator=torch.Generator(), **kw)
    sde0 = flow_sde(m, z, grid, path=path, noise_level=0.0)  # zero noise level: the flow's Euler sampler
    torch.testing.assert_close(sde0.x, euler(m, z, grid).x, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="noise level"):
        flow_sde(m, z, grid, path=path, noise_level=-1.0)
    with pytest.raises(ValueError, match="churn"):
        churn(m, z, grid, path=path, churn=-0.5)
    with pytest.raises(SingularConversionError):  # eps-model at pure noise
        ddim(MIX.model(path, "eps"), z, grid, path=path, parameterization="eps")
    fwd = time_grid(400, 0.0, 0.99)  # DDIM inversion (a decreasing grid) undoes sampling up to discretisation
    inv = ddim(m, ddim(m, z, fwd, path=path).x, fwd.flip(0), path=path)
    assert float((inv.x - z).norm(dim=1).mean()) < 2e-2


def test_flow_paths_are_straight_only_for_a_single_point():
    fm, g = FlowMatchingSchedule(), torch.Generator().manual_seed(11)
    point = Mixture([[1.0, -2.0]], [0.0], [1.0])
    z = point.marginal(fm, 0.0, 1000, g)
    one_step = euler(point.model(fm, "velocity"), z, time_grid(1)).x
    torch.testing.assert_close(one_step, point.means.expand_as(one_step), rtol=0, atol=1e-12)
    one_step = euler(GAUSS.model(fm, "velocity"), GAUSS.marginal(fm, 0.0, 10_000, g), time_grid(1)).x
    assert not _moments_ok(one_step, GAUSS)  # curved paths: one step is wrong


@pytest.mark.slow
def test_train_eps_on_vp_cosine_sample_with_flow_euler_and_ddim():
    """An eps-prediction model trained on a VP-cosine path samples through the flow Euler solver (via the
    wrapper) and through DDIM with the same result (theory §6, issue item 5)."""
    path = VPCosineSchedule()
    torch.manual_seed(0)
    net = MLPVelocity(2, width=64, depth=2, time_scale=1000.0)  # the diffusion models' time features, as this check was tuned with
    obj = DiffusionObjective(IndependentCoupling(Gaussian(2), make_distribution("moons")), path, "eps")
    cfg = TrainConfig(steps=400, batch_size=256, lr=2e-3, ema_decay=0.0, progress=False, device="cpu", seed=1)
    model = Trainer(net, obj, cfg).fit().eval_model.double()
    z = torch.randn(1000, 2, dtype=F64, generator=torch.Generator().manual_seed(12))
    t0 = 0.02  # eps -> x0 is singular at t = 0 (alpha = 0): both samplers start just after it
    with torch.no_grad():
        for steps in (4, 25):  # DDIM = Euler in (z~, eta), to float precision at any step count
            grid = time_grid(steps, t0, 1.0)
            torch.testing.assert_close(euler_eta(model, z, grid, path=path, parameterization="eps").x,
                                       ddim(model, z, grid, path=path, parameterization="eps").x, rtol=1e-10, atol=1e-10)
        velocity = ConvertedModel(model, path, "eps", "velocity")
        fine = time_grid(1000, t0, 1.0)
        x_euler = euler(velocity, z, fine).x  # the flow Euler solver on the wrapped model
        x_ddim = ddim(model, z, fine, path=path, parameterization="eps").x
        x_ddim_coarse = ddim(model, z, time_grid(10, t0, 1.0), path=path, parameterization="eps").x
    err_fine = float((x_euler - x_ddim).norm(dim=1).mean())
    err_coarse = float((x_ddim_coarse - x_ddim).norm(dim=1).mean())
    assert err_fine < 0.01 and err_coarse > 20 * err_fine  # the same deterministic map, up to discretisation
    data = make_distribution("moons").sample(1000, generator=torch.Generator().manual_seed(13)).double()
    assert energy_distance(x_ddim, data) < 0.1  # and a sensible model of the moons (pure noise: ~1.4)


def test_half_precision_states_give_the_model_float32_times():
    """A bf16 state gets float32 times, as the flow solvers give them (one helper, flow.solvers.time_vector)."""
    seen = []

    def model(z, t):
        seen.append(t)
        return torch.zeros_like(z)

    path = variance_preserving(VPCosineSchedule())
    z = torch.randn(3, 2).to(torch.bfloat16)
    ddim(model, z, [0.01, 0.33, 0.99], path=path, parameterization="eps")
    assert {t.dtype for t in seen} == {torch.float32} and float(seen[1][0]) == float(torch.tensor(0.33))
