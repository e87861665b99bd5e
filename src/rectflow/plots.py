"""The seed example's three figures (matplotlib, written atomically as PNG):
loss curve, generated vs real samples, and trajectories coloured by t."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import matplotlib

matplotlib.use("Agg")  # files only, never a window
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import Tensor  # noqa: E402

from .io import atomic_path  # noqa: E402

__all__ = ["plot_loss", "plot_samples", "plot_trajectories", "plot_quality_vs_nfe", "save_figure"]


def save_figure(fig: plt.Figure, path: str | Path, dpi: int = 120) -> Path:
    """Save a figure as PNG atomically and close it."""
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    return path


def _np(x: Tensor | np.ndarray) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, Tensor) else np.asarray(x)


def plot_loss(rows: Sequence[dict[str, Any]], path: str | Path, title: str = "training loss") -> Path:
    """Loss vs step from metrics.jsonl rows (log scale)."""
    fig, ax = plt.subplots(figsize=(5, 3.5))
    steps = [r["step"] for r in rows if "loss" in r]
    ax.plot(steps, [r["loss"] for r in rows if "loss" in r], lw=1.2, marker="o" if len(steps) < 5 else None)
    ax.set(xlabel="step", ylabel="loss", title=title, yscale="log")
    ax.grid(alpha=0.3)
    return save_figure(fig, path)


def plot_samples(
    generated: Tensor | np.ndarray,
    real: Tensor | np.ndarray,
    path: str | Path,
    source: Tensor | np.ndarray | None = None,
    title: str = "samples",
    max_points: int = 3000,
) -> Path:
    """Scatter of generated vs real target points (2-D; first two coordinates otherwise)."""
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    if source is not None:
        s = _np(source)[:max_points]
        ax.scatter(s[:, 0], s[:, 1], s=2, c="tab:gray", alpha=0.25, label="source $\\pi_0$")
    r, g = _np(real)[:max_points], _np(generated)[:max_points]
    ax.scatter(r[:, 0], r[:, 1], s=2, c="tab:blue", alpha=0.35, label="target $\\pi_1$")
    ax.scatter(g[:, 0], g[:, 1], s=2, c="tab:orange", alpha=0.5, label="generated")
    ax.set(title=title, aspect="equal")
    ax.legend(markerscale=4, loc="upper right", fontsize=7)
    return save_figure(fig, path)


def plot_trajectories(
    trajectory: Tensor | np.ndarray, path: str | Path, times: Tensor | np.ndarray | None = None, title: str = "trajectories", max_paths: int = 300
) -> Path:
    """ODE paths (K, B, 2) drawn as lines coloured by t, with start (grey) and end (blue) points."""
    traj = _np(trajectory)[:, :max_paths]
    k = traj.shape[0]
    t = _np(times) if times is not None else np.linspace(0, 1, k)
    fig, ax = plt.subplots(figsize=(4.8, 4.5))
    from matplotlib.collections import LineCollection

    segs = np.stack([traj[:-1], traj[1:]], axis=2)  # (K-1, B, 2, 2)
    colours = np.repeat(((t[:-1] + t[1:]) / 2)[:, None], traj.shape[1], axis=1)
    lc = LineCollection(segs.reshape(-1, 2, 2), cmap="viridis", linewidths=0.6, alpha=0.7)
    lc.set_array(colours.reshape(-1))
    ax.add_collection(lc)
    ax.scatter(traj[0, :, 0], traj[0, :, 1], s=3, c="tab:gray", label="$Z_0$")
    ax.scatter(traj[-1, :, 0], traj[-1, :, 1], s=3, c="tab:blue", label="$Z_1$")
    ax.autoscale()
    fig.colorbar(lc, ax=ax, label="t")
    ax.set(title=title, aspect="equal")
    ax.legend(markerscale=3, fontsize=7, loc="upper right")
    return save_figure(fig, path)


def plot_quality_vs_nfe(series: dict[str, Sequence[tuple[int, float]]], path: str | Path, metric: str = "W2") -> Path:
    """One line per label: (NFE, metric) points on a log-NFE axis."""
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for label, pts in series.items():
        pts = sorted(pts)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
    ax.set(xscale="log", xlabel="NFE", ylabel=metric, title=f"{metric} vs NFE")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    return save_figure(fig, path)
