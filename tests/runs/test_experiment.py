import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from rectflow.cli import main
from rectflow.engine.checkpoint import checkpoint_path, list_checkpoints
from rectflow.engine.hardware import resolve_precision
from rectflow.engine.io import load_json
from rectflow.errors import CheckpointError, ConfigError, DataError
from rectflow.models import MLPVelocity, UNetVelocity
from rectflow.runs import experiment
from rectflow.runs.config import config_from_dict, config_to_dict
from rectflow.runs.evaluation import evaluation_reference
from rectflow.runs.experiment import build_distributions, build_model, load_run, model_config, sample_shape, train_run
from tests.conftest import gen

STEPS = 30


def tiny(**over):
    d = {
        "source": "gaussian",
        "target": "moons",
        "model": {"width": 16, "depth": 2, "time_dim": 8},
        "train": {"steps": STEPS, "batch_size": 32, "progress": False, "log_every": 10, "ckpt_every": 10, "device": "cpu", "ema_decay": 0.9},
        "eval": {"n_samples": 200},
    }
    for key, value in over.items():
        section, name = key.split("__")
        d[section][name] = value
    return config_from_dict(d)


UNET = {"kind": "unet", "channels": 8, "channel_mult": [1, 2], "num_res_blocks": 1, "attention_resolutions": [4], "head_channels": 8, "dropout": 0.0}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("run")
    train_run(tiny(), run_dir)
    return run_dir


def test_build_distributions_ok_and_mismatches():
    src, tgt = build_distributions(tiny())
    assert src.dim == tgt.dim == 2
    with pytest.raises(DataError, match="dimension"):
        build_distributions(config_from_dict({"source": {"name": "gaussian", "dim": 3}, "target": "moons"}))
    # same dimension (16), different sample shapes
    cfg = config_from_dict({"source": {"name": "gaussian", "shape": [1, 4, 4]}, "target": {"name": "gaussian", "shape": [1, 2, 8]}})
    with pytest.raises(DataError, match="shape"):
        build_distributions(cfg)


def test_mlp_model_config_round_trip():
    cfg = tiny()
    mcfg = model_config(cfg, 2)
    assert mcfg == {"kind": "mlp", "width": 16, "depth": 2, "time_dim": 8, "activation": "silu", "time_scale": 10.0, "dim": 2}
    assert json.loads(json.dumps(mcfg)) == mcfg  # what checkpoints store and compare
    model = build_model(mcfg)
    ref = MLPVelocity(2, width=16, depth=2, time_dim=8)
    assert isinstance(model, MLPVelocity) and torch.equal(model.time_embed.freqs, ref.time_embed.freqs)
    assert [p.shape for p in model.parameters()] == [p.shape for p in ref.parameters()]
    assert model(torch.randn(5, 2, generator=gen()), torch.rand(5, generator=gen())).shape == (5, 2)
    # unet-only keys do not enter an MLP's config
    assert model_config(config_from_dict({"model": {"width": 16, "depth": 2, "time_dim": 8, "channels": 4}}), 2) == mcfg


def test_unet_model_config_round_trip():
    cfg = config_from_dict({"source": {"name": "gaussian", "shape": [1, 8, 8]}, "target": {"name": "gaussian", "shape": [1, 8, 8]}, "model": UNET})
    src, _ = build_distributions(cfg)
    mcfg = model_config(cfg, src.dim, sample_shape(src))
    assert mcfg["kind"] == "unet" and mcfg["channels"] == 8 and mcfg["shape"] == [1, 8, 8] and mcfg["dim"] == 64
    assert json.loads(json.dumps(mcfg)) == mcfg
    model = build_model(mcfg)
    assert isinstance(model, UNetVelocity)
    x = torch.randn(2, 1, 8, 8, generator=gen())
    assert model(x, torch.rand(2, generator=gen())).shape == (2, 1, 8, 8)


@pytest.mark.parametrize("shape", [(1, 4, 8), (16,), None])
def test_image_model_needs_square_images(shape):
    cfg = config_from_dict({"model": UNET})
    with pytest.raises(DataError, match="square images"):
        model_config(cfg, 32, shape)


def test_build_model_unknown_kind():
    with pytest.raises(ConfigError, match="model.kind"):
        build_model({"kind": "transformer", "dim": 2})


