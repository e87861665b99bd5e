"""Noise schedules as affine paths: time convention, derivatives, log-SNR and its inverse, grids (theory §1, 6)."""

from __future__ import annotations

import math

import pytest
import torch

from rectflow.diffusion.schedules import (
    CustomSchedule,
    DDPMSchedule,
    DiscreteFlowMatchingSchedule,
    FlowMatchingSchedule,
    RescaledSchedule,
    VPCosineSchedule,
    VPLinearSchedule,
    diffusion_time,
    flow_match_grid,
    karras_sigmas,
    log_snr,
    log_snr_derivative,
    log_snr_grid,
    shift_time,
    time_from_log_snr,
    times_from_sigmas,
    variance_preserving,
)
from rectflow.flow.paths import LinearPath

F64 = torch.float64


def _schedules():
    fm = FlowMatchingSchedule()
    return {
        "fm": fm,
        "vp_cosine": VPCosineSchedule(),
        "vp_linear": VPLinearSchedule(),
        "ddpm": DDPMSchedule(),
        "ddpm_scaled": DDPMSchedule(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
        "custom": CustomSchedule(lambda s: 1 - s**2, lambda s: torch.sqrt(s)),
        "rescaled": RescaledSchedule(fm, lambda s: torch.exp(torch.sin(3 * s))),
        "fm_as_vp": variance_preserving(fm),
    }


SCHEDULES = _schedules()
VP = ["vp_cosine", "vp_linear", "ddpm", "ddpm_scaled", "fm_as_vp"]


def test_diffusion_time_is_an_involution_and_flips_the_ends():
    t = torch.tensor([0.0, 0.25, 1.0], dtype=F64)
    assert torch.equal(diffusion_time(diffusion_time(t)), t)
    assert diffusion_time(0.0) == 1.0 and diffusion_time(1.0) == 0.0  # t = 0 (source) is s = 1 (noise)


@pytest.mark.parametrize("name", sorted(SCHEDULES))
def test_path_is_z_equals_alpha_x_plus_sigma_eps_in_diffusion_time(name):
    sch = SCHEDULES[name]
    g = torch.Generator().manual_seed(0)
    x, eps = torch.randn(16, 3, generator=g, dtype=F64), torch.randn(16, 3, generator=g, dtype=F64)
    t = torch.rand(16, generator=g, dtype=F64)
    s = 1 - t
    expected = sch.alpha(s)[:, None] * x + sch.sigma(s)[:, None] * eps
    torch.testing.assert_close(sch.interpolate(eps, x, t), expected, rtol=0, atol=1e-14)  # X0 = eps, X1 = x
    # the data end t = 1 is clean data for every schedule
    one = torch.ones(16, dtype=F64)
    torch.testing.assert_close(sch.interpolate(eps, x, one), x * sch.alpha(torch.zeros(16, dtype=F64))[:, None], rtol=0, atol=1e-14)
    assert torch.all(sch.sigma(torch.zeros(1, dtype=F64)) == 0)


@pytest.mark.parametrize("name", sorted(SCHEDULES))
def test_time_derivatives_match_finite_differences(name):
    sch = SCHEDULES[name]
    t = torch.tensor([0.1234, 0.3071, 0.5555, 0.7123, 0.9037], dtype=F64)  # off the DDPM knots n / 1000
    h = 1e-7
    c, cp, cm = sch.coefficients(t), sch.coefficients(t + h), sch.coefficients(t - h)
    torch.testing.assert_close(c.da, (cp.a - cm.a) / (2 * h), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(c.db, (cp.b - cm.b) / (2 * h), rtol=1e-6, atol=1e-7)
    lp, lm = log_snr(sch, t + h), log_snr(sch, t - h)
    torch.testing.assert_close(log_snr_derivative(sch, t), (lp - lm) / (2 * h), rtol=1e-6, atol=1e-6)
    assert bool((log_snr_derivative(sch, t) > 0).all())  # SNR grows towards the data


def test_flow_matching_schedule_is_the_rectified_flow_line():
    g = torch.Generator().manual_seed(1)
    x0, x1, t = torch.randn(8, 2, generator=g, dtype=F64), torch.randn(8, 2, generator=g, dtype=F64), torch.rand(8, generator=g, dtype=F64)
    fm, lin = FlowMatchingSchedule(), LinearPath()
    torch.testing.assert_close(fm.interpolate(x0, x1, t), lin.interpolate(x0, x1, t), rtol=0, atol=1e-15)
    torch.testing.assert_close(fm.velocity(x0, x1, t), x1 - x0, rtol=0, atol=0)


@pytest.mark.parametrize("name", VP)
def test_variance_preserving_schedules(name):
    s = torch.linspace(0, 1, 101, dtype=F64)
    sch = SCHEDULES[name]
    torch.testing.assert_close(sch.alpha(s) ** 2 + sch.sigma(s) ** 2, torch.ones_like(s), rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", sorted(SCHEDULES))
def test_log_snr_and_its_inverse(name):
    sch = SCHEDULES[name]
    t = torch.linspace(0.02, 0.98, 49, dtype=F64)
    c = sch.coefficients(t)
    lam = log_snr(sch, t)
    torch.testing.assert_close(lam, torch.log(c.a**2 / c.b**2), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(time_from_log_snr(sch, lam), t, rtol=0, atol=1e-10)
    ends = time_from_log_snr(sch, torch.tensor([-math.inf, math.inf], dtype=F64))
    assert ends.tolist() == [0.0, 1.0]


def test_closed_form_inverses_agree_with_bisection():
    # CustomSchedule has no closed-form inverse: it bisects; the built-in schedules use closed forms.
    lam = torch.linspace(-12, 12, 25, dtype=F64)
    pairs = [
        (VPCosineSchedule(), CustomSchedule(lambda s: torch.cos(math.pi * s / 2), lambda s: torch.sin(math.pi * s / 2))),
        (FlowMatchingSchedule(), CustomSchedule(lambda s: 1 - s, lambda s: s)),
        (VPLinearSchedule(0.1, 20.0), CustomSchedule(lambda s: torch.exp(-0.5 * (0.1 * s + 9.95 * s * s)),
                                                     lambda s: torch.sqrt(-torch.expm1(-(0.1 * s + 9.95 * s * s))))),
    ]
    for closed, bisect in pairs:
        lam_in = lam.clamp(float(log_snr(closed, torch.tensor([0.001], dtype=F64))), 12)
        torch.testing.assert_close(closed.t_from_log_snr(lam_in), bisect.t_from_log_snr(lam_in), rtol=0, atol=1e-12)
    lin = LinearPath()  # the plain rectified-flow path is the FM schedule
    torch.testing.assert_close(time_from_log_snr(lin, lam), torch.sigmoid(lam / 2), rtol=0, atol=1e-15)


def test_ddpm_schedule_matches_discrete_alphas_cumprod():
    sch = DDPMSchedule()
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=F64)
    abar = torch.cumprod(1 - betas, 0)
    n = torch.arange(1000)
    t = sch.timestep_to_t(n.to(F64))
    torch.testing.assert_close(sch.coefficients(t).a ** 2, abar, rtol=1e-12, atol=0)
    torch.testing.assert_close(sch.t_to_timestep(t), n.to(F64), rtol=0, atol=1e-9)
    # between knots the path interpolates log(abar) linearly in s
    s_mid = (n[:-1].to(F64) + 1.5) / 1000
    torch.testing.assert_close(sch.alpha(s_mid) ** 2, torch.sqrt(abar[:-1] * abar[1:]), rtol=1e-12, atol=0)
    with pytest.raises(ValueError, match="betas"):
        DDPMSchedule(torch.tensor([0.1, 1.5]))
    with pytest.raises(ValueError, match="beta_schedule"):
        DDPMSchedule(beta_schedule="cosine")


def test_vp_linear_matches_the_integral_of_beta():
    sch = VPLinearSchedule(beta_min=0.1, beta_max=20.0)
    s = torch.linspace(0, 1, 20001, dtype=F64)
    beta = 0.1 + s * (20.0 - 0.1)
    integral = torch.cat([torch.zeros(1, dtype=F64), torch.cumulative_trapezoid(beta, s)])
    torch.testing.assert_close(sch.alpha(s), torch.exp(-0.5 * integral), rtol=1e-9, atol=1e-12)


def test_custom_schedule_is_validated():
    with pytest.raises(ValueError, match="decrease strictly"):
        CustomSchedule(lambda s: torch.ones_like(s), lambda s: 0.5 + 0 * s)
    with pytest.raises(ValueError, match="finite"):
        CustomSchedule(lambda s: 1 - 2 * s, lambda s: s)


def test_rescaling_keeps_log_snr():
    base, resc = SCHEDULES["fm"], SCHEDULES["rescaled"]
    t = torch.linspace(0.05, 0.95, 19, dtype=F64)
    torch.testing.assert_close(log_snr(resc, t), log_snr(base, t), rtol=0, atol=1e-12)
    c = torch.exp(torch.sin(3 * (1 - t)))
    torch.testing.assert_close(resc.coefficients(t).a, c * base.coefficients(t).a, rtol=1e-14, atol=0)


def test_sd3_time_shift():
    t = torch.linspace(0, 1, 11, dtype=F64)
    s = 1 - t
    for shift in (1.0, 3.0, 0.5):
        sd3 = 1 - shift * s / (1 + (shift - 1) * s)  # SD3's shifted sigma, mapped back to our t
        torch.testing.assert_close(shift_time(t, shift), sd3, rtol=0, atol=1e-12)
    cos = VPCosineSchedule()
    shifted = shift_time(t, 3.0, cos)
    assert shifted[0] == 0 and shifted[-1] == 1
    inner = slice(1, -1)
    torch.testing.assert_close(log_snr(cos, shifted[inner]), log_snr(cos, t[inner]) - 2 * math.log(3.0), rtol=0, atol=1e-9)
    assert bool((shifted[inner] < t[inner]).all())  # shift > 1: more time at high noise
    with pytest.raises(ValueError):
        shift_time(t, 0.0)


def test_flow_match_shift_round_trips_and_warps_only_the_grid():
    """theory §6.10: the shift by s is undone by the shift by 1/s; the path is the straight line at every shift."""
    t = torch.linspace(0, 1, 101, dtype=F64)
    for shift in (3.0, 0.5, 7.0):
        torch.testing.assert_close(shift_time(shift_time(t, shift), 1 / shift), t, rtol=0, atol=1e-12)
        sigma = 1 - shift_time(t, shift)  # closed form both ways: sigma' = s u / (1 + (s - 1) u), u = sigma' / (s - (s - 1) sigma')
        torch.testing.assert_close(sigma / (shift - (shift - 1) * sigma), 1 - t, rtol=0, atol=1e-12)
        sch = DiscreteFlowMatchingSchedule(1000, shift)
        for got, want in zip(sch.coefficients(t), FlowMatchingSchedule().coefficients(t)):
            torch.testing.assert_close(got, want, rtol=0, atol=0)
        torch.testing.assert_close(sch.t_to_timestep(t), (1 - t) * 1000, rtol=0, atol=1e-12)
        torch.testing.assert_close(sch.timestep_to_t(sch.t_to_timestep(t)), t, rtol=0, atol=1e-12)
    for k in (1, 2, 5, 28):
        g = flow_match_grid(k, 3.0, 1000)
        assert g.dtype == F64 and g.shape == (k + 1,) and g[0] == 0 and g[-1] == 1 and bool((g[1:] > g[:-1]).all())
        u = torch.linspace(1, 1 - float(shift_time(torch.tensor([1 - 1e-3], dtype=F64), 3.0)[0]), k, dtype=F64)
        torch.testing.assert_close(1 - g[:-1], 3 * u / (1 + 2 * u), rtol=0, atol=1e-12)  # the stock scheduler's levels
    torch.testing.assert_close(flow_match_grid(3, 1.0, 10), torch.tensor([0, 0.45, 0.9, 1], dtype=F64), rtol=0, atol=1e-12)
    with pytest.raises(ValueError):
        flow_match_grid(0)
    with pytest.raises(ValueError):
        DiscreteFlowMatchingSchedule(1000, 0.0)


def test_sampler_grids():
    cos = VPCosineSchedule()
    g = log_snr_grid(cos, 8, -6.0, 6.0)
    torch.testing.assert_close(log_snr(cos, g), torch.linspace(-6, 6, 9, dtype=F64), rtol=0, atol=1e-10)
    sig = karras_sigmas(10, 0.002, 80.0, rho=7.0)
    assert sig.shape == (11,) and abs(float(sig[0]) - 80.0) < 1e-10 and abs(float(sig[-1]) - 0.002) < 1e-14
    assert bool((sig[1:] < sig[:-1]).all())
    for sch in (cos, SCHEDULES["fm"], SCHEDULES["ddpm"]):
        t = times_from_sigmas(sch, sig.clamp(max=50.0), append_data_end=True)
        c = sch.coefficients(t[:-1])
        torch.testing.assert_close(c.b / c.a, sig.clamp(max=50.0), rtol=1e-9, atol=0)  # EDM sigma = sigma_s / alpha_s
        assert t[-1] == 1.0 and bool((t[1:] > t[:-1]).all())
    fm_sigmas = torch.tensor([1.0, 0.75, 0.3, 0.0], dtype=F64)
    torch.testing.assert_close(times_from_sigmas(SCHEDULES["fm"], fm_sigmas, kind="schedule"), 1 - fm_sigmas, rtol=0, atol=1e-15)
    with pytest.raises(ValueError, match="kind"):
        times_from_sigmas(cos, sig, kind="bogus")
