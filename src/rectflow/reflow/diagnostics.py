"""Straight-coupling diagnostics for any flow or coupling (theory §4.3-4.5).

* straightness S = int_0^1 E ||(Z1 - Z0) - v(Z_t, t)||^2 dt of a flow (0 = straight paths);
* transport cost E ||Z1 - Z0||^2 of a coupling, and its excess over the exact discrete optimal
  transport cost of the same two point sets (POT's EMD);
* crossing probability of a 2-D coupling: the fraction of random pairs of segments
  [Z0^i, Z1^i], [Z0^j, Z1^j] that intersect, by an exact segment-intersection test, together
  with the intersection points (the seed's figure plots them in red).

Reflow lowers all three; distillation cannot lower the crossing probability of its coupling.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from rectflow.diffusion.specs import sample
from rectflow.errors import DataError
from rectflow.flow.metrics import wasserstein2
from rectflow.flow.solvers import time_vector

__all__ = ['Straightness', 'TransportCost', 'Crossings', 'CouplingDiagnostics', 'straightness', 'transport_cost', 'segment_intersections', 'crossing_probability', 'flow_coupling', 'diagnose_coupling', 'diagnose_flow']


class Straightness(NamedTuple):
    """``value``: S; ``profile``: (N,) E||(Z1 - Z0) - v(Z_t, t)||^2 at the grid times ``times`` (N,);
    ``x1``: the Euler end points (B, ...); ``nfe``: velocity evaluations per sample."""

    value: float
    profile: Tensor
    times: Tensor
    x1: Tensor
    nfe: int


@torch.no_grad()
def straightness(model: nn.Module, x0: Tensor, *, steps: int = 100, batch_size: int = 4096) -> Straightness:
    """Straightness of the model's own ODE paths from ``x0`` (B, ...) (theory §4.3).

    The path is integrated with Euler on a uniform grid of ``steps`` intervals, and S uses the
    same velocities (left Riemann sum), so for this discrete flow Z1 - Z0 = (1/N) sum_k v_k and
    S = (1/N) sum_k E||(Z1 - Z0) - v_k||^2 exactly: 0 iff every path is a straight line
    travelled at constant speed.  Samples are processed in chunks of ``batch_size`` (S is a mean
    over samples, so chunking does not change it).
    """
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"straightness: steps must be an integer >= 1, got {steps!r}")
    was_training = model.training
    model.eval()
    h = 1.0 / steps
    times = torch.arange(steps, dtype=torch.float64) * h
    profile = torch.zeros(steps, dtype=torch.float64)
    ends = []
    try:
        for chunk in x0.split(batch_size):
            z, vs = chunk, []
            for k in range(steps):
                v = model(z, time_vector(chunk, float(times[k]))).to(chunk.dtype)
                vs.append(v)
                z = z + h * v  # theory §3.1: Euler step
            dz = z - chunk
            for k, v in enumerate(vs):
                profile[k] += float((dz - v).square().flatten(1).sum(1).cpu().double().sum())  # theory §4.3: ||(Z1 - Z0) - v(Z_t, t)||^2
            ends.append(z)
    finally:
        model.train(was_training)
    profile /= x0.shape[0]
    return Straightness(float(profile.sum() * h), profile, times, torch.cat(ends), steps)


class TransportCost(NamedTuple):
    """``cost``: E||Z1 - Z0||^2 of the coupling; ``ot_cost``: the exact OT cost between the two point
    sets (min over pairings); ``excess``: cost - ot_cost >= 0 (0: the coupling is optimal)."""
    cost: float
    ot_cost: float | None
    excess: float | None


def transport_cost(x0: Tensor, x1: Tensor, *, exact_ot: bool = True) -> TransportCost:
    """Quadratic transport cost E||x1 - x0||^2 of the coupling (x0[i], x1[i]) (theory §4.4),
    and, with ``exact_ot``, the discrete optimal cost of the same points (POT EMD, O(n^2) memory)."""
    if x0.shape != x1.shape or x0.dim() < 2 or x0.shape[0] == 0:
        raise DataError(f"transport_cost: x0 and x1 must be non-empty (N, ...) of equal shape, got {tuple(x0.shape)} and {tuple(x1.shape)}")
    cost = float((x1.cpu().double() - x0.cpu().double()).flatten(1).square().sum(1).mean())  # theory §4.4: E||Z1 - Z0||^2
    if not exact_ot:
        return TransportCost(cost, None, None)

    ot = wasserstein2(x0, x1) ** 2  # min over couplings of the empirical measures
    return TransportCost(cost, ot, max(cost - ot, 0.0))


def _cross(u: Tensor, v: Tensor) -> Tensor:
    return u[..., 0] * v[..., 1] - u[..., 1] * v[..., 0]


def _on_segment(p: Tensor, q: Tensor, r: Tensor) -> Tensor:
    """r lies in the bounding box of segment [p, q] (with collinearity checked by the caller)."""
    lo, hi = torch.minimum(p, q), torch.maximum(p, q)
    return ((r >= lo) & (r <= hi)).all(dim=-1)


def segment_intersections(a0: Tensor, a1: Tensor, b0: Tensor, b1: Tensor) -> tuple[Tensor, Tensor]:
    """Exact intersection test of M segment pairs [a0, a1] and [b0, b1], each (M, 2).

    Uses orientation signs in float64 (segments that touch or overlap count as intersecting).
    Returns ``(mask (M,) bool, points (M, 2) float64)``: the intersection point where mask is
    True (for collinear overlaps, an end point inside the overlap), NaN elsewhere.
    """
    a0, a1, b0, b1 = (x.double() for x in (a0, a1, b0, b1))
    r, s = a1 - a0, b1 - b0
    o1 = torch.sign(_cross(r, b0 - a0))  # side of b0 w.r.t. line a
    o2 = torch.sign(_cross(r, b1 - a0))
    o3 = torch.sign(_cross(s, a0 - b0))  # side of a0 w.r.t. line b
    o4 = torch.sign(_cross(s, a1 - b0))
    proper = (o1 * o2 < 0) & (o3 * o4 < 0)
    t_b0 = (o1 == 0) & _on_segment(a0, a1, b0)
    t_b1 = (o2 == 0) & _on_segment(a0, a1, b1)
    t_a0 = (o3 == 0) & _on_segment(b0, b1, a0)
    t_a1 = (o4 == 0) & _on_segment(b0, b1, a1)
    mask = proper | t_b0 | t_b1 | t_a0 | t_a1
    denom = _cross(r, s)
    safe = torch.where(denom == 0, torch.ones_like(denom), denom)
    u = _cross(b0 - a0, s) / safe
    pts = a0 + u[:, None] * r  # line a at the parameter where it meets line b
    nan = torch.full_like(pts, float("nan"))
    pts = torch.where(proper[:, None], pts, nan)
    for touch, p in ((t_a1, a1), (t_a0, a0), (t_b1, b1), (t_b0, b0)):
        pts = torch.where((touch & ~proper)[:, None], p, pts)
    return mask, pts


class Crossings(NamedTuple):
    """``probability``: fraction of the ``n_pairs`` segment pairs that intersect (``count`` of them);
    ``points`` (count, 2): the intersection points; ``i``, ``j`` (count,): the segments' indices."""
    probability: float
    n_pairs: int
    count: int
    points: Tensor
    i: Tensor
    j: Tensor


