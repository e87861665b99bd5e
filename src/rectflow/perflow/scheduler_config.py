"""diffusers scheduler configs <-> rectflow schedules, in both directions (the one place they are translated).

In: :func:`schedule_from_config` reads a teacher's scheduler config: the betas become a
:class:`~rectflow.diffusion.schedules.DDPMSchedule` (``prediction_type`` epsilon / v_prediction / sample -> eps / v / x0),
a ``FlowMatchEulerDiscreteScheduler`` a :class:`~rectflow.diffusion.schedules.DiscreteFlowMatchingSchedule`; keys
that only change how a scheduler samples are read past, keys that change the model's meaning are refused (one line).
Out: the configs an export ships: :func:`perflow_scheduler_config` (our ``PeRFlowScheduler``, right at any step count
>= K, carrying the teacher's schedule and sampling keys) and :func:`stock_scheduler_config` (a stock DDIM /
FlowMatchEuler config that is exact at K steps, where one exists).  The sampling grid of n steps over K windows is
:func:`rectflow.perflow.windows.step_grid`.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from rectflow.diffusion.schedules import DDPMSchedule, DiscreteFlowMatchingSchedule
from rectflow.engine.io import load_json, save_json
from rectflow.errors import ConfigError, check_int
from rectflow.perflow.student import PeRFlowStudent
from rectflow.perflow.windows import validate_windows

__all__ = ["AFFINE_SCHEDULERS", "FLOW_SCHEDULERS", "PINNED_KEYS", "SAMPLER_KEYS", "SCHEDULE_KEYS", "PERFLOW_SCHEDULER_ENTRY", "SCHEDULER_FILE", "TEACHER_SAMPLER_KEYS", "cfg_is_flow", "ddim_scheduler_config", "flow_match_scheduler_config",
           "perflow_scheduler_config", "save_perflow_scheduler", "schedule_from_config", "schedule_from_file", "stock_scheduler_config",
           "teacher_schedule_keys"]

_KINDS = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}
# Schedulers that share DDPM's discrete training schedule (betas over N steps, timestep n at
# s = (n + 1) / N): their configs describe the same model, they differ only in how they sample.
AFFINE_SCHEDULERS = {"DDPMScheduler", "DDIMScheduler", "PNDMScheduler", "EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler",
                     "DPMSolverMultistepScheduler", "DPMSolverSinglestepScheduler", "LMSDiscreteScheduler", "HeunDiscreteScheduler",
                     "UniPCMultistepScheduler", "DEISMultistepScheduler", "KDPM2DiscreteScheduler"}
# Defaults of beta_start / beta_end where a class's own differ from DDPM's (a config may omit them).
_BETA_DEFAULTS = {"HeunDiscreteScheduler": (0.00085, 0.012), "KDPM2DiscreteScheduler": (0.00085, 0.012)}
# Keys that define the model: the training noise schedule and the network's output.
SCHEDULE_KEYS = {"num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas", "prediction_type"}
# Keys that only change how a scheduler samples (step spacing, solver, clipping, sigma grids): our
# samplers replace the scheduler, so they are read past.
SAMPLER_KEYS = {"timestep_spacing", "steps_offset", "clip_sample", "clip_sample_range", "set_alpha_to_one", "skip_prk_steps",
                "thresholding", "dynamic_thresholding_ratio", "sample_max_value", "solver_order", "algorithm_type", "solver_type",
                "lower_order_final", "euler_at_final", "use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "use_lu_lambdas",
                "final_sigmas_type", "lambda_min_clipped", "interpolation_type", "sigma_min", "sigma_max", "predict_x0", "disable_corrector",
                "solver_p", "time_shift_type", "flow_shift"}
# Keys that change the model's meaning away from their default: accepted only at these values.
PINNED_KEYS = {"rescale_betas_zero_snr": (False,), "timestep_type": ("discrete",), "use_flow_sigmas": (False,), "use_dynamic_shifting": (False,),
               "shift_terminal": (None,), "variance_type": (None, "fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log")}
# Flow-matching schedulers (theory §6.10): z = (1 - sigma) x0 + sigma noise, the network's output u = noise - x0.
FLOW_SCHEDULERS = {"FlowMatchEulerDiscreteScheduler"}
_FLOW_SCHEDULE_KEYS = {"num_train_timesteps", "shift"}
# Read past: another sampler on the same model and grid, or settings used only with dynamic shifting.
_FLOW_SAMPLER_KEYS = {"stochastic_sampling", "base_shift", "max_shift", "base_image_seq_len", "max_image_seq_len", "time_shift_type"}
# Keys that move the sampling grid or the network's time input away from the static shift: accepted only at these values.
_FLOW_MUST_BE = {"use_dynamic_shifting": (False,), "invert_sigmas": (False,), "shift_terminal": (None, 0.0), "use_karras_sigmas": (False,),
                 "use_exponential_sigmas": (False,), "use_beta_sigmas": (False,)}
_FLOW_WHY = {"use_dynamic_shifting": "the shift then depends on the image resolution (mu, chosen by the pipeline); give a static shift",
             "invert_sigmas": "inverted sigmas feed the network 1 - sigma and run the grid the other way",
             "shift_terminal": "a grid stretched to end at shift_terminal is not reproduced here",
             "use_karras_sigmas": "a Karras sigma grid replaces the shifted grid, which the windows and the stock sampler follow here",
             "use_exponential_sigmas": "an exponential sigma grid replaces the shifted grid, which the windows and the stock sampler follow here",
             "use_beta_sigmas": "a beta sigma grid replaces the shifted grid, which the windows and the stock sampler follow here"}
# Our scheduler ships inside every export as a diffusers custom component: this file (it imports nothing from
# rectflow) is copied into the scheduler's folder, and model_index.json names it, so stock diffusers loads the export
# with trust_remote_code=True and no rectflow installed.
SCHEDULER_FILE = Path(__file__).with_name("scheduling_perflow.py")
PERFLOW_SCHEDULER_ENTRY = [SCHEDULER_FILE.stem, "PeRFlowScheduler"]
# The teacher scheduler's sampling keys that PeRFlowScheduler's config carries through (so from_config into a stock scheduler
# samples as the teacher's did); the standalone scheduler file keeps the same tuple (it cannot import this module; a test
# checks that they agree).
TEACHER_SAMPLER_KEYS = ("clip_sample", "clip_sample_range", "set_alpha_to_one", "steps_offset", "timestep_spacing", "thresholding",
                        "sample_max_value", "skip_prk_steps", "interpolation_type", "use_karras_sigmas", "timestep_type")
_WHY = {"rescale_betas_zero_snr": "zero terminal SNR gives alpha = 0 at the noise end, which DDPMSchedule cannot hold",
        "timestep_type": "continuous timesteps feed the network log-sigma, not the discrete step index",
        "use_flow_sigmas": "a flow-matching model, not a discrete beta schedule",
        "use_dynamic_shifting": "resolution-dependent time shift of a flow-matching model",
        "shift_terminal": "a flow-matching terminal shift",
        "variance_type": "a learned variance means the network outputs 2C channels (mean and variance)"}





def _cosine_betas(n: int, max_beta: float = 0.999) -> Tensor:
    """Nichol & Dhariwal's cosine schedule as discrete betas: 1 - abar(i+1)/abar(i), abar(u) = cos^2((u + 0.008)/1.008 pi/2)."""
    def abar(u: float) -> float:
        return math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2

    return torch.tensor([min(1 - abar((i + 1) / n) / abar(i / n), max_beta) for i in range(n)], dtype=torch.float64)


