"""Couplings: how training pairs (X0, X1) with X0 ~ pi0, X1 ~ pi1 are drawn (theory §2.3, §4.1).

A coupling is any object with ``sample(n, generator=..., device=...) -> (x0, x1)`` and a bool attribute
``heavy`` (the :class:`Coupling` protocol; ``heavy = False`` unless a draw is CPU-heavy).
Rectified flow accepts any coupling; the only difference between 1-RF and 2-RF is the
coupling (theory §4.1).  This module holds

* :class:`IndependentCoupling`: X0 and X1 drawn independently (the paper's default);
* :class:`MinibatchOTCoupling`: draw independent batches, then re-pair them by the exact
  (EMD) or entropic (Sinkhorn) optimal-transport plan of the batch;
* :func:`ot_pairing`: that re-pairing as a function on two tensors (CPU or GPU).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator, Protocol, runtime_checkable

import numpy as np
import torch
from torch import Tensor

from rectflow.draws import draw_device
from rectflow.flow.paths import exact_dtype

__all__ = ["Coupling", "Sampler", "IndependentCoupling", "MinibatchOTCoupling", "ot_pairing", "squared_cost"]


class Sampler(Protocol):
    """Anything that draws i.i.d. samples: ``sample(n, generator, device) -> Tensor (n, *shape)``."""

    def sample(self, n: int, *, generator: torch.Generator | None = None, device=None) -> Tensor: ...


@runtime_checkable
class Coupling(Protocol):
    """Draws n pairs (x0, x1), each of shape (n, *shape).

    ``heavy``: True when a draw costs enough CPU time (exact minibatch OT) to be worth drawing
    ahead in a DataLoader worker (see :class:`~rectflow.engine.trainer.Trainer`); False otherwise.
    """

    heavy: bool

    def sample(self, n: int, *, generator: torch.Generator | None = None, device=None) -> tuple[Tensor, Tensor]: ...


def squared_cost(x0: Tensor, x1: Tensor) -> Tensor:
    """Pairwise cost C_ij = ||x0_i - x1_j||^2 for x0 (n, ...), x1 (m, ...); returns (n, m)."""
    a, b = x0.reshape(x0.shape[0], -1), x1.reshape(x1.shape[0], -1)
    return torch.cdist(a, b).square()


def ot_pairing(
    x0: Tensor,
    x1: Tensor,
    *,
    method: str = "exact",
    reg: float = 0.05,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """Indices (i, j) pairing x0[i] with x1[j] along the batch OT plan for the squared distance.

    ``exact``: the EMD plan (POT's network simplex).  With equal batch sizes and uniform
    weights it is a permutation (Birkhoff), so j is a permutation of range(n) and i = arange(n).
    ``sinkhorn``: the entropic plan with regulariser ``reg`` times the mean cost; one
    partner is drawn for each x0[i] from its row of the plan (pairs may repeat).
    """
    import ot  # POT: imported on first use (it is slow to import)

    n, m = x0.shape[0], x1.shape[0]
    if n == 0 or m == 0:
        raise ValueError("ot_pairing: empty batch")
    with _full_fp32_matmul():  # cdist multiplies matrices: under TF32 the "exact" plan would be exact for perturbed costs
        cost = squared_cost(x0.detach().float(), x1.detach().float())
    device = x0.device
    if method == "exact":
        c = cost.double().cpu().numpy()
        plan = ot.emd(np.full(n, 1.0 / n), np.full(m, 1.0 / m), c, numItermax=max(100_000, 50 * n * m))
        if n == m:
            j = torch.from_numpy(plan.argmax(axis=1)).to(device)
            return torch.arange(n, device=device), j
        return _draw_from_plan(torch.from_numpy(plan).to(device), generator)
    if method == "sinkhorn":
        if not reg > 0:
            raise ValueError(f"ot_pairing: sinkhorn needs reg > 0, got {reg}")
        c = cost.to(exact_dtype(cost.device))  # Sinkhorn runs where the cost is: float64 where that device has it
        a = torch.full((n,), 1.0 / n, dtype=c.dtype, device=c.device)
        b = torch.full((m,), 1.0 / m, dtype=c.dtype, device=c.device)
        plan = ot.sinkhorn(a, b, c, reg * float(c.mean()), method="sinkhorn_log", numItermax=1000)
        return _draw_from_plan(plan, generator)
    raise ValueError(f"ot_pairing: unknown method {method!r}; choose 'exact' or 'sinkhorn'")


@contextlib.contextmanager
def _full_fp32_matmul() -> Iterator[None]:
    """Turn CUDA's TF32 matrix products off for the block (no effect on the CPU)."""
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old


def _draw_from_plan(plan: Tensor, generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
    """For each row i, draw a column j with probability plan[i, j] / sum_j plan[i, j]."""
    probs = plan.float().clamp_min(0)
    probs = probs / probs.sum(dim=1, keepdim=True).clamp_min(1e-30)
    gdev = draw_device(generator, probs.device)
    j = torch.multinomial(probs.to(gdev), 1, generator=generator).squeeze(1).to(plan.device)
    return torch.arange(plan.shape[0], device=plan.device), j


@dataclass
class IndependentCoupling:
    """X0 ~ pi0 and X1 ~ pi1 drawn independently (theory §2.3, the default coupling)."""

    source: Sampler
    target: Sampler
    heavy = False  # a draw is two sampler calls

    def sample(self, n: int, *, generator=None, device=None) -> tuple[Tensor, Tensor]:
        x0 = self.source.sample(n, generator=generator, device=device)
        x1 = self.target.sample(n, generator=generator, device=device)
        return x0, x1


@dataclass
class MinibatchOTCoupling:
    """Independent batches re-paired by their batch optimal-transport plan (TorchCFM-style OT-CFM).

    ``method``: ``"exact"`` (EMD; practical up to a few thousand points) or ``"sinkhorn"``
    (entropic, regulariser ``reg`` relative to the mean cost; runs on the tensors' device).
    """

    source: Sampler
    target: Sampler
    method: str = "exact"
    reg: float = 0.05

    @property
    def heavy(self) -> bool:
        """True: drawing costs CPU time worth hiding in DataLoader workers (see Trainer)."""
        return True

    def __post_init__(self) -> None:
        if self.method not in ("exact", "sinkhorn"):
            raise ValueError(f"MinibatchOTCoupling: method must be 'exact' or 'sinkhorn', got {self.method!r}")
        if self.method == "sinkhorn" and not self.reg > 0:
            raise ValueError(f"MinibatchOTCoupling: sinkhorn needs reg > 0, got {self.reg}")

    def sample(self, n: int, *, generator=None, device=None) -> tuple[Tensor, Tensor]:
        x0 = self.source.sample(n, generator=generator, device=device)
        x1 = self.target.sample(n, generator=generator, device=device)
        i, j = ot_pairing(x0, x1, method=self.method, reg=self.reg, generator=generator)
        return x0[i], x1[j]
