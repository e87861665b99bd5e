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

import math
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from rectflow.diffusion.schedules import DDPMSchedule
from rectflow.engine.io import load_json, make_dirs, save_json
from rectflow.errors import CheckpointError, ConfigError
from rectflow.perflow.student import PeRFlowStudent
from rectflow.perflow.teacher import Teacher
from rectflow.perflow.windows import validate_windows

__all__ = [
    "TextUNetAdapter",
    "UNetAdapter",
    "adapt_unet",
    "ddim_scheduler_config",
    "export_student",
    "load_diffusers_model",
    "load_student",
    "load_teacher",
    "perflow_scheduler_config",
    "schedule_from_config",
    "unwrap_unet",
    "write_student_parts",
]

_KINDS = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}
# Schedulers that share DDPM's discrete training schedule (betas over N steps, timestep n at
# s = (n + 1) / N): their configs describe the same model, they differ only in how they sample.
_AFFINE_SCHEDULERS = {"DDPMScheduler", "DDIMScheduler", "PNDMScheduler", "EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler",
                      "DPMSolverMultistepScheduler", "DPMSolverSinglestepScheduler", "LMSDiscreteScheduler", "HeunDiscreteScheduler",
                      "UniPCMultistepScheduler", "DEISMultistepScheduler", "KDPM2DiscreteScheduler"}
# Defaults of beta_start / beta_end where a class's own differ from DDPM's (a config may omit them).
_BETA_DEFAULTS = {"HeunDiscreteScheduler": (0.00085, 0.012), "KDPM2DiscreteScheduler": (0.00085, 0.012)}
# Keys that define the model: the training noise schedule and the network's output.
_SCHEDULE_KEYS = {"num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas", "prediction_type"}
# Keys that only change how a scheduler samples (step spacing, solver, clipping, sigma grids): our
# samplers replace the scheduler, so they are read past.
_SAMPLER_KEYS = {"timestep_spacing", "steps_offset", "clip_sample", "clip_sample_range", "set_alpha_to_one", "skip_prk_steps",
                 "thresholding", "dynamic_thresholding_ratio", "sample_max_value", "solver_order", "algorithm_type", "solver_type",
                 "lower_order_final", "euler_at_final", "use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "use_lu_lambdas",
                 "final_sigmas_type", "lambda_min_clipped", "interpolation_type", "sigma_min", "sigma_max", "predict_x0", "disable_corrector",
                 "solver_p", "time_shift_type", "flow_shift"}
# Keys that change the model's meaning away from their default: accepted only at these values.
_MUST_BE = {"rescale_betas_zero_snr": (False,), "timestep_type": ("discrete",), "use_flow_sigmas": (False,), "use_dynamic_shifting": (False,),
            "shift_terminal": (None,), "variance_type": (None, "fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log")}
_WHY = {"rescale_betas_zero_snr": "zero terminal SNR gives alpha = 0 at the noise end, which DDPMSchedule cannot hold",
        "timestep_type": "continuous timesteps feed the network log-sigma, not the discrete step index",
        "use_flow_sigmas": "a flow-matching model, not a discrete beta schedule",
        "use_dynamic_shifting": "resolution-dependent time shift of a flow-matching model",
        "shift_terminal": "a flow-matching terminal shift",
        "variance_type": "a learned variance means the network outputs 2C channels (mean and variance)"}


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


class TextUNetAdapter(nn.Module):
    """Wrap a diffusers ``UNet2DConditionModel`` as ``f(z, timestep, cond) -> output tensor``: z (B, C, h, w)
    latents, timestep (B,) the UNet's own step index, cond (B, L, D) the text encoder's last hidden
    state, passed as ``encoder_hidden_states``."""

    def __init__(self, unet: nn.Module) -> None:
        super().__init__()
        self.unet = unet

    def forward(self, z: Tensor, timestep: Tensor, cond: Tensor | None = None) -> Tensor:
        if cond is None:
            raise ConfigError("a text-conditional UNet needs a condition (the text embeddings; the empty prompt's for unconditional)")
        return self.unet(z, timestep, encoder_hidden_states=cond).sample


