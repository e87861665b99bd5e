"""DPM-Solver++(2M) and EDM's Heun sampler with its preconditioning (theory §6.9): convergence orders
measured by halving the step on a Gaussian whose denoiser and probability-flow ODE are known in
closed form, exactness on a point mass, seeding, and the EDM table's round trips."""

from __future__ import annotations

import math

import pytest
import torch

from rectflow.diffusion.parameterizations import ConvertedModel, EDMPreconditioned, edm_coefficients
from rectflow.diffusion.samplers import ddim, dpm_solver_pp_2m, dpm_solver_pp_3m, edm_heun
from rectflow.diffusion.schedules import FlowMatchingSchedule, VPCosineSchedule, karras_sigmas, log_snr_grid, time_from_log_snr, times_from_sigmas
from rectflow.errors import RectflowError
from rectflow.flow.solvers import time_grid

MU, S = 0.7, 0.5  # data N(MU, S^2) in every coordinate


def denoiser(path, s=S):
    """E[x | z_t] for x ~ N(MU, s^2), z = a x + b eps: the exact x0-prediction."""

    def f(z, t):
        c = path.coefficients(t.double())
        a, b = c.a.to(z).reshape(-1, 1), c.b.to(z).reshape(-1, 1)
        return MU + a * s**2 / (a**2 * s**2 + b**2) * (z - a * MU)

    return f


def on_marginal(path, t, u):
    """The probability-flow ODE keeps each point's standardised coordinate u: z_t = a MU + sqrt(a^2 S^2 + b^2) u."""
    c = path.coefficients(torch.as_tensor(t, dtype=torch.float64).reshape(1))
    return c.a * MU + torch.sqrt(c.a**2 * S**2 + c.b**2) * u


def order(errors):
    return [math.log2(e0 / e1) for e0, e1 in zip(errors, errors[1:])]


