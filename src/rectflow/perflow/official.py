"""The official PeRFlow repository's formats (magic-research/piecewise-rectified-flow), read and written.

Its deltas are UNet folders: ``config.json`` and ``delta_weights.safetensors`` (what its
``load_delta_weights_into_unet(pipe, folder)`` reads), whose tensors are the UNet's state dict of
W_student - W_base; its README also loads such a folder as a UNet (``UNet2DConditionModel.from_pretrained``
then ``.state_dict()``), so :func:`save_official_delta` writes the same tensors as
``diffusion_pytorch_model.safetensors`` too (a hard link: one copy on disk where the file system allows).

Its scheduler is configured from the base pipeline's config plus ``prediction_type`` (``ddim_eps``,
``diff_eps`` or ``velocity``) and ``num_time_windows`` (uniform windows); rectflow's
:class:`~rectflow.perflow.diffusers_scheduler.PeRFlowScheduler` takes the same arguments and reproduces it
(its time input int(N tau), 1000 at pure noise, and its knots, alphas_cumprod[N tau - 1]).

A rectflow student written in this format is sampled by the official scheduler as ``ddim_eps``, the same
window path as ours with two differences of convention: the official scheduler feeds the UNet N tau where
rectflow's students were trained on N tau - 1 (one of N = 1000 training steps), and it ends the last window
at alphas_cumprod[0] instead of 1.  rectflow's own export (``diffusers/``) is exact; this one is for the
official tools.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from rectflow.engine.io import load_tensors, make_dirs, save_json, save_tensors
from rectflow.errors import CheckpointError, ConfigError
from rectflow.perflow.adapters import unwrap_unet
from rectflow.perflow.delta import weight_delta
from rectflow.perflow.scheduler_config import cfg_is_flow, teacher_schedule_keys

__all__ = ["OFFICIAL_DELTA_FILE", "official_scheduler_config", "save_official_delta", "load_official_delta"]

OFFICIAL_DELTA_FILE = "delta_weights.safetensors"


def official_scheduler_config(teacher_cfg: dict[str, Any], boundaries: Tensor, parameterization: str) -> dict[str, Any]:
    """The official scheduler's config for a student of this teacher: the teacher's betas, ``ddim_eps`` and K uniform
    windows.  Refused (one line) for windows that are not uniform, a flow-matching teacher, or a teacher that does not
    predict eps (the official types have no v- or x0-prediction student)."""
    k = boundaries.numel() - 1
    if cfg_is_flow(teacher_cfg):
        raise ConfigError("perflow official format: a flow-matching (SD3) teacher has no official PeRFlow scheduler; use the diffusers/ export")
    if parameterization != "eps":
        raise ConfigError(f"perflow official format: the official prediction types take an eps-predicting teacher, this one predicts {parameterization!r}")
    if not torch.allclose(boundaries.double().cpu(), torch.linspace(0, 1, k + 1, dtype=torch.float64), atol=1e-9):
        raise ConfigError("perflow official format: the official scheduler has uniform windows only; these are not uniform")
    return {"_class_name": "PeRFlowScheduler", **teacher_schedule_keys(teacher_cfg), "set_alpha_to_one": False, "prediction_type": "ddim_eps",
            "t_noise": 1, "t_clean": 0, "num_time_windows": k}


def save_official_delta(folder: str | Path, student: nn.Module, teacher: nn.Module, teacher_cfg: dict[str, Any], boundaries: Tensor,
                        parameterization: str, *, metadata: dict[str, Any] | None = None) -> Path:
    """Write the official delta folder: ``config.json`` (the UNet's), ``delta_weights.safetensors`` and
    ``diffusion_pytorch_model.safetensors`` (W_student - W_teacher, the UNet's parameter names) and
    ``scheduler_config.json`` (:func:`official_scheduler_config`)."""
    folder = Path(folder)
    sched = official_scheduler_config(teacher_cfg, boundaries, parameterization)
    student, teacher = unwrap_unet(student), unwrap_unet(teacher)
    if not hasattr(teacher, "save_config"):
        raise ConfigError("perflow official format: the teacher is not a diffusers UNet")
    stage = folder.with_name(f".{folder.name}.official.tmp")
    if stage.exists():
        shutil.rmtree(stage)
    make_dirs(stage)
    teacher.save_config(str(stage))
    save_tensors(stage / OFFICIAL_DELTA_FILE, weight_delta(student, teacher), {"format": "pt", **(metadata or {})})
    try:
        os.link(stage / OFFICIAL_DELTA_FILE, stage / "diffusion_pytorch_model.safetensors")
    except OSError:  # no hard links here: a copy
        shutil.copyfile(stage / OFFICIAL_DELTA_FILE, stage / "diffusion_pytorch_model.safetensors")
    save_json(stage / "scheduler_config.json", sched)
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(stage, folder)  # a kill leaves the old folder or the new one, never half of one
    return folder


def load_official_delta(path: str | Path) -> dict[str, Tensor]:
    """The delta of an official PeRFlow folder (``delta_weights.safetensors``, or a UNet folder whose
    ``diffusion_pytorch_model.safetensors`` holds the delta, as the official Hub repositories ship them), or of
    that file itself; apply it with :func:`rectflow.perflow.delta.apply_delta`."""
    p = Path(path)
    if p.is_dir():
        for name in (OFFICIAL_DELTA_FILE, "diffusion_pytorch_model.safetensors"):
            if (p / name).is_file():
                p = p / name
                break
        else:
            raise ConfigError(f"{p}: no {OFFICIAL_DELTA_FILE} or diffusion_pytorch_model.safetensors (not an official PeRFlow delta folder)")
    elif not p.is_file():
        raise ConfigError(f"{p}: no such file or folder")
    tensors, _ = load_tensors(p)
    if not tensors:
        raise CheckpointError(f"{p}: holds no tensors")
    return tensors