def unwrap_unet(net: nn.Module) -> nn.Module:
    """The diffusers model inside one of our adapters (or ``net`` itself)."""
    return net.unet if isinstance(net, (UNetAdapter, TextUNetAdapter)) else net


def adapt_unet(unet: nn.Module) -> nn.Module:
    """The adapter for a diffusers UNet: :class:`TextUNetAdapter` for a ``UNet2DConditionModel``, else :class:`UNetAdapter`."""
    return TextUNetAdapter(unet) if type(unet).__name__ == "UNet2DConditionModel" else UNetAdapter(unet)


def load_diffusers_model(cls_name: str, folder: Path, *, dtype: torch.dtype = torch.float32, what: str = "model") -> nn.Module:
    """``diffusers.<cls_name>.from_pretrained(folder)`` from a local folder, in eval mode; a corrupt config or
    unreadable weights are one line naming the file (:class:`CheckpointError`)."""
    load_json(folder / "config.json")  # a corrupt config is named here; diffusers would only say "not a valid JSON file"
    cls = getattr(_diffusers(), cls_name, None)
    if cls is None:
        raise ConfigError(f"{folder / 'config.json'}: diffusers has no model class {cls_name!r}")
    try:  # low_cpu_mem_usage=False: the default asks for `accelerate` in a multi-line log message
        model = cls.from_pretrained(str(folder), local_files_only=True, low_cpu_mem_usage=False)
    except (OSError, ValueError, RuntimeError, KeyError) as e:
        weights = sorted(p for p in folder.glob("diffusion_pytorch_model*") if p.suffix in (".safetensors", ".bin"))
        file = weights[0] if weights else folder / "diffusion_pytorch_model.safetensors"
        raise CheckpointError(f"{file}: cannot load the diffusers {what} weights: missing, truncated or corrupt ({type(e).__name__})") from None
    return model.to(dtype).eval()


def _cosine_betas(n: int, max_beta: float = 0.999) -> Tensor:
    """Nichol & Dhariwal's cosine schedule as discrete betas: 1 - abar(i+1)/abar(i), abar(u) = cos^2((u + 0.008)/1.008 pi/2)."""
    def abar(u: float) -> float:
        return math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2

    return torch.tensor([min(1 - abar((i + 1) / n) / abar(i / n), max_beta) for i in range(n)], dtype=torch.float64)


def schedule_from_config(cfg: dict[str, Any]) -> tuple[DDPMSchedule, str]:
    """(DDPMSchedule, our parameterisation) from a diffusers scheduler config: the ONE place where a
    diffusers scheduler becomes an affine path.

    Accepted: the discrete beta schedulers (DDPM, DDIM, PNDM, Euler, Euler ancestral,
    DPM-Solver(++) multistep and single-step, LMS, Heun, UniPC, DEIS, KDPM2): ``beta_schedule``
    linear / scaled_linear / squaredcos_cap_v2 or ``trained_betas``; ``prediction_type`` epsilon /
    v_prediction / sample -> eps / v / x0.  Keys that only steer the scheduler's own sampling
    (``timestep_spacing``, ``steps_offset``, Karras sigmas, solver order, clipping, ...) are read past.
    Raises :class:`ConfigError` naming the key for anything else: another scheduler class, an unknown
    key, or a key that changes the model (``rescale_betas_zero_snr``, ``timestep_type``, flow sigmas,
    learned ``variance_type``, an unknown ``beta_schedule`` or ``prediction_type``).
    """
    cls = cfg.get("_class_name", "DDPMScheduler")
    if cls not in _AFFINE_SCHEDULERS:
        raise ConfigError(f"diffusers scheduler {cls!r} is not supported as an affine path; use a discrete beta scheduler config "
                          f"({', '.join(sorted(_AFFINE_SCHEDULERS))})")
    for key, value in cfg.items():
        if key.startswith("_") or key in _SCHEDULE_KEYS or key in _SAMPLER_KEYS:
            continue
        if key not in _MUST_BE:
            raise ConfigError(f"diffusers scheduler: key {key!r} (= {value!r}) is not understood here; remove it if it only affects sampling")
        if value not in _MUST_BE[key]:
            raise ConfigError(f"diffusers scheduler: {key}={value!r} is not supported ({_WHY[key]})")
    n = int(cfg.get("num_train_timesteps", 1000))
    kind = cfg.get("prediction_type", "epsilon")
    if kind not in _KINDS:
        raise ConfigError(f"diffusers scheduler: prediction_type {kind!r} is not one of {sorted(_KINDS)}")
    if cfg.get("trained_betas") is not None:
        betas = torch.as_tensor(cfg["trained_betas"], dtype=torch.float64)
    else:
        sched = cfg.get("beta_schedule", "linear")
        d_start, d_end = _BETA_DEFAULTS.get(cls, (1e-4, 0.02))
        start, end = float(cfg.get("beta_start", d_start)), float(cfg.get("beta_end", d_end))
        if sched == "linear":
            betas = torch.linspace(start, end, n, dtype=torch.float64)
        elif sched == "scaled_linear":
            betas = torch.linspace(start**0.5, end**0.5, n, dtype=torch.float64) ** 2
        elif sched == "squaredcos_cap_v2":
            betas = _cosine_betas(n)
        else:
            raise ConfigError(f"diffusers scheduler: beta_schedule {sched!r} cannot be expressed as an affine path here "
                              "(use linear, scaled_linear, squaredcos_cap_v2 or trained_betas)")
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
    unet = load_diffusers_model("UNet2DModel", unet_cfg.parent, dtype=dtype, what="UNet")
    return Teacher(UNetAdapter(unet), schedule, kind, time_map=schedule.t_to_timestep)