def crossing_probability(
    x0: Tensor, x1: Tensor, *, n_pairs: int | None = 10_000, generator: torch.Generator | None = None
) -> Crossings:
    """Crossing probability of the 2-D coupling (x0[i], x1[i]) (theory §4.5).

    ``n_pairs`` random pairs of distinct segments (the seed uses 10,000), drawn with
    ``generator``; ``None`` tests all N (N - 1) / 2 pairs, giving the exact probability for
    the given points.
    """
    if x0.shape != x1.shape or x0.dim() != 2:
        raise DataError(f"crossing_probability: x0 and x1 must be (N, 2) of equal shape, got {tuple(x0.shape)} and {tuple(x1.shape)}")
    if x0.shape[1] != 2:
        raise DataError(f"crossing_probability needs 2-D points (segments in the plane), got dimension {x0.shape[1]}")
    n = x0.shape[0]
    if n < 2:
        raise DataError(f"crossing_probability needs at least 2 pairs, got {n}")
    x0, x1 = x0.detach().cpu(), x1.detach().cpu()
    if n_pairs is None:
        i, j = torch.triu_indices(n, n, offset=1)
    else:
        if n_pairs < 1:
            raise ValueError(f"crossing_probability: n_pairs must be >= 1, got {n_pairs}")
        i = torch.randint(n, (n_pairs,), generator=generator)
        j = (i + torch.randint(1, n, (n_pairs,), generator=generator)) % n  # uniform over j != i
    mask, pts = segment_intersections(x0[i], x1[i], x0[j], x1[j])
    count = int(mask.sum())
    return Crossings(count / i.numel(), int(i.numel()), count, pts[mask].float(), i[mask], j[mask])


