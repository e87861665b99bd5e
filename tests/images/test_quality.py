"""Frechet distance with any feature network, FID's local-file contract, precision/recall."""

import numpy as np
import pytest
import scipy.linalg
import torch
from torch import nn

from rectflow.data import make_distribution
from rectflow.errors import CheckpointError, ConfigError, DataError
from rectflow.images.quality import INCEPTION_URL, extract_features, fd, feature_statistics, fid, frechet_distance, inception_network, load_statistics, precision_recall, save_statistics

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


class RandomFeatures(nn.Module):
    """A fixed random projection of the pixels with a nonlinearity: (N, C, H, W) -> (N, 16)."""

    def __init__(self, d_in=64, d_out=16):
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(d_in, d_out)

    def forward(self, x):
        return torch.tanh(self.lin(x.flatten(1)))


def test_frechet_distance_closed_forms():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
    a, b = rng.uniform(0.1, 2, 5), rng.uniform(0.1, 2, 5)
    want = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)  # diagonal covariances
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(want, rel=1e-10)
    m1, m2 = rng.normal(size=(5, 5)), rng.normal(size=(5, 5))
    s1, s2 = m1 @ m1.T + 0.1 * np.eye(5), m2 @ m2.T + 0.1 * np.eye(5)
    ref = np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * scipy.linalg.sqrtm(s1 @ s2).real)
    d = frechet_distance(mu1, s1, mu2, s2)
    assert d == pytest.approx(ref, rel=1e-8)
    assert d == pytest.approx(frechet_distance(mu2, s2, mu1, s1), rel=1e-8)
    assert frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0.0, abs=1e-8)
    low_rank = np.outer(m1[0], m1[0])  # singular covariances stay real and >= 0
    assert frechet_distance(mu1, low_rank, mu1, low_rank) >= 0


def test_fd_with_a_module_and_a_torchscript_file(tmp_path):
    digits = make_distribution({"name": "digits"})
    a, b = digits.sample(600, generator=gen(1)), digits.sample(600, generator=gen(2))
    noise = torch.rand(600, 1, 8, 8, generator=gen(3)) * 2 - 1
    net = RandomFeatures()
    same, other = fd(a, b, net, batch_size=128), fd(a, noise, net, batch_size=128)
    assert 0 <= same < other / 5
    path = tmp_path / "features.pt"
    torch.jit.script(net).save(str(path))
    assert fd(a, b, path, batch_size=128) == pytest.approx(same, rel=1e-6)
    # sampling functions and precomputed statistics
    stats = feature_statistics(extract_features(net, b))
    save_statistics(tmp_path / "ref.npz", *stats, data="digits")
    assert fd(lambda start, k: a[start : start + k], load_statistics(tmp_path / "ref.npz"), net, n=600) == pytest.approx(same, rel=1e-6)


def test_fid_needs_the_local_inception_file(tmp_path, monkeypatch):
    monkeypatch.delenv("RECTFLOW_INCEPTION", raising=False)
    with pytest.raises(ConfigError) as e:
        inception_network(tmp_path / "inception-2015-12-05.pt")
    msg = str(e.value)
    assert "inception-2015-12-05.pt" in msg and INCEPTION_URL in msg and "nothing is downloaded" in msg and "\n" not in msg
    (tmp_path / "junk.pt").write_bytes(b"not torchscript")
    with pytest.raises(CheckpointError, match="TorchScript"):
        inception_network(tmp_path / "junk.pt")


class FakeInception(nn.Module):
    """Stands in for the TorchScript Inception: checks its calling convention (uint8, 3 channels,
    return_features=True) and returns per-channel means as 'features'."""

    def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        assert x.dtype == torch.uint8 and x.shape[1] == 3 and return_features
        return x.float().mean(dim=(2, 3))


def test_fid_calls_the_inception_like_stylegan(tmp_path):
    path = tmp_path / "inception-2015-12-05.pt"
    torch.jit.script(FakeInception()).save(str(path))
    x = torch.rand(50, 1, 8, 8, generator=gen(0)) * 2 - 1  # grey images are repeated to 3 channels
    assert fid(x, x, path, device="cpu") == pytest.approx(0.0, abs=1e-6)
    assert fid(x, -x.abs(), path, device="cpu") > 1.0


def test_precision_recall():
    g = gen(0)
    real = torch.randn(300, 4, generator=g)
    assert precision_recall(real, real.clone()) == (1.0, 1.0)
    far = torch.randn(300, 4, generator=g) + 100
    assert precision_recall(real, far) == (0.0, 0.0)
    collapsed = real[:1].repeat(300, 1) + 1e-3 * torch.randn(300, 4, generator=g)  # mode collapse: precise, no recall
    p, r = precision_recall(real, collapsed)
    assert p == 1.0 and r < 0.1


def test_bad_metric_input():
    with pytest.raises(DataError, match="NaN"):
        extract_features(RandomFeatures(), torch.full((4, 1, 8, 8), float("nan")))
    with pytest.raises(DataError, match="at least 2"):
        feature_statistics(np.zeros((1, 3)))
    with pytest.raises(DataError, match="shapes disagree"):
        frechet_distance(np.zeros(2), np.eye(2), np.zeros(3), np.eye(3))
    with pytest.raises(DataError, match="more than k"):
        precision_recall(torch.zeros(3, 2), torch.zeros(3, 2))
