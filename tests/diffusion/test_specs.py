"""The one sampling verb: every registered spec restores the model's mode, returns no graph, refuses non-finite output,
batches exactly, guides with the library's one CFG combination and counts NFE."""

import math

import pytest
import torch
from torch import nn

from rectflow.diffusion.specs import SPECS, parse_spec, sample, spec_label
from rectflow.errors import ConfigError
from rectflow.flow.guidance import NULL_LABEL
from tests.conftest import gen

SPEC_OF = {name: name if entry.min_steps is None else f"{name}:{max(3, entry.min_steps)}" for name, entry in SPECS.items()}
NFE = {"euler:3": 3, "midpoint:3": 6, "heun:3": 6, "rk4:3": 12, "dpm++2m:3": 3, "dpm++3m:3": 3, "edm:3": 5, "meanflow:3": 3, "perflow:3": 3}


def windows_grid(steps: int) -> torch.Tensor:
    """A non-uniform grid of ``steps`` steps (what a PeRFlow student's ``sampling_grid`` gives ``perflow:N``)."""
    return torch.linspace(0, 1, steps + 1, dtype=torch.float64) ** 2


class Linear(nn.Module):
    """v(x, t) = A x + b t (u(x, s, t) for mean-flow specs); a dropout layer makes train / eval mode visible in the output,
    ``calls`` counts network evaluations per sample (rows seen / batch)."""

    def __init__(self, dim: int = 3, mean_flow: bool = False, conditional: bool = False) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.a = nn.Parameter(0.3 * torch.randn(dim, dim, generator=g))
        self.b = nn.Parameter(torch.randn(dim, generator=g))
        self.emb = nn.Parameter(torch.randn(11, dim, generator=g)) if conditional else None
        self.drop, self.mean_flow, self.rows = nn.Dropout(0.5), mean_flow, 0

    def forward(self, x, t, *rest):
        self.rows += x.shape[0]
        if self.mean_flow:
            s, t = t, rest[0]
            out = x @ self.a.T + self.b * (t - s)[:, None]
        else:
            out = x @ self.a.T + self.b * t[:, None]
        if self.emb is not None:
            y = rest[0]
            out = out + self.emb[torch.where(y == NULL_LABEL, 10, y)]  # row 10: the null condition
        return self.drop(out)

    def sampling_grid(self, steps: int) -> torch.Tensor:
        return windows_grid(steps)


def _model(name: str, **kw) -> Linear:
    return Linear(mean_flow=SPECS[name].mean_flow, **kw)


@pytest.mark.parametrize("name", list(SPECS))
@pytest.mark.parametrize("training", [True, False])
def test_every_spec_restores_the_mode_and_returns_no_graph(name, training):
    model = _model(name).train(training)
    x = torch.randn(5, 3, requires_grad=True)
    res = sample(model, x, SPEC_OF[name], mean_flow=SPECS[name].mean_flow)
    assert model.training is training
    assert not res.x.requires_grad and res.x.grad_fn is None
    assert torch.isfinite(res.x).all() and res.x.shape == x.shape
    again = sample(model, x, SPEC_OF[name], mean_flow=SPECS[name].mean_flow)  # eval mode inside: dropout off, so the result is deterministic
    assert torch.equal(res.x, again.x)


@pytest.mark.parametrize("name", list(SPECS))
def test_every_spec_refuses_non_finite_samples(name):
    model = _model(name)
    with torch.no_grad():
        model.b.fill_(math.nan)
    with pytest.raises(FloatingPointError, match="NaN"):
        sample(model, torch.randn(4, 3), SPEC_OF[name], mean_flow=SPECS[name].mean_flow)


@pytest.mark.parametrize("name", list(SPECS))
def test_batches_are_the_unbatched_solve_and_nfe_is_per_sample(name):
    model = _model(name)
    x = torch.randn(7, 3)
    whole = sample(model, x, SPEC_OF[name], mean_flow=SPECS[name].mean_flow)
    model.rows = 0
    parts = sample(model, x, SPEC_OF[name], batch_size=3, mean_flow=SPECS[name].mean_flow)
    torch.testing.assert_close(parts.x, whole.x, rtol=1e-5, atol=1e-6)
    assert parts.nfe == whole.nfe
    if SPEC_OF[name] in NFE:
        assert whole.nfe == NFE[SPEC_OF[name]] == model.rows // 7


