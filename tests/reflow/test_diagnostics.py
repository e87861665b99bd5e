"""Straight-coupling diagnostics (theory §4): straightness, transport cost vs exact OT,
exact segment intersections and crossing probability."""

import math
from fractions import Fraction

import pytest
import torch
from torch import nn

from rectflow.errors import DataError
from rectflow.reflow.diagnostics import crossing_probability, diagnose_coupling, segment_intersections, straightness, transport_cost
from tests.conftest import gen


def seg(*xy):
    return torch.tensor(xy, dtype=torch.float64).reshape(-1, 2)


CASES = [
    # a0, a1, b0, b1, intersects, point
    ((-1, -1), (1, 1), (-1, 1), (1, -1), True, (0, 0)),  # an X
    ((0, 0), (2, 0), (1, 0), (1, 3), True, (1, 0)),  # T: b starts on a
    ((0, 0), (2, 0), (2, 0), (3, 5), True, (2, 0)),  # shared end point
    ((0, 0), (2, 0), (1, 0), (3, 0), True, None),  # collinear overlap
    ((0, 0), (1, 0), (2, 0), (3, 0), False, None),  # collinear, disjoint
    ((0, 0), (1, 1), (0, 1), (1, 2), False, None),  # parallel
    ((0, 0), (1, 0), (0.5, 0.001), (0.5, 1), False, None),  # near miss
    ((0, 0), (4, 2), (1, 3), (3, -1), True, (2, 1)),
]


@pytest.mark.parametrize("a0, a1, b0, b1, hit, point", CASES)
def test_segment_intersection_hand_made(a0, a1, b0, b1, hit, point):
    for args in [(a0, a1, b0, b1), (b0, b1, a0, a1), (a1, a0, b1, b0)]:  # symmetric in the segments and their direction
        mask, pts = segment_intersections(*(seg(p) for p in args))
        assert bool(mask[0]) is hit
        if hit and point is not None:
            torch.testing.assert_close(pts[0], torch.tensor(point, dtype=torch.float64))
        if not hit:
            assert torch.isnan(pts[0]).all()


def _exact_intersects(a0, a1, b0, b1):
    """Reference in exact rational arithmetic on the same float inputs."""
    F = [tuple(Fraction(float(v)) for v in p) for p in (a0, a1, b0, b1)]

    def orient(p, q, r):
        v = (q[0] - p[0]) * (r[1] - p[1]) - (q[1] - p[1]) * (r[0] - p[0])
        return (v > 0) - (v < 0)

    def on(p, q, r):
        return min(p[0], q[0]) <= r[0] <= max(p[0], q[0]) and min(p[1], q[1]) <= r[1] <= max(p[1], q[1])

    p, q, r, s = F
    o1, o2, o3, o4 = orient(p, q, r), orient(p, q, s), orient(r, s, p), orient(r, s, q)
    if o1 * o2 < 0 and o3 * o4 < 0:
        return True
    return (o1 == 0 and on(p, q, r)) or (o2 == 0 and on(p, q, s)) or (o3 == 0 and on(r, s, p)) or (o4 == 0 and on(r, s, q))


def test_vectorised_test_agrees_with_exact_arithmetic():
    g = gen(0)
    pts = torch.randint(-4, 5, (4000, 2), generator=g).double() / 2  # a coarse grid: many touching / collinear cases
    a0, a1, b0, b1 = pts.split(1000)
    mask, inter = segment_intersections(a0, a1, b0, b1)
    ref = torch.tensor([_exact_intersects(*(x[i] for x in (a0, a1, b0, b1))) for i in range(1000)])
    assert torch.equal(mask, ref) and 100 < int(mask.sum()) < 900
    proper = mask & ~torch.isnan(inter).any(1)
    # every reported point lies on both segments (up to rounding)
    for s0, s1 in ((a0, a1), (b0, b1)):
        d = (s1 - s0)[proper]
        rel = inter[proper] - s0[proper]
        cross = d[:, 0] * rel[:, 1] - d[:, 1] * rel[:, 0]
        assert cross.abs().max() < 1e-9