def test_train_then_load(trained):
    cks = list_checkpoints(trained)
    assert cks and cks[-1] == checkpoint_path(trained, STEPS)
    auto = resolve_precision("auto", torch.device("cpu"))
    assert load_json(trained / "config.json") == config_to_dict(tiny(model__time_scale=10.0, train__precision=auto))  # as recorded: the unset scale and auto precision resolved
    run = load_run(trained)
    assert run.step == STEPS and run.checkpoint == checkpoint_path(trained, STEPS)
    assert run.config == tiny(model__time_scale=10.0, train__precision=auto) and run.dim == 2 and not run.model.training
    raw = load_run(trained, ema=False)
    ema_w, raw_w = run.model.state_dict(), raw.model.state_dict()
    assert ema_w.keys() == raw_w.keys()
    assert any(not torch.equal(ema_w[k], raw_w[k]) for k in ema_w)
    older = load_run(trained, checkpoint=cks[0], ema=False)
    assert older.step < STEPS and older.checkpoint == cks[0]


def test_load_run_missing_directory(tmp_path):
    with pytest.raises(CheckpointError, match="no such run directory"):
        load_run(tmp_path / "nope")


def test_other_config_refused_and_nothing_written(trained):
    before = (trained / "config.json").read_text()
    calls = []
    with pytest.raises(ConfigError, match="model.width"):
        train_run(tiny(model__width=8), trained, prepare=lambda: calls.append(1))
    assert calls == []  # prepare runs only after the directory check passed
    assert (trained / "config.json").read_text() == before
    assert load_run(trained).step == STEPS


def test_resume_false_refused_when_checkpoints_exist(trained):
    calls = []
    with pytest.raises(ConfigError, match="already holds checkpoints"):
        train_run(tiny(), trained, resume=False, prepare=lambda: calls.append(1))
    assert calls == []


def test_prepare_called_once_before_anything_is_written(tmp_path):
    run_dir = tmp_path / "run"
    seen = []

    def prepare():
        seen.append((run_dir / "config.json").exists())

    train_run(tiny(train__steps=5, train__ckpt_every=5), run_dir, prepare=prepare)
    assert seen == [False]
    assert load_run(run_dir).step == 5


def test_resume_with_larger_budget(tmp_path):
    run_dir = tmp_path / "run"
    train_run(tiny(train__steps=10), run_dir)
    calls = []
    trainer = train_run(tiny(train__steps=20), run_dir, prepare=lambda: calls.append(1))  # steps is resumable
    assert calls == [1] and trainer.step == 20
    assert load_run(run_dir).step == 20


def write_cloud(path, n=400, seed=0):
    """An (n, 2) point cloud in a .npy file (a shape the registry does not have)."""
    rng = np.random.default_rng(seed)
    np.save(path, (rng.normal(size=(n, 2)) * [2.0, 0.5] + [1.0, 0.0]).astype(np.float32))
    return path


def test_data_paths_are_recorded_absolute_and_sampling_opens_no_target(tmp_path, monkeypatch):
    """Issue 16 trap 4: a run made with relative data paths samples from any directory, and
    sampling (which needs no target) works with the target file gone."""
    data = tmp_path / "data"
    data.mkdir()
    write_cloud(data / "noise.npy", seed=1)
    write_cloud(data / "pinwheel.npy")
    monkeypatch.chdir(data)
    cfg = tiny(train__steps=5, train__ckpt_every=5)
    cfg.source, cfg.target = "noise.npy", {"name": "file", "path": "pinwheel.npy"}
    train_run(cfg, tmp_path / "run")
    stored = load_json(tmp_path / "run" / "config.json")
    assert stored["source"] == str(data.resolve() / "noise.npy")
    assert stored["target"] == {"name": "file", "path": str(data.resolve() / "pinwheel.npy")}

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    (data / "pinwheel.npy").rename(tmp_path / "moved.npy")
    assert main(["sample", str(tmp_path / "run"), "--n", "7", "--out", "s.npy"]) == 0
    assert np.load(elsewhere / "s.npy").shape == (7, 2)
    run = load_run(tmp_path / "run")
    with pytest.raises(DataError, match="pinwheel.npy: no such file"):
        run.target.sample(3)


