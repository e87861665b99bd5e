"""The seed example's three figures (matplotlib, written atomically as PNG):
loss curve, generated vs real samples, and trajectories coloured by t (for a one-step map, its
arrows source -> sample)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from matplotlib.collections import LineCollection
from matplotlib.figure import Figure
from torch import Tensor

from rectflow.data.image_sets import ImageDataset
from rectflow.diffusion.specs import sample
from rectflow.engine.io import atomic_path, read_jsonl
from rectflow.images.conditional import sample_guided
from rectflow.images.generate import save_image_grid, save_pair_grid
from rectflow.runs.evaluation import heldout_samples
from rectflow.runs.experiment import Run, sample_shape, sampling_steps

__all__ = ["plot_loss", "plot_samples", "plot_trajectories", "plot_quality_vs_nfe", "draw_floor", "plot_map", "save_figure", "subplots", "plot_run"]


def subplots(*args: Any, figsize: tuple[float, float], layout: str | None = None, **kw: Any) -> tuple[Figure, Any]:
    """A figure and its axes, drawn off-screen (matplotlib's object API: no pyplot, so importing
    rectflow never changes the user's matplotlib backend)."""
    fig = Figure(figsize=figsize, layout=layout)
    return fig, fig.subplots(*args, **kw)


def save_figure(fig: Figure, path: str | Path, dpi: int = 120) -> Path:
    """Save a figure as PNG atomically."""
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi, bbox_inches="tight")
    return path


def _np(x: Tensor | np.ndarray) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, Tensor) else np.asarray(x)


def plot_loss(rows: Sequence[dict[str, Any]], path: str | Path, title: str = "training loss") -> Path:
    """Loss vs step from metrics.jsonl rows (log scale)."""
    fig, ax = subplots(figsize=(5, 3.5))
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
    fig, ax = subplots(figsize=(4.5, 4.5))
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
    fig, ax = subplots(figsize=(4.8, 4.5))

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


def plot_quality_vs_nfe(series: dict[str, Sequence[tuple[int, float]]], path: str | Path, metric: str = "W2", floor: float | None = None) -> Path:
    """One line per label: (NFE, metric) points on a log-NFE axis; ``floor``: the finite-sample
    floor of the metric (what a perfect model scores on these reference points), a dashed line."""
    fig, ax = subplots(figsize=(5, 3.5))
    for label, pts in series.items():
        pts = sorted(pts)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
    if floor is not None:
        draw_floor(ax, floor, f"finite-sample floor ({floor:.3g})")
    ax.set(xscale="log", xlabel="NFE", ylabel=metric, title=f"{metric} vs NFE")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def draw_floor(ax: Any, value: float, label: str, color: Any = "0.25") -> None:
    """A finite-sample floor on a metric-vs-NFE chart: a dashed horizontal line."""
    ax.axhline(value, ls="--", lw=1.0, color=color, label=label)


def plot_map(x0: Tensor | np.ndarray, x1: Tensor | np.ndarray, path: str | Path, title: str = "one-step map", max_arrows: int = 300) -> Path:
    """A one-step map x0 -> x1 (B, 2) as arrows from each source point (grey) to its sample (blue):
    a one-step sample has no path in t to colour."""
    a, b = _np(x0)[:max_arrows, :2], _np(x1)[:max_arrows, :2]
    fig, ax = subplots(figsize=(4.5, 4.5))
    d = b - a
    ax.quiver(a[:, 0], a[:, 1], d[:, 0], d[:, 1], angles="xy", scale_units="xy", scale=1, width=0.002, color="0.5", alpha=0.6)
    ax.scatter(a[:, 0], a[:, 1], s=3, c="tab:gray", label="$Z_0$")
    ax.scatter(b[:, 0], b[:, 1], s=3, c="tab:blue", label="$Z_1 = Z_0 + v(Z_0, 0)$")
    ax.set(title=title, aspect="equal")
    ax.legend(markerscale=3, fontsize=7, loc="upper right")
    return save_figure(fig, path)


# ----- reflow diagnostics (theory §4.3-4.5): crossings and stage-by-stage comparison ----------

__all__ += ["plot_crossings", "plot_stages"]


def _draw_coupling(ax, x0: np.ndarray, x1: np.ndarray, points: np.ndarray, max_segments: int) -> None:
    """Segments [x0_i, x1_i] (grey), end points, and intersection points in red (the seed's figure)."""
    k = min(max_segments, x0.shape[0])
    segs = np.stack([x0[:k, :2], x1[:k, :2]], axis=1)
    ax.add_collection(LineCollection(segs, colors="0.55", linewidths=0.4, alpha=0.5))
    ax.scatter(x0[:k, 0], x0[:k, 1], s=2, c="tab:gray", label="$Z_0$")
    ax.scatter(x1[:k, 0], x1[:k, 1], s=2, c="tab:blue", label="$Z_1$")
    if len(points):
        ax.scatter(points[:, 0], points[:, 1], s=4, c="red", label="crossings", zorder=3)
    ax.autoscale()
    ax.set_aspect("equal")


def plot_crossings(
    x0: Tensor | np.ndarray,
    x1: Tensor | np.ndarray,
    points: Tensor | np.ndarray,
    path: str | Path,
    title: str = "crossings",
    max_segments: int = 300,
) -> Path:
    """One coupling: its straight segments [Z0, Z1] and the intersection points of random segment
    pairs in red (as returned by :func:`rectflow.reflow.diagnostics.crossing_probability`)."""
    fig, ax = subplots(figsize=(4.5, 4.5))
    _draw_coupling(ax, _np(x0), _np(x1), _np(points).reshape(-1, 2), max_segments)
    ax.set(title=title)
    ax.legend(markerscale=3, fontsize=7, loc="upper right")
    return save_figure(fig, path)


