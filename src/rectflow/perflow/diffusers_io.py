"""diffusers in and out for PeRFlow (optional extra: ``pip install rectflow[perflow]``).

In: :func:`load_teacher` reads a LOCAL folder (never downloads) holding a ``UNet2DModel``
(``unet/`` subfolder or ``config.json`` at the top) and a DDPM/DDIM scheduler config
(``scheduler/scheduler_config.json`` or ``scheduler_config.json``); the betas become a
:class:`~rectflow.diffusion.schedules.DDPMSchedule` (an affine path), ``prediction_type`` epsilon / v_prediction /
sample maps to eps / v / x0, and rectflow time t maps to the UNet's timestep n = N (1 - t) - 1.

Out: :func:`export_student` writes ``unet/`` (``save_pretrained``), ``perflow.json`` (window
boundaries, kind, number of training steps), ``scheduler/scheduler_config.json`` for
:class:`rectflow.perflow.diffusers_scheduler.PeRFlowScheduler` (right at any number of steps >= K;
one extra import) and, when it reproduces our K-step sampler exactly,
``scheduler_ddim/scheduler_config.json`` for a stock ``DDIMScheduler`` (right at exactly K steps only).  Why DDIM is exact: at a window
start the student's prediction lives on the teacher's path, and one Euler step of the window path
from t_{k-1} to t_k is z' = a_k x-hat + b_k eps-hat, i.e. a DDIM step between the two boundaries.
DDIMScheduler with ``timestep_spacing="trailing"``, ``set_alpha_to_one=True`` and K inference steps
visits timesteps N - 1 - j N / K, which are our boundaries only when the windows are uniform in t and
K divides N; otherwise no stock scheduler reproduces the windows, no scheduler config is written,
and :func:`load_student` + :func:`rectflow.perflow.student.sample_perflow` (our loader) must be used.  The m > 1
steps-per-window sampler is never reproduced by a stock scheduler.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from rectflow.diffusion.schedules import DDPMSchedule
from rectflow.engine.io import load_json
from rectflow.errors import CheckpointError, ConfigError
from rectflow.perflow.student import PeRFlowStudent
from rectflow.perflow.teacher import Teacher
from rectflow.perflow.windows import validate_windows

__all__ = ["UNetAdapter", "schedule_from_config", "load_teacher", "export_student", "load_student",
           "ddim_scheduler_config"]

_KINDS = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}
_AFFINE_SCHEDULERS = {"DDPMScheduler", "DDIMScheduler"}


def _diffusers():
    try:
        import diffusers  # optional extra (.[perflow]); only diffusers teachers need it
    except ImportError as e:  # pragma: no cover - exercised only without the extra
        raise ConfigError("diffusers is not installed; pip install 'rectflow[perflow]'") from e
    return diffusers


class UNetAdapter(nn.Module):
    """Wrap a diffusers ``UNet2DModel`` as ``f(z, timestep) -> output tensor`` (drops the output dataclass)."""

    def __init__(self, unet: nn.Module) -> None:
        super().__init__()
        self.unet = unet

    def forward(self, z: Tensor, timestep: Tensor) -> Tensor:
        return self.unet(z, timestep).sample


def _cosine_betas(n: int, max_beta: float = 0.999) -> Tensor:
    """Nichol & Dhariwal's cosine schedule as discrete betas: 1 - abar(i+1)/abar(i), abar(u) = cos^2((u + 0.008)/1.008 pi/2)."""
    def abar(u: float) -> float:
        return math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2

    return torch.tensor([min(1 - abar((i + 1) / n) / abar(i / n), max_beta) for i in range(n)], dtype=torch.float64)