U = torch.randn(64, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


@pytest.mark.parametrize("path", [FlowMatchingSchedule(), VPCosineSchedule()], ids=["fm", "vp-cosine"])
def test_dpm_solver_pp_2m_is_second_order_and_ddim_first(path):
    errs = {"dpm": [], "ddim": []}
    for n in (16, 32, 64, 128):
        grid = log_snr_grid(path, n, -4.0, 6.0)  # DPM-Solver's step is uniform in log-SNR
        z0, want = on_marginal(path, grid[0], U), on_marginal(path, grid[-1], U)
        errs["dpm"].append(float((dpm_solver_pp_2m(denoiser(path), z0, grid, path=path, parameterization="x0").x - want).abs().max()))
        errs["ddim"].append(float((ddim(denoiser(path), z0, grid, path=path, parameterization="x0").x - want).abs().max()))
    assert min(order(errs["dpm"])) > 1.8, errs  # second order: the error quarters when the step halves
    assert all(0.8 < o < 1.2 for o in order(errs["ddim"])), errs
    assert errs["dpm"][-1] < 0.05 * errs["ddim"][-1]


@pytest.mark.parametrize("path", [FlowMatchingSchedule(), VPCosineSchedule()], ids=["fm", "vp-cosine"])
def test_dpm_solver_pp_3m_beats_2m_by_its_error_constant(path):
    """3M's quadratic step is third order, but its first step (DDIM) leaves an O(h^2) error, so the
    whole solve converges at order 2, with an error constant 10-30x below 2M's."""
    e2, e3 = [], []
    for n in (64, 128, 256):
        grid = log_snr_grid(path, n, -4.0, 6.0)
        z0, want = on_marginal(path, grid[0], U), on_marginal(path, grid[-1], U)
        e2.append(float((dpm_solver_pp_2m(denoiser(path), z0, grid, path=path, parameterization="x0").x - want).abs().max()))
        e3.append(float((dpm_solver_pp_3m(denoiser(path), z0, grid, path=path, parameterization="x0").x - want).abs().max()))
    assert min(order(e3)) > 1.6, e3
    assert all(a < 0.1 * b for a, b in zip(e3, e2)), (e3, e2)
    # two tiny warm-up steps make the start exact enough to see the step's own third order
    e3 = []
    for n in (16, 32, 64, 128):
        lam = torch.cat([torch.tensor([-4.0, -4 + 1e-4], dtype=torch.float64), torch.linspace(-4 + 2e-4, 6, n + 1, dtype=torch.float64)])
        grid = time_from_log_snr(path, lam)
        z0, want = on_marginal(path, grid[0], U), on_marginal(path, grid[-1], U)
        e3.append(float((dpm_solver_pp_3m(denoiser(path), z0, grid, path=path, parameterization="x0").x - want).abs().max()))
    assert min(order(e3)) > 2.7, e3


def test_dpm_solver_pp_from_pure_noise_counts_one_call_per_step():
    path = FlowMatchingSchedule()
    z0 = torch.randn(16, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    for solver in (dpm_solver_pp_2m, dpm_solver_pp_3m):
        res = solver(denoiser(path), z0, time_grid(10), path=path, parameterization="x0")
        assert res.nfe == 10 and torch.isfinite(res.x).all()
        assert float((res.x - on_marginal(path, 1.0, z0)).abs().max()) < 0.02  # into the data end, where b = 0


@pytest.mark.parametrize("path", [FlowMatchingSchedule(), VPCosineSchedule()], ids=["fm", "vp-cosine"])
def test_edm_heun_is_second_order_on_karras_sigmas(path):
    errs, nfes = [], []
    for n in (8, 16, 32, 64):
        grid = times_from_sigmas(path, karras_sigmas(n, sigma_min=0.02, sigma_max=20.0))
        res = edm_heun(denoiser(path), on_marginal(path, grid[0], U), grid, path=path, parameterization="x0")
        errs.append(float((res.x - on_marginal(path, grid[-1], U)).abs().max()))
        nfes.append(res.nfe)
    assert min(order(errs)) > 1.9, errs
    assert nfes == [16, 32, 64, 128]  # two calls per step when the last sigma is > 0


def test_edm_heun_into_sigma_zero_and_churn_on_a_point_mass():
    # a point mass: the denoiser is the constant MU, so every sampler, stochastic or not, ends there
    path = FlowMatchingSchedule()
    grid = times_from_sigmas(path, karras_sigmas(6), append_data_end=True)
    const = lambda z, t: torch.full_like(z, MU)  # noqa: E731
    z0 = 20 * torch.randn(32, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    for s_churn in (0.0, 40.0):
        res = edm_heun(const, z0, grid, path=path, parameterization="x0", s_churn=s_churn, generator=torch.Generator().manual_seed(3))
        torch.testing.assert_close(res.x, torch.full_like(z0, MU), atol=1e-9, rtol=0)
        assert res.nfe == 2 * 7 - 1  # the step into sigma = 0 is a single Euler step
    a = edm_heun(denoiser(path), z0, grid, path=path, parameterization="x0", s_churn=40.0, generator=torch.Generator().manual_seed(5))
    b = edm_heun(denoiser(path), z0, grid, path=path, parameterization="x0", s_churn=40.0, generator=torch.Generator().manual_seed(5))
    c = edm_heun(denoiser(path), z0, grid, path=path, parameterization="x0", s_churn=40.0, generator=torch.Generator().manual_seed(6))
    assert torch.equal(a.x, b.x) and not torch.equal(a.x, c.x)
    with pytest.raises(RectflowError, match="alpha = 0"):
        edm_heun(const, z0, time_grid(4), path=path, parameterization="x0")


def test_edm_churn_keeps_the_gaussian_marginal():
    """The size of the churn noise: with the exact denoiser of Gaussian data, a heavily churned run
    still ends on the data's mean and spread (too little or too much noise moves the spread)."""
    path = FlowMatchingSchedule()
    grid = times_from_sigmas(path, karras_sigmas(39), append_data_end=True)
    z0 = on_marginal(path, grid[0], torch.randn(20000, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64))
    x = edm_heun(denoiser(path), z0, grid, path=path, parameterization="x0", s_churn=40.0, generator=torch.Generator().manual_seed(1)).x
    assert abs(float(x.std()) - S) < 0.04 and abs(float(x.mean()) - MU) < 0.02, (float(x.mean()), float(x.std()))


def test_edm_churn_never_raises_the_noise_above_what_the_schedule_expresses():
    """On DDPM's schedule sigma tops out at t = 0 (about 157); churn there would need a noise level the
    model cannot be told, so sigma-hat is capped at the schedule's largest sigma."""
    from rectflow.diffusion.schedules import DDPMSchedule
    path, told = DDPMSchedule(), []

    def spy(z, t):
        told.append(float(t[0]))
        return torch.zeros_like(z)

    z0 = 150 * torch.randn(4, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    grid = torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64)
    calm = edm_heun(spy, z0, grid, path=path, parameterization="x0", return_trajectory=True)
    churned = edm_heun(spy, z0, grid, path=path, parameterization="x0", s_churn=100.0, generator=torch.Generator().manual_seed(1),
                       return_trajectory=True)
    torch.testing.assert_close(churned.trajectory[1], calm.trajectory[1])  # the first step: no room to churn at sigma_max
    assert not torch.equal(churned.x, calm.x)  # the second step churns
    assert told[len(told) // 2] == 0.0


def test_edm_table_gives_unit_variance_input_and_target():
    sigma_data = 0.5
    for sigma in (0.01, 0.5, 3.0, 50.0):
        k = edm_coefficients(torch.tensor(sigma, dtype=torch.float64), sigma_data)
        assert float(k.c_in**2 * (sigma**2 + sigma_data**2)) == pytest.approx(1.0)  # Var(c_in (y + sigma n)) = 1
        # the network's target F = (y - c_skip x) / c_out has unit variance when y ~ N(0, sigma_data^2)
        var_target = ((1 - k.c_skip) ** 2 * sigma_data**2 + k.c_skip**2 * sigma**2) / k.c_out**2
        assert float(var_target) == pytest.approx(1.0)


@pytest.mark.parametrize("path", [FlowMatchingSchedule(), VPCosineSchedule()], ids=["fm", "vp-cosine"])
def test_edm_preconditioned_network_round_trips_through_our_parameterisations(path):
    g = torch.Generator().manual_seed(0)
    x_data = torch.randn(8, 3, generator=g, dtype=torch.float64)
    eps = torch.randn(8, 3, generator=g, dtype=torch.float64)
    t = torch.rand(8, generator=g, dtype=torch.float64) * 0.9 + 0.05
    c = path.coefficients(t)
    z = c.a[:, None] * x_data + c.b[:, None] * eps
    sigma = c.b / c.a

    def oracle(x_in, c_noise):  # the exact F: recover sigma from c_noise, y = z / a, F = (x - c_skip y) / c_out
        k = edm_coefficients(torch.exp(4 * c_noise))
        y = x_in / k.c_in[:, None]
        return (x_data - k.c_skip[:, None] * y) / k.c_out[:, None]

    model = EDMPreconditioned(oracle, path)
    torch.testing.assert_close(model(z, t), x_data)
    torch.testing.assert_close(torch.exp(4 * edm_coefficients(sigma).c_noise), sigma)
    velocity = ConvertedModel(model, path, src="x0", dst="velocity")(z, t)
    torch.testing.assert_close(velocity, c.da[:, None] * x_data + c.db[:, None] * eps)
