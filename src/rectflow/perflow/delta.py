"""PeRFlow weight deltas (theory §5.3): student minus teacher weights, saved, loaded and applied to
another model derived from the same teacher."""

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


def apply_delta(model: nn.Module, delta: dict[str, Tensor] | str | Path, scale: float = 1.0) -> nn.Module:
    """In place: w <- w + scale * delta for every tensor of ``delta`` (a dict or a delta file).

    Every name must exist in ``model`` with the same shape; all are checked before the first weight
    changes, so a delta of another architecture leaves the model as it was (the error names the file).
    """
    source = "perflow.apply_delta"
    if isinstance(delta, (str, Path)):
        source, delta = str(delta), load_delta(delta)[0]
    state = model.state_dict()
    missing = [k for k in delta if k not in state]
    if missing:
        raise ConfigError(f"{source}: the model lacks {len(missing)} of its tensors, e.g. {missing[0]!r} (a delta of another architecture?)")
    for name, d in delta.items():
        if state[name].shape != d.shape:
            raise ConfigError(f"{source}: shape mismatch for {name}: {tuple(state[name].shape)} in the model, {tuple(d.shape)} in the delta")
    with torch.no_grad():
        for name, d in delta.items():
            state[name].add_(d.to(state[name].device, state[name].dtype), alpha=scale)
    return model