def schedule_from_config(cfg: dict[str, Any]) -> tuple[DDPMSchedule, str]:
    """(DDPMSchedule, our parameterisation) from a DDPM/DDIM scheduler config dict.

    Raises :class:`ConfigError` when the scheduler is not a discrete beta schedule, when the betas reach
    1 (zero terminal SNR: alpha = 0 at the noise end, which DDPMSchedule cannot hold), or when
    ``prediction_type`` is unknown.
    """
    cls = cfg.get("_class_name", "DDPMScheduler")
    if cls not in _AFFINE_SCHEDULERS:
        raise ConfigError(f"diffusers scheduler {cls!r} is not supported as an affine path; use a DDPMScheduler or "
                          f"DDIMScheduler config (discrete betas)")
    if cfg.get("rescale_betas_zero_snr", False):
        raise ConfigError("diffusers scheduler: rescale_betas_zero_snr=True gives alpha = 0 at the noise end; "
                          "this schedule cannot be expressed as a DDPMSchedule affine path")
    n = int(cfg.get("num_train_timesteps", 1000))
    kind = cfg.get("prediction_type", "epsilon")
    if kind not in _KINDS:
        raise ConfigError(f"diffusers scheduler: prediction_type {kind!r} is not one of {sorted(_KINDS)}")
    if cfg.get("trained_betas") is not None:
        betas = torch.as_tensor(cfg["trained_betas"], dtype=torch.float64)
    else:
        sched = cfg.get("beta_schedule", "linear")
        start, end = float(cfg.get("beta_start", 1e-4)), float(cfg.get("beta_end", 0.02))
        if sched == "linear":
            betas = torch.linspace(start, end, n, dtype=torch.float64)
        elif sched == "scaled_linear":
            betas = torch.linspace(start**0.5, end**0.5, n, dtype=torch.float64) ** 2
        elif sched == "squaredcos_cap_v2":
            betas = _cosine_betas(n)
        else:
            raise ConfigError(f"diffusers scheduler: beta_schedule {sched!r} cannot be expressed as an affine path here")
    try:
        return DDPMSchedule(betas), _KINDS[kind]
    except ValueError as e:
        raise ConfigError(f"diffusers scheduler: {e}") from e


def _find(folder: Path, sub: str, name: str) -> Path | None:
    for p in (folder / sub / name, folder / name):
        if p.is_file():
            return p
    return None


