"""Distances between sample sets: exact Wasserstein-2 (POT) and the energy distance."""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from rectflow.errors import DataError

__all__ = ["wasserstein2", "energy_distance"]


def _as_2d(x: Tensor | np.ndarray, name: str) -> Tensor:
    t = torch.as_tensor(x).detach()
    if t.dim() < 1 or t.shape[0] == 0:
        raise DataError(f"{name}: expected a non-empty set of samples (N, ...), got shape {tuple(t.shape)}")
    t = t.reshape(t.shape[0], -1)
    if t.shape[1] == 0:
        raise DataError(f"{name}: expected a non-empty set of samples (N, ...), got shape {tuple(t.shape)}")
    if not torch.isfinite(t).all():
        raise DataError(f"{name}: samples contain NaN or inf")
    return t.cpu().double()


def wasserstein2(x: Tensor | np.ndarray, y: Tensor | np.ndarray, *, max_iter: int | None = None) -> float:
    """Exact W2 between the empirical measures of x (N, ...) and y (M, ...):
    sqrt(min_P sum_ij P_ij ||x_i - y_j||^2), solved by POT's network simplex (EMD)."""
    import ot  # POT: imported on first use (it is slow to import)

    a, b = _as_2d(x, "x"), _as_2d(y, "y")
    if a.shape[1] != b.shape[1]:
        raise DataError(f"wasserstein2: x has {a.shape[1]} dims, y has {b.shape[1]}")
    cost = ot.dist(a.numpy(), b.numpy())  # squared Euclidean
    n, m = cost.shape
    w2sq = ot.emd2(np.full(n, 1.0 / n), np.full(m, 1.0 / m), cost, numItermax=max_iter or max(1_000_000, 100 * n * m))
    return math.sqrt(max(float(w2sq), 0.0))


def _mean_pairwise_distance(a: Tensor, b: Tensor, chunk: int = 2048) -> float:
    total = 0.0
    for i in range(0, a.shape[0], chunk):
        total += float(torch.cdist(a[i : i + chunk], b).sum())
    return total / (a.shape[0] * b.shape[0])


def energy_distance(x: Tensor | np.ndarray, y: Tensor | np.ndarray) -> float:
    """Energy distance 2 E||X - Y|| - E||X - X'|| - E||Y - Y'|| between the empirical measures
    (the V-statistic: always >= 0, and 0 only for identical point sets)."""
    a, b = _as_2d(x, "x"), _as_2d(y, "y")
    if a.shape[1] != b.shape[1]:
        raise DataError(f"energy_distance: x has {a.shape[1]} dims, y has {b.shape[1]}")
    xy = _mean_pairwise_distance(a, b)
    xx = _mean_pairwise_distance(a, a)
    yy = _mean_pairwise_distance(b, b)
    return 2 * xy - xx - yy