def test_crossing_probability_exact_and_sampled():
    # four segments: the diagonals 0 and 1 and the vertical 2 cross pairwise, at (0, 0),
    # (0.5, 0.5) and (0.5, -0.5); segment 3 is far away: 3 of the 6 pairs cross
    x0 = torch.tensor([[-1.0, -1.0], [-1.0, 1.0], [0.5, -2.0], [10.0, 10.0]])
    x1 = torch.tensor([[1.0, 1.0], [1.0, -1.0], [0.5, 2.0], [11.0, 10.0]])
    exact = crossing_probability(x0, x1, n_pairs=None)
    assert exact.n_pairs == 6 and exact.count == 3 and exact.probability == 0.5
    got = {tuple(round(v, 6) for v in p.tolist()) for p in exact.points}
    assert got == {(0.0, 0.0), (0.5, 0.5), (0.5, -0.5)}
    sampled = crossing_probability(x0, x1, n_pairs=10_000, generator=gen(3))
    assert sampled.n_pairs == 10_000 and abs(sampled.probability - 0.5) < 0.03
    assert sampled.points.shape == (sampled.count, 2) and bool((sampled.i != sampled.j).all())
    again = crossing_probability(x0, x1, n_pairs=10_000, generator=gen(3))
    assert again.count == sampled.count


def test_crossing_probability_extremes_and_bad_input():
    x = torch.linspace(0, 1, 50)
    parallel0 = torch.stack([x, torch.zeros(50)], 1)
    assert crossing_probability(parallel0, parallel0 + torch.tensor([0.0, 1.0]), generator=gen(0)).probability == 0.0
    a = torch.tensor([[-1.0, 0.0], [0.0, -1.0]])
    b = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    assert crossing_probability(a, b, generator=gen(0)).probability == 1.0
    with pytest.raises(DataError, match="needs 2-D points"):
        crossing_probability(torch.zeros(5, 3), torch.ones(5, 3))
    with pytest.raises(DataError, match="at least 2 pairs"):
        crossing_probability(torch.zeros(1, 2), torch.ones(1, 2))


class Constant(nn.Module):
    def forward(self, x, t):
        return torch.ones_like(x) * torch.tensor([2.0, -1.0])


class Rotation(nn.Module):
    """dZ/dt = J Z: circular arcs of angle 1 rad (curved paths)."""

    def forward(self, x, t):
        return torch.stack([-x[:, 1], x[:, 0]], 1)


def test_straightness():
    x0 = torch.randn(500, 2, generator=gen(0))
    s = straightness(Constant(), x0, steps=10)
    assert s.value == pytest.approx(0.0, abs=1e-10) and s.nfe == 10
    torch.testing.assert_close(s.x1, x0 + torch.tensor([2.0, -1.0]))
    # unit circle: S = int ||chord - v||^2 = r^2 - |chord|^2 = 1 - 4 sin^2(1/2)
    ring = torch.nn.functional.normalize(x0, dim=1)
    s = straightness(Rotation(), ring, steps=2000, batch_size=128)
    assert s.value == pytest.approx(1 - 4 * math.sin(0.5) ** 2, rel=2e-3)
    assert s.profile.shape == (2000,) and s.times[0] == 0
    with pytest.raises(ValueError):
        straightness(Rotation(), ring, steps=0)


def test_transport_cost_and_ot_excess():
    x0 = torch.randn(300, 1, generator=gen(0))
    x1 = 2 * torch.randn(300, 1, generator=gen(1)) + 1
    mono = transport_cost(x0.sort(0).values, x1.sort(0).values)  # 1-D: the sorted coupling is optimal
    assert mono.excess == pytest.approx(0.0, abs=1e-6) and mono.cost == pytest.approx(mono.ot_cost, rel=1e-6)
    anti = transport_cost(x0.sort(0).values, x1.sort(0, descending=True).values)
    assert anti.excess > 1.0 and anti.ot_cost == pytest.approx(mono.ot_cost, rel=1e-6)
    assert transport_cost(x0, x1, exact_ot=False).ot_cost is None
    with pytest.raises(DataError):
        transport_cost(x0, x1[:10])
    d = diagnose_coupling(torch.randn(200, 2, generator=gen(2)), torch.randn(200, 2, generator=gen(3)), n_pairs=2000)
    row = d.as_row()
    assert row["crossing"] > 0.1 and row["transport_excess"] > 0 and set(row) == {"transport_cost", "ot_cost", "transport_excess", "crossing"}
    assert diagnose_coupling(torch.randn(20, 3), torch.randn(20, 3)).crossings is None