def test_run_recorded_with_a_relative_path_still_resumes(tmp_path, monkeypatch):
    """A run made before data paths were recorded absolute (config.json and checkpoints hold the
    path as typed) resumes from its directory, with the path given relative or absolute."""
    write_cloud(tmp_path / "pts.npy")
    monkeypatch.chdir(tmp_path)

    def cfg(steps, target):
        c = tiny(train__steps=steps, train__ckpt_every=5)
        c.target = target
        return c

    with monkeypatch.context() as m:
        m.setattr(experiment, "absolute_spec", lambda spec: spec)  # the code before: paths as typed
        train_run(cfg(5, "pts.npy"), "run")
    assert load_json(Path("run/config.json"))["target"] == "pts.npy"
    assert train_run(cfg(10, "pts.npy"), "run").step == 10
    assert train_run(cfg(15, str(tmp_path / "pts.npy")), "run").step == 15
    assert load_run("run").step == 15
    write_cloud(tmp_path / "other.npy")
    with pytest.raises(ConfigError, match="target"):
        train_run(cfg(20, "other.npy"), "run")


def test_held_out_split_is_part_of_a_file_run(tmp_path, monkeypatch):
    """eval.holdout chooses a file target's training rows, so it is compared on resumption; unset,
    it is what the run recorded (0.1 for a new run, no split for a run made before splits existed)."""
    write_cloud(tmp_path / "pts.npy")
    monkeypatch.chdir(tmp_path)

    def cfg(steps, holdout=None):
        c = tiny(train__steps=steps, train__ckpt_every=5, eval__holdout=holdout)
        c.target = "pts.npy"
        return c

    train_run(cfg(5), "new")
    assert load_json(Path("new/config.json"))["eval"]["holdout"] == 0.1 and len(load_run("new").heldout.points) == 40
    assert train_run(cfg(10), "new").step == 10  # unset: the recorded split
    with pytest.raises(ConfigError, match="eval.holdout"):
        train_run(cfg(15, holdout=0.2), "new")

    train_run(cfg(5, holdout=0.0), "old")  # no split: what a run made before splits trained on
    stored = load_json(Path("old/config.json"))
    del stored["eval"]["holdout"]  # ... and how it recorded its config
    Path("old/config.json").write_text(json.dumps(stored))
    assert train_run(cfg(10), "old").step == 10
    run = load_run("old")
    assert run.heldout is None and len(run.target.points) == 400
    assert "with replacement from the training file" in evaluation_reference(run, n=20)["against"]


class Ring:
    """A user's distribution: only sample(n, generator=, device=) (no dim, no shape)."""

    def sample(self, n, generator=None, device=None):
        angle = 2 * torch.pi * torch.rand(n, generator=generator)
        return 3 * torch.stack([angle.cos(), angle.sin()], dim=1).to(device)


class Net(nn.Module):
    """A user's network with a config (its constructor's arguments)."""

    def __init__(self, width=16):
        super().__init__()
        self.config = {"width": width}
        self.net = nn.Sequential(nn.Linear(3, width), nn.SiLU(), nn.Linear(width, 2))

    def forward(self, x, t):
        return self.net(torch.cat([x, t[:, None].to(x.dtype)], dim=1))


class Bare(Net):
    """A user's network without a config."""

    def __init__(self):
        super().__init__(8)
        del self.config


def test_train_run_takes_any_sampler_and_any_network(tmp_path):
    """Issue 16 trap 5: train_run / load_run take an object with sample(n, generator=, device=) as
    a distribution and any nn.Module as the network; the run records their types (and the
    network's config), and a run of them cannot be resumed or loaded without them."""
    run_dir = tmp_path / "ring"
    train_run(tiny(train__steps=10, train__ckpt_every=5), run_dir, target=Ring(), model=Net(width=16))
    stored = load_json(run_dir / "config.json")
    assert stored["target"] == {"name": "object", "type": f"{__name__}.Ring"} and stored["source"] == "gaussian"
    assert stored["model"]["kind"] == "custom"
    run = load_run(run_dir, target=Ring(), model=Net)  # the class: rebuilt with the recorded config
    assert isinstance(run.model, Net) and run.model.config == {"width": 16} and run.step == 10 and run.dim == 2
    assert run.target.sample(5).shape == (5, 2)
    assert train_run(tiny(train__steps=15, train__ckpt_every=5), run_dir, target=Ring(), model=Net()).step == 15  # resumes

    without_target = load_run(run_dir, model=Net)  # sampling needs no target ...
    with pytest.raises(DataError, match=r"target is a Python object \(.*Ring\).*target="):
        without_target.target.sample(3)  # ... comparing with it does
    with pytest.raises(ConfigError, match=r"network is a Python nn.Module \(.*Net\).*model="):
        load_run(run_dir, target=Ring())
    with pytest.raises(CheckpointError, match="does not match"):
        load_run(run_dir, target=Ring(), model=lambda: Net(width=8))
    with pytest.raises(DataError, match=r"target is a Python object"):
        train_run(tiny(train__steps=20), run_dir, model=Net())
    with pytest.raises(ConfigError, match=r"network is a Python nn.Module"):
        train_run(tiny(train__steps=20), run_dir, target=Ring())
    assert load_run(run_dir, target=Ring(), model=Net).step == 15  # nothing was written


