"""Checkpoints: one safetensors file per saved step, the only place that knows their layout.

A checkpoint ``checkpoints/step_XXXXXXXX.safetensors`` holds

    model.<name>    the trained weights
    ema.<name>      the EMA weights (when the run keeps an EMA)
    optim.<i>.<k>   the optimizer's tensor state (Adam moments...)

and JSON metadata: ``format``, ``step``, ``model_config`` (the architecture, compared on every
load so weights never land in a model of another shape), ``run_record`` (what the run is: compared
on resume, so a directory that lost its ``config.json`` cannot continue another run's weights),
``train_config``, the optimizer's scalar state and parameter groups, and ``tensors_sha256``, a
checksum of every tensor's bytes verified on every read.  Non-finite model or EMA weights are
never written.  No pickle anywhere.

Used by the trainer (save / resume), by runs (load the EMA weights of a run), by reflow and
distillation (initialise a child run from its parent) and by the benchmarks.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from rectflow.engine.io import load_tensors, save_tensors
from rectflow.errors import CheckpointError

__all__ = [
    "CHECKPOINT_FORMAT",
    "NonFiniteWeightsError",
    "diff_keys",
    "tensors_sha256",
    "Checkpoint",
    "checkpoint_path",
    "list_checkpoints",
    "latest_checkpoint",
    "save_checkpoint",
    "read_checkpoint",
    "load_weights",
    "load_optimizer_state",
    "check_run_record",
    "check_model_config",
]

CHECKPOINT_FORMAT = "rectflow-checkpoint/3"  # /3: the metadata is checksummed too (meta_sha256)
_LEGACY_FORMATS = ("rectflow-checkpoint/2", "rectflow-checkpoint/1")  # /2: tensors checksummed only; /1: before checksums
_STEP_NAME = re.compile(r"step_(\d{8})\.safetensors")
_MISSING = object()


class NonFiniteWeightsError(FloatingPointError):
    """Model or EMA weights hold NaN or inf: they are never written to a checkpoint."""


def diff_keys(a: Any, b: Any, prefix: str = "") -> list[str]:
    """Dotted keys where two nested dicts differ (a key missing on one side counts), sorted."""
    if isinstance(a, dict) and isinstance(b, dict):
        out: set[str] = set()
        for k in set(a) | set(b):
            out.update(diff_keys(a.get(k, _MISSING), b.get(k, _MISSING), f"{prefix}.{k}" if prefix else k))
        return sorted(out)
    return [] if a is b or a == b else [prefix]


def _lookup(d: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        if not isinstance(d, dict) or part not in d:
            return _MISSING
        d = d[part]
    return d


def describe_diff(stored: Any, asked: Any, limit: int = 6) -> str:
    """"a, b; there: a=12, b missing": the differing dotted keys and what ``stored`` holds at each, so a
    user can resume a job by asking for the stored values (values cut at 40 characters, at most
    ``limit`` keys shown)."""
    keys = diff_keys(stored, asked)
    shown = []
    for k in keys[:limit]:
        v = _lookup(stored, k)
        shown.append(f"{k} missing" if v is _MISSING else f"{k}={' '.join(str(v).split())[:40]}")  # one line
    more = f", ... ({len(keys) - limit} more)" if len(keys) > limit else ""
    return f"{', '.join(keys)}; there: {', '.join(shown)}{more}"


def tensors_sha256(tensors: dict[str, Tensor]) -> str:
    """sha256 over (name, dtype, shape, bytes) of every tensor, in name order."""
    h = hashlib.sha256()
    for k in sorted(tensors):
        t = tensors[k].detach().contiguous().cpu()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}|".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def _non_finite(sd: dict[str, Tensor]) -> list[str]:
    return [k for k, v in sd.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]


@dataclass
class Checkpoint:
    """A checkpoint read from disk: its tensors (by prefixed name), metadata and file."""

    path: Path
    tensors: dict[str, Tensor]
    meta: dict[str, Any]

    @property
    def step(self) -> int:
        return int(self.meta.get("step", 0))

    @property
    def model_config(self) -> dict[str, Any] | None:
        return self.meta.get("model_config")

    @property
    def has_ema(self) -> bool:
        return any(k.startswith("ema.") for k in self.tensors)

    def state_dict(self, prefix: str) -> dict[str, Tensor]:
        """The tensors under ``prefix`` (``"model."`` or ``"ema."``) with the prefix removed."""
        return {k[len(prefix):]: v for k, v in self.tensors.items() if k.startswith(prefix)}

    def weights(self, ema: bool = True) -> dict[str, Tensor]:
        """The EMA weights when asked for and present, else the trained weights."""
        return self.state_dict("ema." if ema and self.has_ema else "model.")


def checkpoint_path(run_dir: str | Path, step: int) -> Path:
    """``run_dir/checkpoints/step_XXXXXXXX.safetensors``."""
    return Path(run_dir) / "checkpoints" / f"step_{step:08d}.safetensors"


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """The checkpoint files of a run directory, oldest first (empty when there are none)."""
    d = Path(run_dir) / "checkpoints"
    return sorted(d.glob("step_*.safetensors")) if d.is_dir() else []


def latest_checkpoint(run_dir: str | Path) -> Path:
    """The newest checkpoint of a run directory; CheckpointError when there is none."""
    ckpts = list_checkpoints(run_dir)
    if not ckpts:
        raise CheckpointError(f"{run_dir}: no checkpoints found (train the run first)")
    return ckpts[-1]


def _optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, Tensor], dict[str, Any]]:
    sd = opt.state_dict()
    tensors: dict[str, Tensor] = {}
    scalars: dict[str, Any] = {}
    for idx, st in sd["state"].items():
        for k, v in st.items():
            if isinstance(v, Tensor):
                tensors[f"optim.{idx}.{k}"] = v
            else:
                scalars[f"{idx}.{k}"] = v
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in sd["param_groups"]]
    return tensors, {"param_groups": groups, "scalars": scalars}


def save_checkpoint(
    path: str | Path,
    *,
    model: nn.Module,
    step: int,
    model_config: dict[str, Any],
    ema_model: nn.Module | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    train_config: dict[str, Any] | None = None,
    run_record: dict[str, Any] | None = None,
) -> Path:
    """Write one checkpoint file atomically (model, optional EMA and optimizer state).

    Raises NonFiniteWeightsError, writing nothing, when the model or EMA weights are not finite.
    """
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    if ema_model is not None:
        tensors.update({f"ema.{k}": v for k, v in ema_model.state_dict().items()})
    bad = _non_finite(tensors)
    if bad:
        raise NonFiniteWeightsError(f"not writing {Path(path).name}: {len(bad)} weight tensors hold NaN or inf (e.g. {bad[0]})")
    meta: dict[str, Any] = {"format": CHECKPOINT_FORMAT, "step": step, "model_config": model_config}
    if train_config is not None:
        meta["train_config"] = train_config
    if run_record is not None:
        meta["run_record"] = run_record
    if optimizer is not None:
        opt_tensors, meta["optimizer"] = _optimizer_tensors(optimizer)
        tensors.update(opt_tensors)
    meta["tensors_sha256"] = tensors_sha256(tensors)
    meta["meta_sha256"] = meta_sha256(meta)
    save_tensors(path, tensors, meta)
    return Path(path)


def meta_sha256(meta: dict[str, Any]) -> str:
    """sha256 of the metadata (all of it but this checksum) as canonical JSON: step, configs, run record, optimizer
    scalars and the tensors' checksum, so a changed byte anywhere in a checkpoint is caught."""
    body = {k: v for k, v in meta.items() if k != "meta_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def read_checkpoint(path: str | Path, *, model_config: dict[str, Any] | None = None, device: str | torch.device = "cpu") -> Checkpoint:
    """Read a checkpoint and verify its checksum; with ``model_config`` given, refuse one made for
    another architecture.

    Raises CheckpointError (naming the file) for a missing, corrupt, changed or foreign file.
    """
    p = Path(path)
    tensors, meta = load_tensors(p, device=device)
    if meta.get("format") not in (CHECKPOINT_FORMAT, *_LEGACY_FORMATS):
        raise CheckpointError(f"{p}: not a rectflow checkpoint (format {meta.get('format')!r})")
    if meta.get("format") != _LEGACY_FORMATS[-1] and meta.get("tensors_sha256") != tensors_sha256(tensors):
        raise CheckpointError(f"{p}: checksum mismatch: the file was changed or corrupted after it was written")
    # a file that carries a metadata checksum is verified whatever its format says (a flipped "/3" -> "/2" is no way around it)
    if (meta.get("format") == CHECKPOINT_FORMAT or "meta_sha256" in meta) and meta.get("meta_sha256") != meta_sha256(meta):
        raise CheckpointError(f"{p}: metadata checksum mismatch: the file's header was changed or corrupted after it was written")
    named = _STEP_NAME.fullmatch(p.name)
    if named and meta.get("step") != int(named.group(1)):
        raise CheckpointError(f"{p}: holds step {meta.get('step')} but its name says step {int(named.group(1))} ({p.name}); "
                              "a renamed or altered checkpoint")
    ckpt = Checkpoint(p, tensors, meta)
    if model_config is not None:
        check_model_config(ckpt, model_config)
    return ckpt


def check_model_config(checkpoint: Checkpoint, model_config: dict[str, Any]) -> None:
    """CheckpointError (naming the file) when the checkpoint was made for another architecture."""
    if checkpoint.model_config != model_config:
        raise CheckpointError(f"{checkpoint.path}: checkpoint model config {checkpoint.model_config} does not match this model's {model_config}")


def load_weights(model: nn.Module, checkpoint: Checkpoint, *, ema: bool = True) -> nn.Module:
    """Copy the checkpoint's (EMA) weights into ``model``; CheckpointError if they do not fit or
    are not finite."""
    weights = checkpoint.weights(ema)
    bad = _non_finite(weights)
    if bad:
        raise CheckpointError(f"{checkpoint.path}: {len(bad)} weight tensors hold NaN or inf (e.g. {bad[0]})")
    try:
        model.load_state_dict(weights)
    except RuntimeError as e:
        raise CheckpointError(f"{checkpoint.path}: weights do not fit the model ({str(e).splitlines()[0]})") from None
    return model


def load_optimizer_state(optimizer: torch.optim.Optimizer, checkpoint: Checkpoint) -> None:
    """Restore the optimizer state saved by :func:`save_checkpoint`."""
    meta = checkpoint.meta.get("optimizer")
    if meta is None:
        raise CheckpointError(f"{checkpoint.path}: holds no optimizer state")
    try:
        state: dict[int, dict[str, Any]] = {}
        for key, v in checkpoint.tensors.items():
            if key.startswith("optim."):
                _, idx, name = key.split(".", 2)
                state.setdefault(int(idx), {})[name] = v
        for key, v in meta.get("scalars", {}).items():
            idx, name = key.split(".", 1)
            state.setdefault(int(idx), {})[name] = v
        groups = [{k: (tuple(v) if k == "betas" else v) for k, v in g.items()} for g in meta["param_groups"]]
        steps = [float(st["step"]) for st in state.values() if "step" in st]
        # Adam counts a parameter's steps only when it had a gradient, so the most-trained parameter has the trainer's count
        if steps and max(steps) != float(checkpoint.step):
            raise CheckpointError(f"{checkpoint.path}: the optimizer has taken {max(steps):g} steps but the checkpoint says step {checkpoint.step}")
        optimizer.load_state_dict({"state": state, "param_groups": groups})
    except (KeyError, ValueError, TypeError) as e:
        raise CheckpointError(f"{checkpoint.path}: optimizer state does not match this model ({str(e).splitlines()[0]})") from None
    _match_parameter_layouts(optimizer)


def _match_parameter_layouts(optimizer: torch.optim.Optimizer) -> None:
    """Give each per-parameter state tensor (Adam's moments, ...) its parameter's memory layout.

    Checkpoints store contiguous tensors, so after a resume the moments of a channels-last conv
    weight would come back NCHW; fused optimizers (CUDA's fused AdamW) require params, grads and
    states of one layout."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            for name, v in optimizer.state.get(p, {}).items():
                if isinstance(v, Tensor) and v.shape == p.shape and v.stride() != p.stride():
                    optimizer.state[p][name] = torch.empty_like(p, dtype=v.dtype).copy_(v)


def check_run_record(checkpoint: Checkpoint, run_record: dict[str, Any] | None) -> None:
    """CheckpointError when the checkpoint was written by a run with another record."""
    stored = checkpoint.meta.get("run_record")
    if run_record is not None and stored is not None and stored != run_record:
        raise CheckpointError(f"{checkpoint.path}: written by a run of another config (differs in {describe_diff(stored, run_record)}); use a new run directory")
