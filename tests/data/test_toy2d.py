import math

import numpy as np
import pytest
import torch

from rectflow.data import TOY_DISTRIBUTIONS, Checkerboard, Circle, EightGaussians, Moons, PointCloud, make_distribution
from rectflow.errors import DataError
from tests.conftest import gen


@pytest.mark.parametrize("name", sorted(TOY_DISTRIBUTIONS))
def test_toys_shape_finite_and_seeded(name):
    d = make_distribution(name)
    a, b = d.sample(500, generator=gen(1)), d.sample(500, generator=gen(1))
    assert a.shape == (500, d.dim) and torch.isfinite(a).all() and torch.equal(a, b)
    assert not torch.equal(a, d.sample(500, generator=gen(2)))


def test_eight_gaussians_modes():
    x = EightGaussians(radius=5.0, std=0.01).sample(4000, generator=gen(0))
    assert torch.allclose(x.norm(dim=1), torch.full((4000,), 5.0), atol=0.05)
    angles = torch.atan2(x[:, 1], x[:, 0]) / (math.pi / 4)
    assert torch.allclose(angles, angles.round(), atol=0.01)
    assert len(torch.unique(angles.round() % 8)) == 8


def test_circle_and_moons_geometry():
    c = Circle(noise=0.0).sample(2000, generator=gen(0))
    assert torch.allclose(c.norm(dim=1), torch.ones(2000), atol=1e-5)
    assert (c[:, 1] > 0).float().mean().item() == pytest.approx(0.5, abs=0.05)
    m = (Moons(noise=0.0).sample(2000, generator=gen(0)) + 1) / 3  # undo 3x - 1
    upper = (m - torch.tensor([0.0, 0.0])).norm(dim=1)
    lower = (m - torch.tensor([1.0, 0.5])).norm(dim=1)
    assert torch.allclose(torch.minimum((upper - 1).abs(), (lower - 1).abs()), torch.zeros(2000), atol=1e-5)


def test_checkerboard_occupies_black_squares():
    x = Checkerboard(scale=1.0).sample(5000, generator=gen(0))
    assert bool(((x >= -2) & (x <= 2)).all())
    parity = (torch.floor(x[:, 0]) + torch.floor(x[:, 1])) % 2
    assert bool((parity == 0).all()) or bool((parity == 1).all())


def test_point_cloud_files(tmp_path):
    pts = np.random.default_rng(0).normal(size=(50, 3)).astype(np.float32)
    np.save(tmp_path / "p.npy", pts)
    np.savetxt(tmp_path / "p.csv", pts, delimiter=",", header="a,b,c", comments="")
    for f in ("p.npy", "p.csv"):
        d = make_distribution(str(tmp_path / f))
        assert d.dim == 3
        s = d.sample(200, generator=gen(0))
        assert s.shape == (200, 3)
        assert all(any(np.allclose(r, p, atol=1e-5) for p in pts) for r in s[:5].numpy())
    assert make_distribution({"name": "file", "path": str(tmp_path / "p.npy")}).dim == 3


def test_point_cloud_bad_inputs(tmp_path):
    (tmp_path / "empty.npy").write_bytes(b"")
    (tmp_path / "junk.npy").write_bytes(b"not a numpy file at all")
    bad = np.ones((4, 2))
    bad[2, 1] = np.nan
    np.save(tmp_path / "nan.npy", bad)
    np.save(tmp_path / "zero.npy", np.zeros((0, 2)))
    (tmp_path / "p.txt").write_text("1,2\n")
    cases = {
        "empty.npy": "empty",
        "junk.npy": "cannot read",
        "nan.npy": "NaN",
        "zero.npy": "non-empty",
        "missing.npy": "no such file",
        "p.txt": "unsupported",
    }
    for name, msg in cases.items():
        with pytest.raises(DataError, match=msg):
            PointCloud.from_file(tmp_path / name)
    with pytest.raises(DataError, match="unknown distribution"):
        make_distribution("banana")
    with pytest.raises(DataError, match="radiuss"):
        make_distribution({"name": "8gaussians", "radiuss": 3})


@pytest.mark.parametrize(
    "name, arr, msg",
    [
        ("complex.npy", np.array([[1 + 2j, 0], [1, 3j]]), "complex"),
        ("text.npy", np.array([["a", "b"], ["c", "d"]]), "expected real numbers"),
        ("record.npy", np.zeros(3, dtype=[("x", "f4"), ("y", "f4")]), "expected real numbers"),
        ("flags.npy", np.ones((3, 2), dtype=bool), "expected real numbers"),
        ("objects.npy", np.array([[1, None]], dtype=object), "cannot read"),
    ],
)
def test_complex_and_non_numeric_arrays_are_refused_naming_the_file(tmp_path, name, arr, msg):
    """issue 13 item 8: a complex .npy used to lose its imaginary part silently; object arrays are
    never unpickled."""
    np.save(tmp_path / name, arr, allow_pickle=True)
    with pytest.raises(DataError, match=msg) as e:
        make_distribution(str(tmp_path / name))
    assert name in str(e.value) and "\n" not in str(e.value)


def test_point_cloud_split_is_disjoint_seeded_and_checked():
    pts = torch.arange(40, dtype=torch.float32).reshape(20, 2)
    train, held = PointCloud(pts).split(0.25, seed=3)
    assert len(train) == 15 and len(held) == 5
    assert sorted(torch.cat([train.points, held.points])[:, 0].tolist()) == pts[:, 0].tolist()  # disjoint, complete
    assert train.points[:, 0].tolist() == sorted(train.points[:, 0].tolist())  # file order kept
    again, other = PointCloud(pts).split(0.25, seed=3)[1], PointCloud(pts).split(0.25, seed=4)[1]
    assert torch.equal(again.points, held.points) and not torch.equal(other.points, held.points)
    for fraction in (0.0, 1.0, 0.05, 0.99):  # nothing held out, nothing to train on, < 2 rows, < 1 row
        with pytest.raises(DataError, match="cannot hold out"):
            PointCloud(pts).split(fraction, seed=0)
