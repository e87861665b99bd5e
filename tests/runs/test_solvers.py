"""Solver specs by one name (runs/solvers.py): the diffusion samplers on a velocity model, checked
against the flow solvers they approximate; and the NLL evaluation of a run (theory §3.4, §6.9)."""

import json
import math

import pytest
import torch
from torch import nn

from rectflow.cli import main
from rectflow.errors import ConfigError
from rectflow.flow.sampling import sample_model
from rectflow.runs.config import config_from_dict
from rectflow.runs.evaluation import evaluate_nll, evaluate_solvers
from rectflow.runs.experiment import load_run, train_run
from rectflow.runs.solvers import check_solver, solve_spec
from tests.conftest import gen


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
        res = solve_spec(model, x0, spec)
        return float((res.x - exact).abs().max()), res.nfe

    dpm, nfe = err("dpm++2m:10")
    euler = float((sample_model(model, x0, method="euler", steps=10).x - exact).abs().max())
    assert nfe == 10 and dpm < 0.5 * euler, (dpm, euler)  # more accurate than Euler at the same NFE
    dpm3, nfe3 = err("dpm++3m:10")
    assert nfe3 == 10 and dpm3 < euler, (dpm3, euler)  # from pure noise on uniform t: the first steps stay low order
    (e12, n12), (e24, n24) = err("edm:12"), err("edm:24")
    assert (n12, n24) == (23, 47) and e12 / e24 > 3  # second order on Karras sigmas
    assert e24 < 0.1  # EDM starts at sigma = 80 and drops the data's 1/81 share of the state there


def test_solver_specs_are_checked_with_the_diffusion_names_in_the_message():
    assert check_solver("dpm++3m:4") == ("dpm++3m", 4) and check_solver("dpm++2m:4") == ("dpm++2m", 4) and check_solver("euler:3") == ("euler", 3) and check_solver("dopri5") == ("dopri5", None)
    for bad, msg in [("dpm++2m", "integer"), ("edm:1", "at least 2"), ("magic:3", "dpm\\+\\+2m")]:
        with pytest.raises(ConfigError, match=msg):
            check_solver(bad)
    rows = evaluate_solvers(GaussianFlow(), torch.randn(64, 2, generator=gen(1)), torch.randn(64, 2, generator=gen(2)), ["dpm++2m:4", "edm:3"], progress=False)
    assert [r["solver"] for r in rows] == ["dpm++2m:4", "edm:3"] and [r["nfe"] for r in rows] == [4, 5]


def test_eval_nll_of_a_run_on_the_cli(tmp_path, capsys):
    cfg = {"source": "gaussian", "target": "moons", "model": {"width": 16, "depth": 2, "time_dim": 8},
           "train": {"steps": 30, "batch_size": 32, "progress": False, "log_every": 10, "ckpt_every": 30, "device": "cpu"},
           "eval": {"n_samples": 64, "seed": 7, "solvers": ["euler:2", "dpm++2m:4"], "rtol": 1e-4, "atol": 1e-4}}
    train_run(config_from_dict(cfg), tmp_path / "r")
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "r"), "--nll", "--n", "64"]) == 0
    out = capsys.readouterr().out
    assert "dpm++2m:4" in out and "NLL" in out and "exact divergence" in out
    saved = json.loads((tmp_path / "r" / "nll.json").read_text())
    direct = evaluate_nll(load_run(tmp_path / "r"), n=64, rtol=1e-4, atol=1e-4)
    assert saved["nll_nats"] == pytest.approx(direct["nll_nats"]) and math.isfinite(saved["nll_nats"]) and saved["n"] == 64
    hutch = evaluate_nll(load_run(tmp_path / "r"), n=64, estimator="hutchinson", probes=8, rtol=1e-4, atol=1e-4)
    assert abs(hutch["nll_nats"] - direct["nll_nats"]) < 4 * hutch["nll_se"] + 0.05
    assert main(["eval", str(tmp_path / "r"), "--nll", "--probes", "0", "--nll-estimator", "hutchinson"]) == 2


def test_eval_nll_of_an_image_run_gives_bits_per_dim(tmp_path, capsys):
    """Images (issue 17, item 1): 8-bit data dequantized, the Hutchinson estimator by default above 16
    dimensions, and bits per dimension = NLL / (D log 2) + log2(127.5) for data scaled to [-1, 1]."""
    from rectflow.runs.config import load_config

    cfg = load_config(None, ["source={name: gaussian, shape: [1, 8, 8]}", "target={name: digits}", "model.kind=unet", "model.channels=8",
                             "model.channel_mult=[1,2]", "model.num_res_blocks=1", "model.attention_resolutions=[]", "model.head_channels=8",
                             "model.dropout=0.0", "train.steps=10", "train.batch_size=16", "train.log_every=5", "train.ckpt_every=10",
                             "train.progress=false", "train.device=cpu"])
    train_run(cfg, tmp_path / "img")
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "img"), "--nll", "--n", "8", "--probes", "2", "--solvers", "euler:4"]) == 0
    saved = json.loads((tmp_path / "img" / "nll.json").read_text())
    assert saved["estimator"] == "hutchinson" and saved["probes"] == 2 and saved["dim"] == 64 and saved["n"] == 8
    assert saved["bits_per_dim"] == pytest.approx(saved["nll_nats"] / (64 * math.log(2)) + math.log2(127.5), rel=1e-6)
    assert f"{saved['bits_per_dim']:.4f} bits/dim" in capsys.readouterr().out


@pytest.mark.parametrize("spec", ["dpm++2m:4", "dpm++3m:4", "edm:4", "euler:4"])
def test_every_solver_spec_samples_in_eval_mode_without_a_graph(spec):
    """issue 32 item 1: dpm++ / edm specs skipped eval(), no_grad and the non-finite check (dropout stayed on in eval and
    diagnose, and the result required grad)."""
    from rectflow.models import MLPVelocity

    torch.manual_seed(0)
    net = MLPVelocity(2, width=8, depth=2)
    modes = []

    class Spy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = net

        def forward(self, x, t):
            modes.append(self.training)
            return self.net(x, t)

    model = Spy().train()
    res = solve_spec(model, torch.randn(4, 2), spec)
    assert not res.x.requires_grad and modes and not any(modes) and model.training  # eval inside, restored after
    with torch.no_grad():
        for p in net.parameters():
            p.fill_(float("nan"))
    with pytest.raises(FloatingPointError):
        solve_spec(model, torch.randn(4, 2), spec)