def load_teacher(folder: str | Path, *, dtype: torch.dtype = torch.float32) -> Teacher:
    """A :class:`Teacher` from a local diffusers folder (UNet2DModel + DDPM/DDIM scheduler config)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ConfigError(f"diffusers folder {str(folder)!r} does not exist (only local folders are read)")
    sched_path = _find(folder, "scheduler", "scheduler_config.json")
    if sched_path is None:
        raise ConfigError(f"diffusers folder {str(folder)!r} has no scheduler/scheduler_config.json")
    unet_cfg = _find(folder, "unet", "config.json")
    if unet_cfg is None:
        raise ConfigError(f"diffusers folder {str(folder)!r} has no unet/config.json")
    schedule, kind = schedule_from_config(load_json(sched_path))
    load_json(unet_cfg)  # a corrupt config is named here; diffusers would only say "not a valid JSON file"
    diffusers = _diffusers()
    try:  # low_cpu_mem_usage=False: the default asks for `accelerate` in a multi-line log message
        unet = diffusers.UNet2DModel.from_pretrained(str(unet_cfg.parent), local_files_only=True, low_cpu_mem_usage=False)
    except (OSError, ValueError, RuntimeError, KeyError) as e:
        weights = sorted(p for p in unet_cfg.parent.glob("diffusion_pytorch_model*") if p.suffix in (".safetensors", ".bin"))
        what = weights[0] if weights else unet_cfg.parent / "diffusion_pytorch_model.safetensors"
        raise CheckpointError(f"{what}: cannot load the diffusers UNet weights: missing, truncated or corrupt ({type(e).__name__})") from None
    return Teacher(UNetAdapter(unet.to(dtype).eval()), schedule, kind, time_map=schedule.t_to_timestep)


def ddim_scheduler_config(teacher_cfg: dict[str, Any], boundaries: Tensor) -> dict[str, Any] | None:
    """A DDIMScheduler config whose K-step sampling equals our K-step sampler, or None if none exists."""
    b = validate_windows(boundaries)
    k = b.numel() - 1
    n = int(teacher_cfg.get("num_train_timesteps", 1000))
    if n % k or not torch.allclose(b, torch.linspace(0, 1, k + 1, dtype=torch.float64), atol=1e-9):
        return None
    keep = {key: v for key, v in teacher_cfg.items() if not key.startswith("_")}
    keep.update(_class_name="DDIMScheduler", timestep_spacing="trailing", set_alpha_to_one=True, steps_offset=0,
                clip_sample=False, thresholding=False, rescale_betas_zero_snr=False)
    return keep


def export_student(student: PeRFlowStudent, folder: str | Path, teacher_folder: str | Path) -> Path:
    """Write ``unet/`` + ``perflow.json`` (+ ``scheduler/scheduler_config.json`` when a stock DDIMScheduler
    reproduces the K-step sampler exactly; ``perflow.json["stock_scheduler_exact"]`` says which)."""
    folder, teacher_folder = Path(folder), Path(teacher_folder)
    net = student.net.unet if isinstance(student.net, UNetAdapter) else student.net
    if not hasattr(net, "save_pretrained"):
        raise ConfigError("perflow export: the student's network is not a diffusers model")
    sched_path = _find(teacher_folder, "scheduler", "scheduler_config.json")
    if sched_path is None:
        raise ConfigError(f"diffusers folder {str(teacher_folder)!r} has no scheduler/scheduler_config.json")
    teacher_cfg = json.loads(sched_path.read_text())
    folder.mkdir(parents=True, exist_ok=True)
    net.save_pretrained(str(folder / "unet"))
    ddim_cfg = ddim_scheduler_config(teacher_cfg, student.boundaries)
    if ddim_cfg is not None:
        (folder / "scheduler_ddim").mkdir(exist_ok=True)
        (folder / "scheduler_ddim" / "scheduler_config.json").write_text(json.dumps(ddim_cfg, indent=2))
    knots = student.window_path
    ours = {"_class_name": "PeRFlowScheduler", "windows": [float(v) for v in knots.boundaries], "alphas": [float(v) for v in knots.a_knots],
            "sigmas": [float(v) for v in knots.b_knots], "num_train_timesteps": int(teacher_cfg.get("num_train_timesteps", 1000)),
            "prediction_type": teacher_cfg.get("prediction_type", "epsilon")}
    (folder / "scheduler").mkdir(exist_ok=True)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(ours, indent=2))
    meta = {"format": "rectflow.perflow", "windows": [float(v) for v in student.boundaries],
            "parameterization": student.parameterization, "teacher_scheduler": teacher_cfg,
            "stock_scheduler_exact": ddim_cfg is not None,
            "scheduler": "scheduler/: PeRFlowScheduler (import rectflow.perflow.diffusers_scheduler), any steps >= K; "
                         "scheduler_ddim/ (when present): a stock DDIMScheduler, exact at K steps only",
            "sampler": "one Euler step per window on the window path (== DDIM between window boundaries)"}
    (folder / "perflow.json").write_text(json.dumps(meta, indent=2))
    return folder


def load_student(folder: str | Path, *, dtype: torch.dtype = torch.float32) -> PeRFlowStudent:
    """Our loader for an :func:`export_student` folder (works whether or not a stock scheduler is exact)."""
    folder = Path(folder)
    meta_path = folder / "perflow.json"
    if not meta_path.is_file():
        raise ConfigError(f"{str(folder)!r} has no perflow.json (not a PeRFlow export)")
    if not (folder / "unet" / "config.json").is_file():
        raise ConfigError(f"{str(folder)!r} has no unet/config.json")
    meta = json.loads(meta_path.read_text())
    schedule, kind = schedule_from_config(meta["teacher_scheduler"])
    unet = _diffusers().UNet2DModel.from_pretrained(str(folder / "unet"), local_files_only=True).to(dtype).eval()
    return PeRFlowStudent(UNetAdapter(unet), schedule, torch.tensor(meta["windows"], dtype=torch.float64), kind,
                          time_map=schedule.t_to_timestep)
