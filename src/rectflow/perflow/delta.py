"""PeRFlow: piecewise rectified flow that accelerates a pretrained diffusion or flow model (theory §5).

Rectflow time t: 0 = noise, 1 = data (diffusion time s = 1 - t, see :mod:`rectflow.diffusion.schedules`).

* :func:`make_windows` splits [0, 1] into K windows 0 = t_0 < t_1 < ... < t_K = 1 (uniform in t,
  uniform in the teacher's log-SNR, or user-given boundaries).
* :class:`Teacher` is any model that is a prediction (eps, x0, v, velocity, u) on an affine path
  z_t = a(t) x + b(t) eps; :meth:`Teacher.solve_windows` runs a batched DDIM across one window per
  example (each example may sit in a different window).
* :class:`PeRFlowObjective` (Trainer-compatible): real data x, noise eps, window k per example;
  z_start = a(t_{k-1}) x + b(t_{k-1}) eps (forward process), z_end = teacher DDIM across window k;
  the student regresses the straight line: at z_t = z_start + (t - t_{k-1}) v,
  v = (z_end - z_start) / (t_k - t_{k-1}).
* Parameterisation inheritance.  Inside window k the straight line from z_start to the DDIM end
  point z_end = a_k x-hat + b_k eps-hat (x-hat, eps-hat the teacher's predictions at z_start) is
  itself an affine path in (x-hat, eps-hat) with *linearly interpolated* coefficients
  A(t) = a_{k-1} + r (a_k - a_{k-1}), B(t) = b_{k-1} + r (b_k - b_{k-1}), r = (t - t_{k-1}) / (t_k - t_{k-1}):
  z_t = A(t) x-hat + B(t) eps-hat, v = (a_k - a_{k-1})/dt x-hat + (b_k - b_{k-1})/dt eps-hat.
  :class:`WindowPath` is that piecewise-linear path; the student keeps the teacher's output kind
  (e.g. eps) *on the window path*, so at each window start its prediction means exactly what the
  teacher's does, and one Euler step per window of the teacher-initialised student is the teacher's
  K-step DDIM.  The weight change is stored as a delta (:func:`save_delta` / :func:`apply_delta`).
* Samplers: :func:`sample` (m Euler steps per window; m = 1 is K-step generation), returning a
  :class:`~rectflow.flow.solvers.SolveResult` with the NFE.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from rectflow.engine.io import load_tensors, save_tensors
from rectflow.errors import ConfigError

__all__ = ['weight_delta', 'save_delta', 'load_delta', 'apply_delta']


# ----------------------------------------------------------------------------------------- deltas
def weight_delta(student: nn.Module, teacher: nn.Module) -> dict[str, Tensor]:
    """student - teacher for every floating tensor of the state dicts (same architecture required)."""
    s, t = student.state_dict(), teacher.state_dict()
    if s.keys() != t.keys():
        raise ConfigError("perflow.weight_delta: student and teacher have different parameter names")
    out = {}
    for name, v in s.items():
        if v.is_floating_point():
            if v.shape != t[name].shape:
                raise ConfigError(f"perflow.weight_delta: shape mismatch for {name}: {tuple(v.shape)} vs {tuple(t[name].shape)}")
            out[name] = (v - t[name]).detach().cpu().contiguous()
    return out


def save_delta(path: str | Path, student: nn.Module, teacher: nn.Module, boundaries: Tensor | None = None,
               metadata: dict[str, Any] | None = None) -> Path:
    """Write the weight change (safetensors) with the window boundaries in its metadata."""
    meta = dict(metadata or {})
    meta["format"] = "rectflow.perflow.delta"
    if boundaries is not None:
        meta["windows"] = [float(v) for v in boundaries]
    save_tensors(path, weight_delta(student, teacher), meta)
    return Path(path)


def load_delta(path: str | Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    return load_tensors(path)


def apply_delta(model: nn.Module, delta: dict[str, Tensor], scale: float = 1.0) -> nn.Module:
    """In place: w <- w + scale * delta for every tensor of ``delta`` (names must exist, shapes match)."""
    state = model.state_dict()
    missing = [k for k in delta if k not in state]
    if missing:
        raise ConfigError(f"perflow.apply_delta: the model lacks {len(missing)} delta tensors, e.g. {missing[0]!r}")
    with torch.no_grad():
        for name, d in delta.items():
            if state[name].shape != d.shape:
                raise ConfigError(f"perflow.apply_delta: shape mismatch for {name}: {tuple(state[name].shape)} vs {tuple(d.shape)}")
            state[name].add_(d.to(state[name].device, state[name].dtype), alpha=scale)
    return model