@torch.no_grad()
def flow_coupling(
    model: nn.Module,
    x0: Tensor,
    *,
    solver: str = "dopri5",
    rtol: float = 1e-5,
    atol: float = 1e-5,
    batch_size: int | None = None,
) -> tuple[Tensor, Tensor]:
    """The coupling (Z0, Z1 = Flow(Z0)) a model induces, with any solver spec ("dopri5", "euler:1", ...)."""

    return x0, sample(model, x0, solver, rtol=rtol, atol=atol, batch_size=batch_size).x


@dataclass
class CouplingDiagnostics:
    """Transport cost (with its excess over exact OT) and crossing probability of one coupling."""

    transport: TransportCost
    crossings: Crossings | None  # None for couplings that are not 2-D

    def as_row(self) -> dict[str, Any]:
        return {
            "transport_cost": self.transport.cost,
            "ot_cost": self.transport.ot_cost,
            "transport_excess": self.transport.excess,
            "crossing": self.crossings.probability if self.crossings is not None else None,
        }


def diagnose_coupling(
    x0: Tensor, x1: Tensor, *, n_pairs: int | None = 10_000, seed: int = 0, exact_ot: bool = True
) -> CouplingDiagnostics:
    """Transport cost, OT excess and (for 2-D points) crossing probability of the coupling (x0[i], x1[i])."""
    flat0, flat1 = x0.reshape(x0.shape[0], -1), x1.reshape(x1.shape[0], -1)
    tc = transport_cost(flat0, flat1, exact_ot=exact_ot)
    cr = None
    if flat0.shape[1] == 2:
        cr = crossing_probability(flat0, flat1, n_pairs=n_pairs, generator=torch.Generator().manual_seed(seed))
    return CouplingDiagnostics(tc, cr)


def diagnose_flow(
    model: nn.Module,
    x0: Tensor,
    *,
    solver: str = "dopri5",
    straightness_steps: int | None = 100,
    n_pairs: int | None = 10_000,
    seed: int = 0,
    exact_ot: bool = True,
    rtol: float = 1e-5,
    atol: float = 1e-5,
) -> dict[str, Any]:
    """All diagnostics of a flow from source samples ``x0``: S (Euler, ``straightness_steps``;
    None skips it) and the cost / OT excess / crossings of its coupling (x0, Flow(x0)) solved
    with ``solver``.  Returns a flat dict (keys: straightness, transport_cost, ot_cost,
    transport_excess, crossing) plus ``"coupling"``: (z0, z1) and ``"crossings"``: the :class:`Crossings`."""
    z0, z1 = flow_coupling(model, x0, solver=solver, rtol=rtol, atol=atol)
    diag = diagnose_coupling(z0, z1, n_pairs=n_pairs, seed=seed, exact_ot=exact_ot)
    s = straightness(model, x0, steps=straightness_steps).value if straightness_steps else None
    return {"straightness": s, **diag.as_row(), "coupling": (z0, z1), "crossings": diag.crossings}
