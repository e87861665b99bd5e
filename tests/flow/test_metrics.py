import pytest
import torch

from rectflow.errors import DataError
from rectflow.flow.metrics import energy_distance, wasserstein2
from tests.conftest import gen


def test_w2_translation_and_identity():
    x = torch.randn(300, 2, generator=gen(0), dtype=torch.float64)
    shift = torch.tensor([3.0, -4.0], dtype=torch.float64)
    assert wasserstein2(x, x) == pytest.approx(0.0, abs=1e-7)  # sqrt of a float-rounding residue
    assert wasserstein2(x, x + shift) == pytest.approx(5.0, rel=1e-9)  # translation: W2 = |c|


def test_w2_one_dimension_is_sorted_matching():
    a = torch.randn(400, 1, generator=gen(1), dtype=torch.float64)
    b = torch.rand(400, 1, generator=gen(2), dtype=torch.float64) * 3
    sorted_cost = (a.sort(0).values - b.sort(0).values).square().mean().sqrt()
    assert wasserstein2(a, b) == pytest.approx(float(sorted_cost), rel=1e-9)


def test_energy_distance_properties():
    x = torch.randn(500, 2, generator=gen(3))
    y = torch.randn(500, 2, generator=gen(4))
    assert energy_distance(x, x) == pytest.approx(0.0, abs=1e-9)
    near, far = energy_distance(x, y), energy_distance(x, y + 2)
    assert 0 <= near < far


def test_metric_bad_inputs():
    with pytest.raises(DataError, match="dims"):
        wasserstein2(torch.zeros(3, 2), torch.zeros(3, 3))
    with pytest.raises(DataError, match="NaN"):
        energy_distance(torch.tensor([[float("nan"), 0.0]]), torch.zeros(2, 2))
    with pytest.raises(DataError, match="non-empty"):
        wasserstein2(torch.zeros(0, 2), torch.zeros(3, 2))