def test_a_network_without_config_is_loaded_from_its_constructor(tmp_path):
    train_run(tiny(train__steps=5, train__ckpt_every=5), tmp_path / "bare", model=Bare())
    assert isinstance(load_run(tmp_path / "bare", model=Bare).model, Bare)
    assert isinstance(load_run(tmp_path / "bare", model=lambda: Bare()).model, Bare)
    train_run(tiny(train__steps=5, train__ckpt_every=5), tmp_path / "plain")
    with pytest.raises(ConfigError, match="built from its config"):
        load_run(tmp_path / "plain", model=Bare)


def test_objects_that_are_not_distributions_or_networks_are_refused(tmp_path):
    with pytest.raises(DataError, match="not a distribution"):
        train_run(tiny(), tmp_path / "r", target=object())
    with pytest.raises(ConfigError, match="nn.Module"):
        train_run(tiny(), tmp_path / "r", model=lambda: Net())
    assert not (tmp_path / "r").exists()


def test_time_scale_is_recorded_and_runs_made_before_the_key_load_and_resume(tmp_path):
    """model.time_scale (the MLP's top time frequency, issue 16 item 6) is part of a run; a run
    recorded before the key existed (its time features then fixed at 1000) loads and resumes as it was."""
    from rectflow.engine.checkpoint import latest_checkpoint, read_checkpoint
    from rectflow.engine.io import save_json

    new = tmp_path / "new"
    train_run(tiny(model__time_scale=10.0, train__steps=10), new)
    assert load_run(new).model.time_embed.freqs.max().item() == pytest.approx(10.0)
    assert read_checkpoint(latest_checkpoint(new)).model_config["time_scale"] == 10.0
    with pytest.raises(ConfigError, match="time_scale"):
        train_run(tiny(model__time_scale=30.0, train__steps=20), new)

    old = tmp_path / "old"
    train_run(tiny(model__time_scale=1000.0, train__steps=10), old)
    record = load_json(old / "config.json")
    del record["model"]["time_scale"]
    save_json(old / "config.json", record)  # as a run made before the key
    ckpt = read_checkpoint(latest_checkpoint(old))
    assert "time_scale" not in ckpt.model_config and "time_scale" not in ckpt.meta["run_record"]["model"]
    assert load_run(old).model.time_embed.freqs.max().item() == pytest.approx(1000.0)
    assert train_run(tiny(model__time_scale=1000.0, train__steps=20), old).step == 20
    with pytest.raises(ConfigError, match="time_scale"):
        train_run(tiny(model__time_scale=10.0, train__steps=30), old)


def test_time_scale_must_be_positive():
    with pytest.raises(ConfigError, match="model.time_scale"):
        tiny(model__time_scale=0.0)