def ddim_scheduler_config(teacher_cfg: dict[str, Any], boundaries: Tensor) -> dict[str, Any] | None:
    """A DDIMScheduler config whose K-step sampling equals our K-step sampler, or None if none exists."""
    b = validate_windows(boundaries)
    k = b.numel() - 1
    n = int(teacher_cfg.get("num_train_timesteps", 1000))
    if n % k or not torch.allclose(b, torch.linspace(0, 1, k + 1, dtype=torch.float64), atol=1e-9):
        return None
    keep = {key: v for key, v in teacher_cfg.items() if key in _SCHEDULE_KEYS}
    # steps_offset: unused by trailing spacing; 1 keeps StableDiffusionPipeline from flagging the config as outdated
    keep.update(_class_name="DDIMScheduler", timestep_spacing="trailing", set_alpha_to_one=True, steps_offset=1,
                clip_sample=False, thresholding=False, rescale_betas_zero_snr=False)
    return keep


def perflow_scheduler_config(student: PeRFlowStudent, teacher_cfg: dict[str, Any]) -> dict[str, Any]:
    """The :class:`~rectflow.perflow.diffusers_scheduler.PeRFlowScheduler` config of a student (its window knots)."""
    knots = student.window_path
    return {"_class_name": "PeRFlowScheduler", "windows": [float(v) for v in knots.boundaries], "alphas": [float(v) for v in knots.a_knots],
            "sigmas": [float(v) for v in knots.b_knots], "num_train_timesteps": int(teacher_cfg.get("num_train_timesteps", 1000)),
            "prediction_type": teacher_cfg.get("prediction_type", "epsilon")}