@pytest.mark.parametrize("name", [n for n, e in SPECS.items() if not e.mean_flow])
def test_guidance_is_the_cfg_combination_of_the_two_velocities_and_costs_twice(name):
    """With a velocity linear in its condition term, guided sampling = sampling the explicitly combined field."""
    model = Linear(conditional=True)
    y = torch.tensor([0, 3, 5, 9])
    x = torch.randn(4, 3)
    w = 2.5

    class Combined(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = model  # a submodule: sample() puts it in eval mode too

        def forward(self, z, t):
            null = torch.full_like(y[: z.shape[0]], NULL_LABEL)
            return self.inner(z, t, null) + w * (self.inner(z, t, y) - self.inner(z, t, null))

        def sampling_grid(self, steps: int) -> torch.Tensor:
            return windows_grid(steps)

    ref = sample(Combined(), x, SPEC_OF[name], rtol=1e-7, atol=1e-7)
    res = sample(model, x, SPEC_OF[name], cond=y, guidance=w, rtol=1e-7, atol=1e-7)
    torch.testing.assert_close(res.x, ref.x, rtol=1e-4, atol=1e-5)
    model.rows = 0
    res = sample(model, x, SPEC_OF[name], cond=y, guidance=w, rtol=1e-7, atol=1e-7)
    assert res.nfe == model.rows // 4  # guided: every evaluation runs the network on 2 x 4 rows and counts 2
    plain = sample(model, x, SPEC_OF[name], cond=y)
    if name != "dopri5":  # adaptive: the guided field takes its own steps
        assert res.nfe == 2 * plain.nfe
    chunked = sample(model, x, SPEC_OF[name], cond=y, guidance=w, batch_size=3, rtol=1e-7, atol=1e-7)
    torch.testing.assert_close(chunked.x, res.x, rtol=1e-4, atol=1e-5)


def test_perflow_specs_integrate_on_the_models_own_grid_and_refuse_models_without_one():
    model = Linear()
    x = torch.randn(4, 3)
    res = sample(model, x, "perflow:5", trajectory=True)
    torch.testing.assert_close(res.times, windows_grid(5))
    ref = x
    for t, t_next in zip(res.times[:-1], res.times[1:]):  # Euler on that grid, by hand
        ref = ref + (t_next - t).float() * model.eval()(ref, t.float().expand(4))
    torch.testing.assert_close(res.x, ref, rtol=1e-5, atol=1e-6)

    class Plain(nn.Module):
        def forward(self, x, t):
            return x

    with pytest.raises(ConfigError, match="perflow:N samples a PeRFlow student .* not one: use euler:N"):
        sample(Plain(), x, "perflow:4")
    with pytest.raises(ConfigError, match="PeRFlow student"):  # checked up front (configs, the CLI, pair stores) too
        parse_spec("perflow:4")
    assert parse_spec("perflow:4", windows=True) == ("perflow", 4) and parse_spec("euler:4", windows=True) == ("euler", 4)


def test_trajectories_hold_every_grid_state():
    res = sample(Linear(), torch.randn(4, 3), "heun:5", trajectory=True)
    assert res.trajectory.shape == (6, 4, 3) and torch.equal(res.trajectory[-1], res.x)
    chunked = sample(Linear(), torch.randn(4, 3), "dpm++2m:5", trajectory=True, batch_size=3)
    assert chunked.trajectory.shape == (6, 4, 3)


@pytest.mark.parametrize("spec, parsed", [("euler:4", ("euler", 4)), ("rk4:1", ("rk4", 1)), ("heun:10", ("heun", 10)), ("dopri5", ("dopri5", None)),
                                          ("dpm++3m:4", ("dpm++3m", 4)), ("edm:2", ("edm", 2)), ("meanflow:1", ("meanflow", 1))])
def test_specs_parse_and_round_trip(spec, parsed):
    assert parse_spec(spec, mean_flow=spec.startswith("meanflow")) == parsed and spec_label(*parsed) == spec


@pytest.mark.parametrize("spec, msg", [("euler", "integer"), ("euler:0", "must be >= 1"), ("euler:-1", "integer number of steps >= 1"), ("euler:two", "integer"),
                                       ("dopri5:3", "adaptive"), ("foo:2", "dpm\\+\\+2m"), ("rk45", "unknown"), ("edm:1", "must be >= 2"),
                                       ("dpm++2m", "integer"), ("ddim:3", "unknown"), ("", "unknown"), ("meanflow:1", "average-velocity")])
def test_bad_specs_are_config_errors_naming_the_problem(spec, msg):
    with pytest.raises(ConfigError, match=msg):
        parse_spec(spec)


def test_guidance_without_conditions_and_bad_batch_sizes_are_refused():
    with pytest.raises(ConfigError, match="needs conditions"):
        sample(Linear(), torch.randn(2, 3), "euler:2", guidance=3.0)
    with pytest.raises(ConfigError, match="batch_size"):
        sample(Linear(), torch.randn(2, 3), "euler:2", batch_size=0)
    with pytest.raises(ConfigError, match="meanflow"):
        sample(Linear(mean_flow=True), torch.randn(2, 3), "meanflow:2", cond=torch.tensor([0, 1]), mean_flow=True)


class GaussianFlow(nn.Module):
    """The exact marginal velocity from N(0, I) to N(MU, S^2 I) on the straight path (independent pairs)."""

    def __init__(self, mu=(1.0, -2.0), s=0.5):
        super().__init__()
        self.register_buffer("mu", torch.tensor(mu))
        self.s = s
        self.dummy = nn.Parameter(torch.zeros(()))  # a parameter, so evaluation finds the device

    def forward(self, x, t):
        t = t.reshape(-1, 1).to(x.dtype)
        s2 = (1 - t) ** 2 + t**2 * self.s**2
        return self.mu + 0.5 * (-2 * (1 - t) + 2 * t * self.s**2) / s2 * (x - t * self.mu)


def test_diffusion_samplers_on_a_velocity_model_reach_the_exact_flow_map():
    model = GaussianFlow()
    x0 = torch.randn(256, 2, generator=gen(), dtype=torch.float64)
    exact = model.mu.double() + model.s * x0  # the flow keeps each point's standardised coordinate

    def err(spec):
        res = sample(model, x0, spec)
        return float((res.x - exact).abs().max()), res.nfe

    dpm, nfe = err("dpm++2m:10")
    euler = float((sample(model, x0, "euler:10").x - exact).abs().max())
    assert nfe == 10 and dpm < 0.5 * euler, (dpm, euler)  # more accurate than Euler at the same NFE
    dpm3, nfe3 = err("dpm++3m:10")
    assert nfe3 == 10 and dpm3 < euler, (dpm3, euler)  # from pure noise on uniform t: the first steps stay low order
    (e12, n12), (e24, n24) = err("edm:12"), err("edm:24")
    assert (n12, n24) == (23, 47) and e12 / e24 > 3  # second order on Karras sigmas
    assert e24 < 0.1  # EDM starts at sigma = 80 and drops the data's 1/81 share of the state there


# ----- review findings (helper-3): each seen failing before its fix


def test_a_mean_flow_spec_is_refused_where_a_velocity_model_is_sampled():
    """meanflow:N calls model(x, s, t): parse_spec refuses it unless the caller samples average-velocity models."""
    with pytest.raises(ConfigError, match="meanflow"):
        parse_spec("meanflow:1")
    assert parse_spec("meanflow:1", mean_flow=True) == ("meanflow", 1)
    with pytest.raises(ConfigError, match="average-velocity"):
        sample(Linear(), torch.randn(2, 3), "meanflow:1", mean_flow=False)


def test_conditions_must_have_a_row_per_sample():
    model = Linear(conditional=True)
    with pytest.raises(ConfigError, match="3 rows .* 5 samples"):
        sample(model, torch.randn(5, 3), "euler:2", cond=torch.tensor([1, 2, 3]), batch_size=2)


def test_a_per_row_null_condition_is_split_with_the_batch():
    class Text(nn.Module):
        def forward(self, x, t, c):
            return x * 0.1 + c.mean(dim=(1, 2))[:, None]

    x, cond, null = torch.randn(6, 3), torch.randn(6, 4, 5), torch.randn(6, 4, 5)
    whole = sample(Text(), x, "heun:3", cond=cond, guidance=3.0, null_cond=null)
    parts = sample(Text(), x, "heun:3", cond=cond, guidance=3.0, null_cond=null, batch_size=4)
    torch.testing.assert_close(parts.x, whole.x)


def test_batched_adaptive_trajectories_are_refused_not_dropped():
    with pytest.raises(ConfigError, match="trajectory"):
        sample(Linear(), torch.randn(4, 3), "dopri5", trajectory=True, batch_size=2)


@pytest.mark.parametrize("spec", ["euler: 4", "euler:1_000", "euler:+3", "euler:99999999999"])
def test_step_counts_are_plain_bounded_integers(spec):
    with pytest.raises(ConfigError, match="solver"):
        parse_spec(spec)