def _flow_schedule_from_config(cfg: dict[str, Any]) -> tuple[DiscreteFlowMatchingSchedule, str]:
    """The flow-matching half of :func:`schedule_from_config` (theory §6.10)."""
    for key, value in cfg.items():
        if key.startswith("_") or key in _FLOW_SCHEDULE_KEYS or key in _FLOW_SAMPLER_KEYS:
            continue
        if key not in _FLOW_MUST_BE:
            raise ConfigError(f"diffusers scheduler: key {key!r} (= {value!r}) of {cfg.get('_class_name')} is not understood here; "
                              "remove it if it only affects sampling")
        if value not in _FLOW_MUST_BE[key]:
            raise ConfigError(f"diffusers scheduler: {key}={value!r} is not supported ({_FLOW_WHY[key]})")
    n, shift = cfg.get("num_train_timesteps", 1000), cfg.get("shift", 1.0)
    check_int(n, "diffusers scheduler: num_train_timesteps")
    if isinstance(shift, bool) or not isinstance(shift, (int, float)) or not math.isfinite(shift) or not shift > 0:
        raise ConfigError(f"diffusers scheduler: shift must be a finite number > 0, got {shift!r}")
    return DiscreteFlowMatchingSchedule(n, float(shift)), "u"


# why the schedulers users most often bring cannot be a PeRFlow teacher's path
_NOT_AFFINE_WHY = {
    "LCMScheduler": "a consistency model's sampler: its network is distilled to jump to x0, not a probability-flow ODE to straighten",
    "TCDScheduler": "a trajectory-consistency model's sampler: its network is distilled to jump along the trajectory, not a probability-flow ODE",
    "CMStochasticIterativeScheduler": "a consistency model's sampler, not a probability-flow ODE",
    "ScoreSdeVeScheduler": "variance exploding: x + sigma eps with sigma up to sigma_max has no bounded a(t), b(t) path from pure noise",
    "KarrasVeScheduler": "variance exploding: x + sigma eps with sigma up to sigma_max has no bounded a(t), b(t) path from pure noise",
}