def write_student_parts(student: PeRFlowStudent, folder: Path, teacher_cfg: dict[str, Any], *, stock_scheduler: bool = False,
                        extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write the student's ``unet/``, its schedulers and ``perflow.json`` into ``folder``; returns perflow.json's content.

    ``scheduler/`` is the :class:`PeRFlowScheduler` (any steps >= K) and ``scheduler_ddim/`` the stock
    DDIM config when it is exact; with ``stock_scheduler=True`` (exact DDIM required) the two swap:
    ``scheduler/`` is the stock DDIM and ``scheduler_perflow/`` ours.
    """
    net = unwrap_unet(student.net)
    if not hasattr(net, "save_pretrained"):
        raise ConfigError("perflow export: the student's network is not a diffusers model")
    ddim_cfg = ddim_scheduler_config(teacher_cfg, student.boundaries)
    if stock_scheduler and ddim_cfg is None:
        raise ConfigError("perflow export: stock_scheduler=True needs windows uniform in t with K dividing num_train_timesteps "
                          "(no stock scheduler reproduces these windows); export with PeRFlowScheduler instead")
    make_dirs(folder)
    net.save_pretrained(str(folder / "unet"))
    ours = perflow_scheduler_config(student, teacher_cfg)
    if stock_scheduler:
        save_json(folder / "scheduler" / "scheduler_config.json", ddim_cfg)
        save_json(folder / "scheduler_perflow" / "scheduler_config.json", ours)
        where = ("scheduler/: a stock DDIMScheduler, exact at K steps only; scheduler_perflow/: PeRFlowScheduler "
                 "(import rectflow.perflow.diffusers_scheduler), any steps >= K")
    else:
        if ddim_cfg is not None:
            save_json(folder / "scheduler_ddim" / "scheduler_config.json", ddim_cfg)
        save_json(folder / "scheduler" / "scheduler_config.json", ours)
        where = ("scheduler/: PeRFlowScheduler (import rectflow.perflow.diffusers_scheduler), any steps >= K; "
                 "scheduler_ddim/ (when present): a stock DDIMScheduler, exact at K steps only")
    meta = {"format": "rectflow.perflow", "windows": [float(v) for v in student.boundaries],
            "parameterization": student.parameterization, "teacher_scheduler": teacher_cfg,
            "stock_scheduler_exact": ddim_cfg is not None, "scheduler": where,
            "sampler": "one Euler step per window on the window path (== DDIM between window boundaries)", **(extra or {})}
    save_json(folder / "perflow.json", meta)
    return meta


def export_student(student: PeRFlowStudent, folder: str | Path, teacher_folder: str | Path) -> Path:
    """Write ``unet/`` + ``perflow.json`` + ``scheduler/scheduler_config.json`` (our :class:`PeRFlowScheduler`)
    (+ ``scheduler_ddim/scheduler_config.json`` when a stock DDIMScheduler reproduces the K-step sampler
    exactly; ``perflow.json["stock_scheduler_exact"]`` says which).  A complete text-to-image pipeline
    folder: :func:`rectflow.perflow.latent.export_pipeline`."""
    folder, teacher_folder = Path(folder), Path(teacher_folder)
    sched_path = _find(teacher_folder, "scheduler", "scheduler_config.json")
    if sched_path is None:
        raise ConfigError(f"diffusers folder {str(teacher_folder)!r} has no scheduler/scheduler_config.json")
    write_student_parts(student, folder, load_json(sched_path))
    return folder


def load_student(folder: str | Path, *, dtype: torch.dtype = torch.float32) -> PeRFlowStudent:
    """Our loader for an :func:`export_student` or :func:`~rectflow.perflow.latent.export_pipeline` folder
    (whether or not a stock scheduler is exact): the student on its windows, with the teacher's
    schedule and parameterisation (a ``UNet2DConditionModel`` gets :class:`TextUNetAdapter`)."""
    folder = Path(folder)
    meta_path = folder / "perflow.json"
    if not meta_path.is_file():
        raise ConfigError(f"{str(folder)!r} has no perflow.json (not a PeRFlow export)")
    if not (folder / "unet" / "config.json").is_file():
        raise ConfigError(f"{str(folder)!r} has no unet/config.json")
    meta = load_json(meta_path)
    schedule, kind = schedule_from_config(meta["teacher_scheduler"])
    cls = load_json(folder / "unet" / "config.json").get("_class_name", "UNet2DModel")
    if cls not in ("UNet2DModel", "UNet2DConditionModel"):
        raise ConfigError(f"{folder / 'unet' / 'config.json'}: _class_name {cls!r} is not a UNet2DModel or UNet2DConditionModel")
    unet = load_diffusers_model(cls, folder / "unet", dtype=dtype, what="UNet")
    return PeRFlowStudent(adapt_unet(unet), schedule, torch.tensor(meta["windows"], dtype=torch.float64), kind,
                          time_map=schedule.t_to_timestep)
