"""Weighted MSE in log-SNR: named weightings, training schedule vs weighting, any parameterisation (theory §6)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from rectflow.data import Gaussian, make_distribution
from rectflow.diffusion.parameterizations import PARAMETERIZATIONS, ConvertedModel
from rectflow.diffusion.schedules import FlowMatchingSchedule, VPCosineSchedule, VPLinearSchedule, log_snr, log_snr_derivative
from rectflow.diffusion.weighting import (
    DiffusionObjective,
    EDMWeighting,
    ELBOWeighting,
    FlowMatchingWeighting,
    LogSNRNormalTime,
    SD3Weighting,
    SigmoidWeighting,
    diffusion_loss,
    implied_weighting,
    log_snr_density,
    loss_factor,
    make_weighting,
    time_density,
)
from rectflow.flow.couplings import IndependentCoupling
from rectflow.flow.losses import FlowBatch, flow_matching_loss
from rectflow.flow.paths import LinearPath
from rectflow.flow.time_sampling import LogitNormalTime, UniformTime, UShapedTime

F64 = torch.float64
T = torch.linspace(0.01, 0.99, 99, dtype=F64)


def test_flow_matching_loss_is_the_flow_matching_weighting():
    fm = FlowMatchingSchedule()
    w = implied_weighting(fm, UniformTime(), "velocity", T)  # plain ||u-hat - u||^2 with t ~ U[0, 1]
    torch.testing.assert_close(w, FlowMatchingWeighting()(log_snr(fm, T)), rtol=1e-12, atol=0)
    torch.testing.assert_close(w, 0.5 * torch.exp(-log_snr(fm, T) / 2), rtol=1e-12, atol=0)


def test_v_mse_with_cosine_schedule_is_flow_matching_weighting_up_to_a_constant():
    cos = VPCosineSchedule()
    w = implied_weighting(cos, UniformTime(), "v", T)
    torch.testing.assert_close(w, (2 / math.pi) * FlowMatchingWeighting()(log_snr(cos, T)), rtol=1e-10, atol=0)


def test_sd3_is_flow_matching_with_logit_normal_time():
    fm = FlowMatchingSchedule()
    for m, s in ((0.0, 1.0), (0.5, 0.7)):
        w = implied_weighting(fm, LogitNormalTime(m, s), "velocity", T)
        torch.testing.assert_close(w, SD3Weighting(m, s)(log_snr(fm, T)), rtol=1e-10, atol=0)


def test_edm_weighting_gives_edm_loss_weight_on_the_x0_mse():
    for path in (VPCosineSchedule(), FlowMatchingSchedule(), VPLinearSchedule()):
        sampler = LogSNRNormalTime(path, 2.4, 2.4)  # ln sigma ~ N(-1.2, 1.2^2)
        factor = loss_factor(T, path=path, parameterization="x0", weighting=EDMWeighting(), time_sampler=sampler)
        sigma = torch.exp(-log_snr(path, T) / 2)
        torch.testing.assert_close(factor, (sigma**2 + 0.25) / (sigma * 0.5) ** 2, rtol=1e-9, atol=0)


def test_elbo_weighting_with_uniform_time_is_the_continuous_elbo():
    for path in (VPCosineSchedule(), FlowMatchingSchedule()):
        factor = loss_factor(T, path=path, parameterization="eps", weighting=ELBOWeighting(), time_sampler=UniformTime())
        torch.testing.assert_close(factor, log_snr_derivative(path, T), rtol=1e-12, atol=0)  # (d lambda / dt) ||eps-hat - eps||^2


def test_time_densities_integrate_to_one_and_match_histograms():
    fine = torch.linspace(1e-6, 1 - 1e-6, 200001, dtype=F64)
    cos = VPCosineSchedule()
    for sampler in (UniformTime(0.1), LogitNormalTime(0.3, 0.8), UShapedTime(4.0), LogSNRNormalTime(cos, 1.0, 2.0)):
        p = time_density(sampler, fine)
        assert abs(float(torch.trapezoid(p, fine)) - 1) < 1e-3, sampler
        draws = sampler(200_000, generator=torch.Generator().manual_seed(0)).double()
        hist = torch.histc(draws, bins=10, min=0, max=1) / draws.numel()
        edges = torch.linspace(0, 1, 11, dtype=F64)
        expected = torch.stack([torch.trapezoid(p[(fine >= lo) & (fine < hi)], fine[(fine >= lo) & (fine < hi)])
                                for lo, hi in zip(edges, edges[1:])])
        assert float((hist - expected).abs().max()) < 5e-3, sampler
    with pytest.raises(TypeError, match="density"):
        time_density(lambda n, generator=None, device=None: torch.rand(n), T)


def test_weighting_does_not_depend_on_the_training_schedule():
    """E_{t ~ p_T}[factor(t) f(t)] = int w(lambda) f dlambda / r_K for every sampler: factor * p_T is sampler-free."""
    path = VPCosineSchedule()
    samplers = (UniformTime(), LogitNormalTime(-0.5, 1.3), UShapedTime(3.0), LogSNRNormalTime(path, 0.0, 3.0))
    for weighting in (ELBOWeighting(), SD3Weighting(), EDMWeighting(), SigmoidWeighting(2.0)):
        for kind in ("eps", "x0", "v"):
            ref = None
            for sampler in samplers:
                prod = loss_factor(T, path=path, parameterization=kind, weighting=weighting, time_sampler=sampler) * time_density(sampler, T)
                ref = prod if ref is None else ref
                torch.testing.assert_close(prod, ref, rtol=1e-9, atol=0)
    lam_density = log_snr_density(path, UniformTime(), T)  # p(lambda) for t ~ U with the cosine schedule
    lam = log_snr(path, T)
    torch.testing.assert_close(lam_density, torch.exp(-lam / 2) / (1 + torch.exp(-lam)) / math.pi, rtol=1e-10, atol=0)


class _FixedEps(nn.Module):
    """A fixed (untrained) eps-model, smooth in z and t."""

    def forward(self, z, t):
        return torch.tanh(z) * (1 + t[:, None]) - 0.3 * z.flip(1)


def _batch(n=512, seed=0, sampler=UniformTime(0.01)):
    g = torch.Generator().manual_seed(seed)
    x0, x1 = torch.randn(n, 2, generator=g, dtype=F64), torch.randn(n, 2, generator=g, dtype=F64) * 0.5 + 1
    return FlowBatch(x0, x1, sampler(n, generator=g).double())


@pytest.mark.parametrize("path", [VPCosineSchedule(), FlowMatchingSchedule(), VPLinearSchedule()], ids=repr)
def test_same_weighted_loss_in_every_parameterisation(path):
    """Training an eps-, x0-, v-, velocity- or u-model with weighting w is the same loss (the loss identities)."""
    sampler = LogitNormalTime(0.0, 1.0)
    batch = _batch(sampler=sampler)
    base = _FixedEps()
    for weighting in (ELBOWeighting(), FlowMatchingWeighting(), EDMWeighting()):
        losses = {}
        for kind in PARAMETERIZATIONS:
            obj = DiffusionObjective(None, path, kind, weighting=weighting, time_sampler=sampler)
            losses[kind] = obj.loss(ConvertedModel(base, path, "eps", kind), batch).loss
        for kind, value in losses.items():
            torch.testing.assert_close(value, losses["eps"], rtol=1e-9, atol=0, msg=f"{weighting}: {kind}")
    # without a weighting each parameterisation trains its own plain MSE, which differ
    plain = {k: DiffusionObjective(None, path, k).loss(ConvertedModel(base, path, "eps", k), batch).loss for k in ("eps", "x0")}
    assert abs(float(plain["eps"] - plain["x0"])) > 1e-3


def test_sd3_objective_equals_the_rectified_flow_loss():
    sampler = LogitNormalTime(0.0, 1.0)
    batch = _batch(sampler=sampler)
    model = ConvertedModel(_FixedEps(), FlowMatchingSchedule(), "eps", "velocity")
    obj = DiffusionObjective(None, FlowMatchingSchedule(), "velocity", weighting=SD3Weighting(), time_sampler=sampler)
    torch.testing.assert_close(obj.sample_weight(batch.t), torch.ones_like(batch.t), rtol=1e-10, atol=0)
    ref = flow_matching_loss(model, batch.x0, batch.x1, batch.t, path=LinearPath())
    out = obj.loss(model, batch)
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-12, atol=0)
    torch.testing.assert_close(out.per_sample, ref.per_sample, rtol=1e-12, atol=0)


def _mc(obj, model, sampler, kind, n_batches=10):
    vals = torch.tensor([float(obj.loss(ConvertedModel(model, obj.path, "eps", kind), _batch(n=4000, seed=s, sampler=sampler)).loss)
                         for s in range(n_batches)])
    return float(vals.mean()), float(vals.std() / math.sqrt(n_batches))


def test_weighted_loss_is_an_importance_sampled_expectation():
    """Monte Carlo: the weighted loss under two different training schedules estimates the same number."""
    path, model = VPCosineSchedule(), _FixedEps()
    uniform, u_shaped = UniformTime(), UShapedTime(3.0)
    m1, s1 = _mc(DiffusionObjective(None, path, "x0", weighting=EDMWeighting(), time_sampler=uniform), model, uniform, "x0")
    m2, s2 = _mc(DiffusionObjective(None, path, "v", weighting=EDMWeighting(), time_sampler=u_shaped), model, u_shaped, "v")
    assert s1 < 0.02 * m1 and s2 < 0.02 * m2
    assert abs(m1 - m2) < 4 * math.hypot(s1, s2), (m1, s1, m2, s2)
    # control: U-shaped draws weighted as if they were uniform estimate something else
    m3, s3 = _mc(DiffusionObjective(None, path, "x0", weighting=EDMWeighting(), time_sampler=uniform), model, u_shaped, "x0")
    assert abs(m3 - m1) > 8 * math.hypot(s1, s3), (m1, s1, m3, s3)


def test_objective_draws_reproducibly_and_validates():
    coupling = IndependentCoupling(Gaussian(2), make_distribution("moons"))
    obj = DiffusionObjective(coupling, VPCosineSchedule(), "eps", weighting=make_weighting("sd3", mean=0.2))
    b1, b2 = obj.draw(8, torch.Generator().manual_seed(3), "cpu"), obj.draw(8, torch.Generator().manual_seed(3), "cpu")
    assert all(torch.equal(u, v) for u, v in zip(b1, b2))
    assert bool(((b1.t > 0) & (b1.t < 1)).all())
    with pytest.raises(ValueError, match="unknown weighting"):
        make_weighting("p2")
    with pytest.raises(ValueError, match="unknown parameterization"):
        DiffusionObjective(coupling, VPCosineSchedule(), "score")
    with pytest.raises(ValueError, match="time_sampler"):
        diffusion_loss(_FixedEps(), b1.x0, b1.x1, b1.t, path=VPCosineSchedule(), weighting=ELBOWeighting())
