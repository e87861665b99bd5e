import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from rectflow.cli import main
from rectflow.engine.io import load_json
from rectflow.flow.metrics import wasserstein2
from rectflow.runs.config import config_from_dict
from rectflow.runs.evaluation import evaluate_nll, evaluate_run, evaluate_solvers, evaluation_reference, format_table, heldout_samples
from rectflow.runs.experiment import Run, build_distributions, load_run, train_run
from tests.conftest import gen

SHIFT = torch.tensor([3.0, -1.0])


class Constant(nn.Module):
    """v(x, t) = c: carries x0 exactly onto x0 + c with any solver."""

    def __init__(self, c):
        super().__init__()
        self.c = nn.Parameter(torch.as_tensor(c, dtype=torch.float32).clone())

    def forward(self, x, t):
        return self.c.expand_as(x)


def cfg_dict(**train):
    return {
        "source": "gaussian",
        "target": "moons",
        "model": {"width": 16, "depth": 2, "time_dim": 8},
        "train": {"steps": 20, "batch_size": 32, "progress": False, "log_every": 10, "ckpt_every": 10, "device": "cpu", **train},
        "eval": {"n_samples": 100, "seed": 7, "solvers": ["euler:2", "heun:1"]},
    }


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("run")
    train_run(config_from_dict(cfg_dict()), run_dir)
    return load_run(run_dir)


def test_evaluate_solvers_rows_and_exact_map():
    x0 = torch.randn(64, 2, generator=gen(0))
    ref = x0 + SHIFT  # the target is the source shifted by a constant
    rows = evaluate_solvers(Constant(SHIFT), x0, ref, ["euler:1", "rk4:2", "dopri5"], progress=False)
    assert [r["solver"] for r in rows] == ["euler:1", "rk4:2", "dopri5"]
    assert [r["nfe"] for r in rows[:2]] == [1, 8] and rows[2]["nfe"] >= 1
    for r in rows:
        assert {"solver", "nfe", "w2", "energy"} <= r.keys()
        assert r["w2"] == pytest.approx(0.0, abs=1e-4) and r["energy"] == pytest.approx(0.0, abs=1e-4)
    wrong = evaluate_solvers(Constant(torch.zeros(2)), x0, ref, ["euler:1"], progress=False)[0]
    assert wrong["w2"] == pytest.approx(float(SHIFT.norm()), rel=1e-3)  # a pure translation: W2 = |c|
    assert wrong["energy"] > 0.1


def test_evaluate_solvers_metric_selection():
    x0 = torch.randn(16, 2, generator=gen(1))
    (row,) = evaluate_solvers(Constant(SHIFT), x0, x0 + SHIFT, ["euler:1"], metrics=("w2",), progress=False)
    assert "w2" in row and "energy" not in row


def test_format_table():
    rows = [{"solver": "euler:1", "nfe": 1, "w2": 0.123456}, {"solver": "dopri5", "nfe": 26, "w2": None, "energy": 2.0}]
    lines = format_table(rows).splitlines()
    assert lines[0] == "| solver | nfe | w2 | energy |"  # order of first appearance
    assert lines[1] == "|---|---|---|---|"
    assert lines[2] == "| euler:1 | 1 | 0.1235 |  |"  # missing -> empty cell
    assert lines[3] == "| dopri5 | 26 |  | 2.0000 |"  # None -> empty cell, ints unformatted
    sub = format_table(rows, columns=["w2", "solver"], floatfmt=".2e").splitlines()
    assert sub[0] == "| w2 | solver |" and sub[2] == "| 1.23e-01 | euler:1 |"
    assert format_table([]) == "(no rows)"


def test_heldout_samples_deterministic_per_seed():
    cfg = config_from_dict(cfg_dict())
    src, tgt = build_distributions(cfg)
    r = Run(path=None, config=cfg, model=Constant(SHIFT), source=src, target=tgt, step=0)
    a0, a1 = heldout_samples(r)
    b0, b1 = heldout_samples(r)
    assert a0.shape == a1.shape == (100, 2)  # eval.n_samples by default
    assert torch.equal(a0, b0) and torch.equal(a1, b1)
    assert torch.equal(heldout_samples(r, seed=7)[0], a0)  # eval.seed by default
    c0, c1 = heldout_samples(r, n=100, seed=8)
    assert not torch.equal(a0, c0) and not torch.equal(a1, c1)
    assert heldout_samples(r, n=30)[0].shape == (30, 2)
    g = gen(7)  # fresh draws of a registered target: source first, then target, from eval.seed
    x0, x1 = src.sample(100, generator=g), tgt.sample(100, generator=g)
    assert torch.equal(a0, x0) and torch.equal(a1, x1)