def schedule_from_file(path: Path, cfg: dict[str, Any] | None = None, *, allow_flow: bool = False) -> tuple[DDPMSchedule | DiscreteFlowMatchingSchedule, str]:
    """:func:`schedule_from_config` of the config in ``path`` (or ``cfg``, read from there), its
    refusals prefixed with the file."""
    cfg = load_json(path) if cfg is None else cfg
    try:
        return schedule_from_config(cfg, allow_flow=allow_flow)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def schedule_from_config(cfg: dict[str, Any], *, allow_flow: bool = False) -> tuple[DDPMSchedule | DiscreteFlowMatchingSchedule, str]:
    """(schedule, our parameterisation) from a diffusers scheduler config: the ONE place where a
    diffusers scheduler becomes an affine path.  The schedule's ``t_to_timestep`` is the network's
    time input at rectflow time t.

    Accepted: the discrete beta schedulers (DDPM, DDIM, PNDM, Euler, Euler ancestral,
    DPM-Solver(++) multistep and single-step, LMS, Heun, UniPC, DEIS, KDPM2): ``beta_schedule``
    linear / scaled_linear / squaredcos_cap_v2 or ``trained_betas``; ``prediction_type`` epsilon /
    v_prediction / sample -> eps / v / x0.  Keys that only steer the scheduler's own sampling
    (``timestep_spacing``, ``steps_offset``, Karras sigmas, solver order, clipping, ...) are read past.
    Raises :class:`ConfigError` naming the key for anything else: another scheduler class, an unknown
    key, or a key that changes the model (``rescale_betas_zero_snr``, ``timestep_type``, flow sigmas,
    learned ``variance_type``, an unknown ``beta_schedule`` or ``prediction_type``).

    With ``allow_flow=True`` (the transformer loaders; the SD 1.x / 2.x latent pipeline keeps the
    default and refuses it) also ``FlowMatchEulerDiscreteScheduler`` (SD3; theory §6.10): the straight line
    :class:`DiscreteFlowMatchingSchedule` (``num_train_timesteps`` N, time input sigma N) with kind
    ``u`` (the network outputs noise - x0, i.e. dz/dsigma = -dz/dt).  The static ``shift`` is kept on
    the schedule; it moves no coefficient, only ``sampling_grid``.  Refused, naming the key:
    ``use_dynamic_shifting``, ``invert_sigmas``, ``shift_terminal``, Karras / exponential / beta
    sigmas (each replaces the shifted grid), an unknown key, ``shift <= 0``.
    """
    cls = cfg.get("_class_name", "DDPMScheduler")
    if cls in FLOW_SCHEDULERS:
        if not allow_flow:
            raise ConfigError(f"diffusers scheduler {cls!r} is a flow-matching scheduler, read here only with a transformer teacher "
                              "(an SD3-layout folder with transformer/, perflow.load_teacher)")
        return _flow_schedule_from_config(cfg)
    if cls not in AFFINE_SCHEDULERS:
        why = f" ({_NOT_AFFINE_WHY[cls]})" if cls in _NOT_AFFINE_WHY else ""
        raise ConfigError(f"diffusers scheduler {cls!r} is not supported as an affine path{why}; use a discrete beta scheduler config "
                          f"({', '.join(sorted(AFFINE_SCHEDULERS))}) or {', '.join(sorted(FLOW_SCHEDULERS))}")
    for key, value in cfg.items():
        if key.startswith("_") or key in SCHEDULE_KEYS or key in SAMPLER_KEYS:
            continue
        if key not in PINNED_KEYS:
            raise ConfigError(f"diffusers scheduler: key {key!r} (= {value!r}) is not understood here; remove it if it only affects sampling")
        if value not in PINNED_KEYS[key]:
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