def plot_stages(panels: Sequence[dict[str, Any]], path: str | Path, max_paths: int = 300, title: str | None = None) -> Path:
    """Stage-by-stage figure: one column per stage (random coupling, 1-RF, 2-RF, ...).

    Each panel is a dict with ``label``, ``x0``, ``x1`` (N, 2): the stage's coupling, ``points``
    (C, 2): its crossing points, ``crossing``: the probability, and optionally ``trajectory``
    (K, B, 2) with ``times`` (K,): the ODE paths.  Top row: trajectories coloured by t (the
    straight segments when there is no trajectory); bottom row: segments and crossings in red.
    """
    n = len(panels)
    pts = np.concatenate([np.concatenate([_np(p["x0"])[:, :2], _np(p["x1"])[:, :2]]) for p in panels])
    span = np.ptp(pts, axis=0) + 1e-9
    row_h = float(np.clip(3.2 * span[1] / span[0], 1.6, 4.5))  # equal aspect: rows as tall as the data
    fig, axes = subplots(2, n, figsize=(3.6 * n, 2 * row_h + 0.9), squeeze=False, sharex=True, sharey=True, layout="constrained")
    for col, p in enumerate(panels):
        top, bottom = axes[0, col], axes[1, col]
        x0, x1 = _np(p["x0"]), _np(p["x1"])
        traj = p.get("trajectory")
        if traj is not None:
            tr = _np(traj)[:, :max_paths]
            t = _np(p["times"]) if p.get("times") is not None else np.linspace(0, 1, tr.shape[0])
            segs = np.stack([tr[:-1], tr[1:]], axis=2).reshape(-1, 2, 2)
            colours = np.repeat(((t[:-1] + t[1:]) / 2)[:, None], tr.shape[1], axis=1).reshape(-1)
            lc = LineCollection(segs, cmap="viridis", linewidths=0.5, alpha=0.7)
            lc.set_array(colours)
            top.add_collection(lc)
            top.scatter(tr[0, :, 0], tr[0, :, 1], s=2, c="tab:gray")
            top.scatter(tr[-1, :, 0], tr[-1, :, 1], s=2, c="tab:blue")
            top.autoscale()
            top.set_aspect("equal")
            top.set_title(f"{p['label']}: trajectories", fontsize=9)
        else:
            _draw_coupling(top, x0, x1, np.zeros((0, 2)), max_paths)
            top.set_title(f"{p['label']}: coupling", fontsize=9)
        _draw_coupling(bottom, x0, x1, _np(p.get("points", np.zeros((0, 2)))).reshape(-1, 2), max_paths)
        cr = p.get("crossing")
        bottom.set_title(f"{p['label']}: crossing p = {cr:.4f}" if cr is not None else p["label"], fontsize=9)
    if title:
        fig.suptitle(title)
    return save_figure(fig, path)


def plot_run(run: Run, *, n: int = 2000, steps: int | None = None) -> list[Path]:
    """Write the run's loss curve, samples-vs-data scatter and trajectory plot into run/plots;
    sampled with ``steps`` Euler steps (default :func:`~rectflow.runs.experiment.sampling_steps`:
    1 for a one-step map, whose map is drawn as arrows in ``map.png`` instead of trajectories)."""
    out = run.path / "plots"
    steps = sampling_steps(run.config) if steps is None else steps
    if len(sample_shape(run.source)) == 3:
        return _plot_image_run(run, out, steps)
    x0, x1 = heldout_samples(run, n)
    res = sample(run.model, x0, f"euler:{steps}", trajectory=True)
    name = f"{_label(run.config.source)} -> {_label(run.config.target)}"
    paths = [plot_samples(res.x, x1, out / "samples.png", title=f"{name}: Euler {steps} steps")]
    if steps == 1:  # a one-step map (a distilled run): its arrows, no path in t
        paths.append(plot_map(x0, res.x, out / "map.png", title=f"{name}: one-step map"))
    else:
        paths.append(plot_trajectories(res.trajectory[:: max(1, steps // 50)], out / "trajectories.png", res.times[:: max(1, steps // 50)], title=f"{name}: trajectories"))
    rows = read_jsonl(run.path / "metrics.jsonl")
    if rows:
        paths.append(plot_loss(rows, out / "loss.png", title=f"{name}: loss"))
    return paths


def _plot_image_run(run: Run, out: Path, steps: int, n: int = 64) -> list[Path]:
    """Image runs: samples.png (generated), data.png (held-out targets), pairs.png (input -> output,
    for domain transfer from an image set) and the loss curve."""
    x0, x1 = heldout_samples(run, n)
    dev = next(run.model.parameters()).device
    if run.config.model.num_classes > 0:
        y = torch.arange(n, device=dev) % run.config.model.num_classes
        res = sample_guided(run.model, x0.to(dev), y, run.config.guidance.scale, method="euler", steps=steps)
    else:
        res = sample(run.model, x0.to(dev), f"euler:{steps}")
    scale = max(1, 64 // x1.shape[-1])
    paths = [save_image_grid(res.x, out / "samples.png", scale=scale), save_image_grid(x1, out / "data.png", scale=scale)]

    if isinstance(run.source, ImageDataset):  # domain transfer: show each input next to its output
        paths.append(save_pair_grid(x0[:32], res.x[:32].cpu(), out / "pairs.png", scale=scale))
    rows = read_jsonl(run.path / "metrics.jsonl")
    if rows:
        paths.append(plot_loss(rows, out / "loss.png", title=f"{_label(run.config.source)} -> {_label(run.config.target)}: loss"))
    return paths


def _label(spec: Any) -> str:
    return spec if isinstance(spec, str) else str(spec.get("name", spec)) if isinstance(spec, dict) else str(spec)