def test_evaluate_run_writes_files(run):
    rows = evaluate_run(run, n=50)
    assert [r["solver"] for r in rows] == ["euler:2", "heun:1"]  # eval.solvers of the config
    data = load_json(run.path / "eval.json")
    assert data["step"] == run.step == 20 and data["n_samples"] == 50
    assert [r["solver"] for r in data["rows"]] == ["euler:2", "heun:1"]
    assert data["rows"][0]["w2"] == pytest.approx(rows[0]["w2"])
    md = (run.path / "eval.md").read_text().splitlines()
    assert md[0] == "| solver | nfe | w2 | energy |" and md[2].startswith("| euler:2 | 2 |") and len(md) == 6
    assert md[5].startswith("measured against fresh draws of moons (50 points, seed 7); finite-sample floor W2 ")


def test_evaluate_run_write_false(run, tmp_path):
    r = Run(tmp_path, run.config, run.model, run.source, run.target, run.step)
    rows = evaluate_run(r, n=40, solvers=["euler:1"], write=False)
    assert [row["solver"] for row in rows] == ["euler:1"] and rows[0]["nfe"] == 1
    assert list(tmp_path.iterdir()) == []


def test_file_target_is_evaluated_on_held_out_rows_it_never_trained_on(tmp_path, capsys):
    """Issue 16 trap 1: a .npy target keeps eval.holdout of its rows (0.1 by default, split by
    eval.seed) out of training; evaluation compares with those rows only and says so, with the
    finite-sample floor beside W2."""
    rows = np.random.default_rng(0).normal(size=(1000, 2)).astype(np.float32) * [2.0, 0.5]
    np.save(tmp_path / "cloud.npy", rows)
    d = cfg_dict()
    d["target"] = str(tmp_path / "cloud.npy")
    train_run(config_from_dict(d), tmp_path / "run")
    assert load_json(tmp_path / "run" / "config.json")["eval"]["holdout"] == 0.1  # recorded in the run
    run = load_run(tmp_path / "run")
    train_rows, held = run.target.points, run.heldout.points
    assert train_rows.shape == (900, 2) and held.shape == (100, 2)
    assert sorted(map(tuple, torch.cat([train_rows, held]).tolist())) == sorted(map(tuple, torch.as_tensor(rows).tolist()))
    held_set = set(map(tuple, held.tolist()))
    trained_on = build_distributions(run.config)[1]  # what the training objective draws from
    assert not held_set & set(map(tuple, trained_on.points.tolist()))

    x0, x1 = heldout_samples(run, n=500)  # more than there are: all 100 held-out rows, each once
    assert x0.shape == x1.shape == (100, 2) and set(map(tuple, x1.tolist())) == held_set

    ref = evaluation_reference(run)
    assert ref["n_samples"] == 100 and "held-out" in ref["against"] and "cloud.npy" in ref["against"]
    assert 0 < ref["floor_w2"] < 1 and ref["floor_energy"] >= 0
    assert main(["eval", str(tmp_path / "run"), "--solvers", "euler:2"]) == 0
    out = capsys.readouterr().out
    assert "held-out" in out and "cloud.npy" in out and f"{ref['floor_w2']:.4f}" in out
    data = load_json(tmp_path / "run" / "eval.json")
    assert data["n_samples"] == 100 and data["reference"] == ref


def test_registered_target_is_measured_against_fresh_draws_with_its_floor(run):
    ref = evaluation_reference(run, n=60)
    assert ref["n_samples"] == 60 and "fresh draws" in ref["against"] and "moons" in ref["against"]
    g = gen(7)
    run.source.sample(60, generator=g)
    x1, x1b = run.target.sample(60, generator=g), run.target.sample(60, generator=g)  # an independent second sample
    assert ref["floor_w2"] == pytest.approx(wasserstein2(x1, x1b))
    evaluate_run(run, n=60)
    assert load_json(run.path / "eval.json")["reference"] == ref


def test_evaluate_solvers_takes_diffusion_specs():
    rows = evaluate_solvers(Constant([0.5, -1.0]), torch.randn(64, 2, generator=gen(1)), torch.randn(64, 2, generator=gen(2)), ["dpm++2m:4", "edm:3"], progress=False)
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