def ddim_scheduler_config(teacher_cfg: dict[str, Any], boundaries: Tensor) -> dict[str, Any] | None:
    """A DDIMScheduler config whose K-step sampling equals our K-step sampler, or None if none exists."""
    b = validate_windows(boundaries)
    k = b.numel() - 1
    n = int(teacher_cfg.get("num_train_timesteps", 1000))
    if n % k or not torch.allclose(b, torch.linspace(0, 1, k + 1, dtype=torch.float64), atol=1e-9):
        return None
    keep = {key: v for key, v in teacher_cfg.items() if key in SCHEDULE_KEYS}
    # steps_offset: unused by trailing spacing; 1 keeps StableDiffusionPipeline from flagging the config as outdated
    keep.update(_class_name="DDIMScheduler", timestep_spacing="trailing", set_alpha_to_one=True, steps_offset=1,
                clip_sample=False, thresholding=False, rescale_betas_zero_snr=False)
    return keep


def flow_match_scheduler_config(teacher_cfg: dict[str, Any], boundaries: Tensor) -> dict[str, Any] | None:
    """A stock ``FlowMatchEulerDiscreteScheduler`` config whose K-step sampling equals our K-step sampler,
    or None: exact when the K windows are the teacher scheduler's own K-step grid
    (``DiscreteFlowMatchingSchedule.sampling_grid(K)``, to 1e-6, the scheduler's float32 rounding).
    Why exact (theory §6.10): on the straight line the window path is the teacher's path, a
    ``u`` output converts to the velocity -u at any t, and the stock step z + (sigma' - sigma) u is
    our Euler step between the two window boundaries."""
    schedule, _ = schedule_from_config(teacher_cfg, allow_flow=True)
    if not isinstance(schedule, DiscreteFlowMatchingSchedule):
        return None
    b = validate_windows(boundaries)
    grid = schedule.sampling_grid(b.numel() - 1)
    if not torch.allclose(b.cpu(), grid, rtol=0, atol=1e-6):
        return None
    return {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": schedule.num_steps, "shift": schedule.shift,
            "use_dynamic_shifting": False, "invert_sigmas": False, "shift_terminal": None, "use_karras_sigmas": False,
            "use_exponential_sigmas": False, "use_beta_sigmas": False, "stochastic_sampling": False}