@pytest.mark.parametrize("kind", ["mlp", "unet"])
def test_a_run_made_before_time_scale_resumes_with_its_own_config(tmp_path, kind):
    """The config a 0.1 run was trained with (no model.time_scale) resumes it: an MLP keeps the 1000 it
    was made with, and image networks, which have no such key, are not asked about it (review finding)."""
    from rectflow.engine.io import save_json

    if kind == "mlp":
        def cfg(steps, **model):
            return tiny(train__steps=steps, **{f"model__{k}": v for k, v in model.items()})
    else:
        def cfg(steps, **model):
            c = {"source": {"name": "gaussian", "shape": [1, 8, 8]}, "target": {"name": "gaussian", "shape": [1, 8, 8]}, "model": {**UNET, **model},
                 "train": {"steps": steps, "batch_size": 4, "progress": False, "log_every": 5, "ckpt_every": 5, "device": "cpu"}, "eval": {"n_samples": 8}}
            return config_from_dict(c)
    run = tmp_path / kind
    train_run(cfg(5, time_scale=1000.0), run)
    record = load_json(run / "config.json")
    del record["model"]["time_scale"]
    save_json(run / "config.json", record)  # as 0.1 wrote it
    legacy = cfg(10)
    legacy.model.time_scale = None  # the user's unchanged config: the key unset
    assert train_run(legacy, run).step == 10
    if kind == "mlp":
        assert load_run(run).model.time_embed.freqs.max().item() == pytest.approx(1000.0)
        assert load_json(run / "config.json")["model"]["time_scale"] == 1000.0


def test_an_mlp_passed_as_an_object_is_reloaded_with_the_time_scale_it_was_trained_with(tmp_path):
    """Review finding: the time frequencies are not in the state dict, so the run records the MLP's
    constructor arguments and loading with the class rebuilds the same network."""
    run = tmp_path / "obj"
    train_run(tiny(train__steps=5, model__kind="custom"), run, model=MLPVelocity(2, width=16, depth=2, time_dim=8, time_scale=1000.0))
    loaded = load_run(run, model=MLPVelocity)
    assert loaded.model.time_embed.freqs.max().item() == pytest.approx(1000.0)
    with pytest.raises(CheckpointError, match="time_scale"):
        load_run(run, model=MLPVelocity(2, width=16, depth=2, time_dim=8))  # another scale: refused, not silently loaded


def test_auto_precision_is_resolved_once_recorded_and_kept_on_resume(tmp_path, monkeypatch):
    from rectflow.engine import hardware

    monkeypatch.setattr(hardware, "native_bf16", lambda device="cpu": True)
    cfg = tiny(train__steps=4, train__ckpt_every=2)
    assert cfg.train.precision == "auto"
    train_run(cfg, tmp_path / "r")
    assert load_json(tmp_path / "r" / "config.json")["train"]["precision"] == "bf16"
    machine = load_json(tmp_path / "r" / "machine.json")
    assert machine["precision"] == "bf16" and machine["precision_requested"] == "auto" and machine["threads"] >= 1
    assert machine["cpu_capability"] and "bf16_native" in machine
    # resumed with auto on a machine without native bf16: the run keeps the precision it started with
    monkeypatch.setattr(hardware, "native_bf16", lambda device="cpu": False)
    with pytest.warns(UserWarning, match="emulated"):
        tr = train_run(tiny(train__steps=6, train__ckpt_every=2), tmp_path / "r")
    assert tr.precision == "bf16" and tr.step == 6


def test_a_refused_resume_writes_nothing(tmp_path):
    """issue 31 item 3: with config.json gone, a resume with another lr was refused by the checkpoint's record, but only after it had
    written config.json with that lr, so the original command was refused too."""
    run = tmp_path / "c"
    train_run(tiny(train__steps=4, train__ckpt_every=2), run)
    (run / "config.json").unlink()
    machine = (run / "machine.json").read_text()
    with pytest.raises(CheckpointError):
        train_run(tiny(train__steps=4, train__ckpt_every=2, train__lr=0.002), run)
    assert not (run / "config.json").exists() and (run / "machine.json").read_text() == machine
    tr = train_run(tiny(train__steps=6, train__ckpt_every=2), run)  # the original settings still resume
    assert tr.step == 6


def test_more_steps_extend_a_constant_lr_run_but_not_a_cosine_one(tmp_path):
    """issue 31 item 5: a 4-step cosine run resumed with 6 steps jumped back to a high lr and looked like a 6-step run."""
    train_run(tiny(train__steps=4, train__ckpt_every=2, train__lr_schedule="cosine"), tmp_path / "cos")
    with pytest.raises(ConfigError, match="train.steps"):
        train_run(tiny(train__steps=6, train__ckpt_every=2, train__lr_schedule="cosine"), tmp_path / "cos")
    assert load_json(tmp_path / "cos" / "config.json")["train"]["steps"] == 4
    train_run(tiny(train__steps=4, train__ckpt_every=2), tmp_path / "const")
    assert train_run(tiny(train__steps=6, train__ckpt_every=2), tmp_path / "const").step == 6
