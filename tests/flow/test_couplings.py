import itertools

import pytest
import torch

from rectflow.data import EightGaussians, Gaussian
from rectflow.flow.couplings import IndependentCoupling, MinibatchOTCoupling, ot_pairing, squared_cost
from tests.conftest import gen


def test_exact_ot_is_a_permutation_that_does_not_raise_cost():
    for seed in range(5):
        g = gen(seed)
        x0, x1 = torch.randn(256, 2, generator=g), 3 + torch.randn(256, 2, generator=g) * 2
        i, j = ot_pairing(x0, x1)
        assert torch.equal(i, torch.arange(256))
        assert torch.equal(j.sort().values, torch.arange(256))  # a permutation
        cost_ot = (x0[i] - x1[j]).square().sum(1).mean()
        cost_ind = (x0 - x1).square().sum(1).mean()
        assert cost_ot <= cost_ind


def test_exact_ot_matches_brute_force_on_a_small_batch():
    g = gen(7)
    x0, x1 = torch.randn(6, 2, generator=g, dtype=torch.float64), torch.randn(6, 2, generator=g, dtype=torch.float64)
    c = squared_cost(x0, x1)
    best = min(sum(float(c[k, p[k]]) for k in range(6)) for p in itertools.permutations(range(6)))
    _, j = ot_pairing(x0, x1)
    assert sum(float(c[k, j[k]]) for k in range(6)) == pytest.approx(best, rel=1e-12)


def test_sinkhorn_pairs_are_valid_and_close_to_exact():
    g = gen(1)
    x0, x1 = torch.randn(128, 2, generator=g), 4 + torch.randn(128, 2, generator=g)
    i, j = ot_pairing(x0, x1, method="sinkhorn", reg=0.01, generator=gen(2))
    assert i.shape == j.shape == (128,) and int(j.min()) >= 0 and int(j.max()) < 128
    _, je = ot_pairing(x0, x1)
    exact = (x0 - x1[je]).square().sum(1).mean()
    entropic = (x0 - x1[j]).square().sum(1).mean()
    ind = (x0 - x1).square().sum(1).mean()
    assert exact <= entropic < exact + 0.5 * (ind - exact)


def test_unequal_sizes_draw_from_the_plan():
    x0, x1 = torch.randn(10, 2, generator=gen(0)), torch.randn(30, 2, generator=gen(1))
    i, j = ot_pairing(x0, x1, generator=gen(3))
    assert i.shape == (10,) and int(j.max()) < 30


def test_couplings_are_seeded_and_shaped():
    src, tgt = Gaussian(2), EightGaussians()
    for c in (IndependentCoupling(src, tgt), MinibatchOTCoupling(src, tgt)):
        a0, a1 = c.sample(64, generator=gen(5))
        b0, b1 = c.sample(64, generator=gen(5))
        assert a0.shape == a1.shape == (64, 2)
        assert torch.equal(a0, b0) and torch.equal(a1, b1)
    ot0, ot1 = MinibatchOTCoupling(src, tgt).sample(64, generator=gen(5))
    assert torch.equal(ot0, a0) and torch.equal(ot1.sort(0).values, a1.sort(0).values)  # same points, re-paired


def test_bad_arguments():
    with pytest.raises(ValueError, match="method"):
        MinibatchOTCoupling(Gaussian(), Gaussian(), method="greedy")
    with pytest.raises(ValueError, match="empty"):
        ot_pairing(torch.zeros(0, 2), torch.zeros(3, 2))
    with pytest.raises(ValueError, match="reg"):
        ot_pairing(torch.zeros(3, 2), torch.zeros(3, 2), method="sinkhorn", reg=0.0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_ot_on_gpu_tensors():
    x0, x1 = torch.randn(64, 2, device="cuda"), torch.randn(64, 2, device="cuda")
    for method in ("exact", "sinkhorn"):
        i, j = ot_pairing(x0, x1, method=method, generator=torch.Generator(device="cuda").manual_seed(0))
        assert j.device.type == "cuda"


def test_the_ot_cost_matrix_is_computed_without_tf32(monkeypatch):
    # on CUDA, cdist multiplies matrices; under TF32 the "exact" plan would solve perturbed costs
    seen, real = [], torch.cdist

    def spy(a, b, *args, **kw):
        seen.append(torch.backends.cuda.matmul.allow_tf32)
        return real(a, b, *args, **kw)

    monkeypatch.setattr(torch, "cdist", spy)
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        ot_pairing(torch.randn(8, 2, generator=gen()), torch.randn(8, 2, generator=gen(1)))
        assert seen == [False] and torch.backends.cuda.matmul.allow_tf32 is True  # restored afterwards
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old