def stock_scheduler_config(teacher_cfg: dict[str, Any], boundaries: Tensor) -> tuple[str, dict[str, Any]] | None:
    """(subfolder, config) of the stock diffusers scheduler that reproduces our K-step sampler exactly at
    K steps, or None: ``scheduler_ddim`` (:func:`ddim_scheduler_config`) for a DDPM-family teacher,
    ``scheduler_flowmatch`` (:func:`flow_match_scheduler_config`) for a flow-matching one."""
    if cfg_is_flow(teacher_cfg):
        cfg = flow_match_scheduler_config(teacher_cfg, boundaries)
        return None if cfg is None else ("scheduler_flowmatch", cfg)
    cfg = ddim_scheduler_config(teacher_cfg, boundaries)
    return None if cfg is None else ("scheduler_ddim", cfg)


def cfg_is_flow(cfg: dict[str, Any]) -> bool:
    """Whether a diffusers scheduler config is a flow-matching one (theory §6.10)."""
    return cfg.get("_class_name") in FLOW_SCHEDULERS


def teacher_schedule_keys(teacher_cfg: dict[str, Any]) -> dict[str, Any]:
    """The keys of a teacher's scheduler config that define its training schedule, with the class's defaults filled
    in: betas (``beta_start``, ``beta_end``, ``beta_schedule``, ``trained_betas``) or a flow-matching ``shift``.
    Written into every PeRFlow scheduler config, so ``DDIMScheduler.from_config(pipe.scheduler.config)`` (or
    ``FlowMatchEulerDiscreteScheduler``) gives the teacher's scheduler back instead of diffusers' defaults."""
    n = int(teacher_cfg.get("num_train_timesteps", 1000))
    if cfg_is_flow(teacher_cfg):
        return {"num_train_timesteps": n, "shift": float(teacher_cfg.get("shift", 1.0))}
    start, end = _BETA_DEFAULTS.get(teacher_cfg.get("_class_name", ""), (0.0001, 0.02))
    return {"num_train_timesteps": n, "beta_start": float(teacher_cfg.get("beta_start", start)), "beta_end": float(teacher_cfg.get("beta_end", end)),
            "beta_schedule": teacher_cfg.get("beta_schedule", "linear"), "trained_betas": teacher_cfg.get("trained_betas")}


def perflow_scheduler_config(student: PeRFlowStudent, teacher_cfg: dict[str, Any]) -> dict[str, Any]:
    """The :class:`~rectflow.perflow.diffusers_scheduler.PeRFlowScheduler` config of a student: its window knots, the
    network's output kind and time input, and the teacher's own schedule (:func:`teacher_schedule_keys`)."""
    knots = student.window_path
    cfg = {"_class_name": "PeRFlowScheduler", **teacher_schedule_keys(teacher_cfg), "windows": [float(v) for v in knots.boundaries],
           "window_alphas": [float(v) + 0.0 for v in knots.a_knots], "window_sigmas": [float(v) + 0.0 for v in knots.b_knots],  # + 0.0: no -0.0
           "prediction_type": teacher_cfg.get("prediction_type", "epsilon"), "time_input": "step_index",
           **{k: teacher_cfg[k] for k in TEACHER_SAMPLER_KEYS if teacher_cfg.get(k) is not None}}
    if cfg_is_flow(teacher_cfg):  # the network outputs u = noise - x0 and reads sigma N (theory §6.10)
        cfg.update(prediction_type="flow_prediction", time_input="sigma")
    return cfg


def save_perflow_scheduler(folder: Path, config: dict[str, Any]) -> None:
    """``folder/scheduler_config.json`` + ``folder/scheduling_perflow.py`` (the scheduler's code, a custom component)."""
    save_json(folder / "scheduler_config.json", config)
    shutil.copyfile(SCHEDULER_FILE, folder / SCHEDULER_FILE.name)


