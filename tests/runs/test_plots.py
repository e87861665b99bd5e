import torch

from rectflow.runs.config import config_from_dict
from rectflow.runs.experiment import load_run, train_run
from rectflow.runs.plots import (
    plot_crossings,
    plot_loss,
    plot_quality_vs_nfe,
    plot_run,
    plot_samples,
    plot_stages,
    plot_trajectories,
)
from tests.conftest import gen

PNG = b"\x89PNG\r\n\x1a\n"


def assert_png(path):
    data = path.read_bytes()
    assert data[:8] == PNG and len(data) > 100
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]  # written atomically


def pts(n=20, seed=0):
    return torch.randn(n, 2, generator=gen(seed))


def test_plot_loss(tmp_path):
    rows = [{"step": 10, "loss": 1.0}, {"step": 20, "loss": 0.5}, {"step": 25, "lr": 1e-3}]
    out = plot_loss(rows, tmp_path / "plots" / "loss.png")  # folder created on demand
    assert out == tmp_path / "plots" / "loss.png"
    assert_png(out)


def test_plot_samples(tmp_path):
    assert_png(plot_samples(pts(), pts(seed=1), tmp_path / "s.png", source=pts(seed=2).numpy()))


def test_plot_trajectories(tmp_path):
    traj = torch.cumsum(torch.randn(6, 10, 2, generator=gen()), dim=0)
    assert_png(plot_trajectories(traj, tmp_path / "t.png"))
    assert_png(plot_trajectories(traj, tmp_path / "t2.png", times=torch.linspace(0, 1, 6)))


def test_plot_quality_vs_nfe(tmp_path):
    series = {"1-RF": [(8, 0.2), (1, 0.9), (2, 0.5)], "2-RF": [(1, 0.3), (4, 0.1)]}
    assert_png(plot_quality_vs_nfe(series, tmp_path / "q.png", metric="energy"))


def test_plot_crossings(tmp_path):
    assert_png(plot_crossings(pts(), pts(seed=1), pts(3, seed=2), tmp_path / "c.png"))
    assert_png(plot_crossings(pts(), pts(seed=1), torch.zeros(0, 2), tmp_path / "c0.png"))


def test_plot_stages(tmp_path):
    x0, x1 = pts(), pts(seed=1)
    traj = torch.stack([x0 + (x1 - x0) * t for t in torch.linspace(0, 1, 5)])
    panels = [
        {"label": "coupling", "x0": x0, "x1": x1, "points": pts(4, seed=3), "crossing": 0.25},
        {"label": "1-RF", "x0": x0, "x1": x1, "trajectory": traj, "times": torch.linspace(0, 1, 5)},
    ]
    assert_png(plot_stages(panels, tmp_path / "stages.png", title="stages"))


def test_plot_run_writes_three_figures(tmp_path):
    cfg = config_from_dict({
        "source": "gaussian",
        "target": "moons",
        "model": {"width": 16, "depth": 2, "time_dim": 8},
        "train": {"steps": 20, "batch_size": 32, "progress": False, "log_every": 5, "ckpt_every": 10, "device": "cpu"},
        "eval": {"n_samples": 100},
    })
    train_run(cfg, tmp_path / "run")
    paths = plot_run(load_run(tmp_path / "run"), n=100, steps=10)
    assert sorted(p.name for p in paths) == ["loss.png", "samples.png", "trajectories.png"]
    for p in paths:
        assert p.parent == tmp_path / "run" / "plots"
        assert_png(p)
