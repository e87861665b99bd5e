"""diffusers in and out for PeRFlow (optional extra: ``pip install rectflow[perflow]``).

In: :func:`load_teacher` reads a LOCAL folder (never downloads) holding a ``UNet2DModel``
(``unet/`` subfolder or ``config.json`` at the top) and a DDPM/DDIM scheduler config
(``scheduler/scheduler_config.json`` or ``scheduler_config.json``); the betas become a
:class:`~rectflow.diffusion.schedules.DDPMSchedule` (an affine path), ``prediction_type`` epsilon / v_prediction /
sample maps to eps / v / x0, and rectflow time t maps to the UNet's timestep n = N (1 - t) - 1.

Flow-matching transformers (Stable Diffusion 3 layout, theory §6.10): a folder with
``transformer/`` (``SD3Transformer2DModel``) and a ``FlowMatchEulerDiscreteScheduler`` config is a
conditional teacher on the straight line (:class:`~rectflow.diffusion.schedules.DiscreteFlowMatchingSchedule`),
output kind ``u`` = noise - x0, time input sigma N with sigma = 1 - t.  The scheduler's ``shift``
is not part of the path: it only picks the stock sampler's grid
(``DiscreteFlowMatchingSchedule.sampling_grid``), which is where PeRFlow windows should sit for a
stock ``FlowMatchEulerDiscreteScheduler`` to reproduce the K-step student.  The text encoders (two
CLIP, one T5) are not loaded: the condition is the precomputed pair (encoder_hidden_states
(B, L, D), pooled_projections (B, P)) and text prompts are refused.

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
import os
import shutil
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from torch import Tensor, nn

from rectflow.diffusion.schedules import DDPMSchedule, DiscreteFlowMatchingSchedule
from rectflow.engine.io import check_writable, load_json, make_dirs, save_json, sha256_file
from rectflow.errors import CheckpointError, ConfigError
from rectflow.flow.guidance import NULL_LABEL
from rectflow.perflow.guidance import Guidance
from rectflow.perflow.student import PeRFlowStudent
from rectflow.perflow.teacher import Teacher
from rectflow.perflow.windows import validate_windows

__all__ = [
    "PERFLOW_SCHEDULER_ENTRY",
    "SD3TransformerAdapter",
    "TextUNetAdapter",
    "UNetAdapter",
    "adapt_model",
    "adapt_unet",
    "cfg_is_flow",
    "ddim_scheduler_config",
    "export_student",
    "flow_match_scheduler_config",
    "load_diffusers_model",
    "load_student",
    "load_teacher",
    "optional_transformers",
    "pair_condition",
    "perflow_scheduler_config",
    "save_perflow_scheduler",
    "teacher_schedule_keys",
    "SCHEDULER_FILE",
    "schedule_from_config",
    "schedule_from_file",
    "staged_export",
    "sd3_condition",
    "sdxl_condition",
    "size_time_ids",
    "step_grid",
    "stock_scheduler_config",
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
# Flow-matching schedulers (theory §6.10): z = (1 - sigma) x0 + sigma noise, the network's output u = noise - x0.
_FLOW_SCHEDULERS = {"FlowMatchEulerDiscreteScheduler"}
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
# Transformers we drive, each with its adapter (filled in below the adapter classes).
_TRANSFORMERS: dict[str, type[nn.Module]] = {}
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


def _diffusers():
    try:
        import diffusers  # optional extra (.[perflow]); only diffusers teachers need it
    except ImportError as e:  # pragma: no cover - exercised only without the extra
        raise ConfigError("diffusers is not installed; pip install 'rectflow[perflow]'") from e
    return diffusers


def optional_transformers():
    """The ``transformers`` module, or a one-line ConfigError naming the extra to install."""
    try:
        import transformers  # optional extra (.[perflow]); only text-to-image teachers need it
    except ImportError as e:  # pragma: no cover - exercised only without the extra
        raise ConfigError("transformers is not installed; pip install 'rectflow[perflow]'") from e
    return transformers


class UNetAdapter(nn.Module):
    """Wrap a diffusers ``UNet2DModel`` as ``f(z, timestep) -> output tensor`` (drops the output dataclass)."""

    def __init__(self, unet: nn.Module) -> None:
        super().__init__()
        self.unet = unet

    def forward(self, z: Tensor, timestep: Tensor) -> Tensor:
        return self.unet(z, timestep).sample


def pair_condition(cond: Any, *, model: str, names: tuple[str, str], prompts: str) -> tuple[Tensor, Tensor]:
    """(hidden (B, L, D), pooled (B, P)) from a two-part text condition: that pair as a tuple / list, or a
    dict with the two keys ``names`` (the model's own argument names).  Text prompts are refused with
    ``prompts`` (what to do instead), anything else with one line; ``model`` names the caller."""
    if isinstance(cond, str) or (isinstance(cond, (list, tuple)) and cond and all(isinstance(c, str) for c in cond)):
        raise ConfigError(f"{model}: {prompts}")
    if isinstance(cond, dict) and set(cond) == set(names):
        cond = (cond[names[0]], cond[names[1]])
    if (isinstance(cond, (list, tuple)) and len(cond) == 2 and all(isinstance(c, Tensor) for c in cond)
            and cond[0].dim() == 3 and cond[1].dim() == 2 and cond[0].shape[0] == cond[1].shape[0]):
        return cond[0], cond[1]
    got = "None" if cond is None else type(cond).__name__
    raise ConfigError(f"{model}: the condition must be the pair ({names[0]} (B, L, D), {names[1]} (B, P)), got {got} "
                      "(unconditional: the empty prompt's pair)")


def sd3_condition(cond: Any) -> tuple[Tensor, Tensor]:
    """(encoder_hidden_states (B, L, D), pooled_projections (B, P)) from an SD3 condition (:func:`pair_condition`);
    text prompts are refused in one line (the text encoders are not loaded here)."""
    return pair_condition(cond, model="SD3 teacher", names=("encoder_hidden_states", "pooled_projections"),
                          prompts="text prompts need SD3's three text encoders, which rectflow does not load; "
                                  "pass the precomputed pair (encoder_hidden_states (B, L, D), pooled_projections (B, P))")


def sdxl_condition(cond: Any) -> tuple[Tensor, Tensor]:
    """(encoder_hidden_states (B, L, D1 + D2), text_embeds (B, P)) from an SDXL condition (:func:`pair_condition`):
    both text encoders' penultimate hidden states and text_encoder_2's pooled projection, as
    :meth:`rectflow.perflow.latent.LatentPipeline.encode_text` makes them."""
    return pair_condition(cond, model="SDXL UNet", names=("encoder_hidden_states", "text_embeds"),
                          prompts="encode text prompts first (LatentPipeline.encode_text gives the pair (encoder_hidden_states, text_embeds))")


def size_time_ids(z: Tensor, vae_scale_factor: int, dtype: torch.dtype) -> Tensor:
    """SDXL's added time ids (B, 6) for latents z (B, C, h, w): original size (H, W), crop top-left (0, 0),
    target size (H, W), with (H, W) = (h, w) x ``vae_scale_factor``: what StableDiffusionXLPipeline uses
    when it is given ``height`` and ``width`` (or takes its defaults) and no size arguments."""
    h, w = (int(n) * int(vae_scale_factor) for n in z.shape[-2:])
    return torch.tensor([h, w, 0, 0, h, w], dtype=dtype, device=z.device).expand(z.shape[0], 6)


class TextUNetAdapter(nn.Module):
    """Wrap a diffusers ``UNet2DConditionModel`` as ``f(z, timestep, cond) -> output tensor``: z (B, C, h, w)
    latents, timestep (B,) the UNet's own step index.

    SD 1.x / 2.x: cond (B, L, D), the text encoder's last hidden state, passed as ``encoder_hidden_states``.
    SDXL (``addition_embed_type="text_time"``): cond the pair (hidden (B, L, D), pooled (B, P))
    (:func:`sdxl_condition`); the UNet also gets ``added_cond_kwargs={"text_embeds": pooled,
    "time_ids": ids}`` with the size ids (B, 6) made from the latents' size (:func:`size_time_ids`,
    ``vae_scale_factor``), so a condition never carries them."""

    def __init__(self, unet: nn.Module, vae_scale_factor: int = 8) -> None:
        super().__init__()
        self.unet, self.vae_scale_factor = unet, int(vae_scale_factor)
        self.text_time = getattr(unet.config, "addition_embed_type", None) == "text_time"

    def forward(self, z: Tensor, timestep: Tensor, cond: Any = None) -> Tensor:
        if cond is None:
            raise ConfigError("a text-conditional UNet needs a condition (the text embeddings; the empty prompt's for unconditional)")
        if not self.text_time:
            return self.unet(z, timestep, encoder_hidden_states=cond).sample
        hidden, pooled = sdxl_condition(cond)
        added = {"text_embeds": pooled, "time_ids": size_time_ids(z, self.vae_scale_factor, hidden.dtype)}
        return self.unet(z, timestep, encoder_hidden_states=hidden, added_cond_kwargs=added).sample


class SD3TransformerAdapter(nn.Module):
    """Wrap a diffusers ``SD3Transformer2DModel`` as ``f(z, timestep, cond) -> u``: z (B, C, h, w)
    latents, timestep (B,) the transformer's time input sigma N (sigma = 1 - t), cond the pair
    (encoder_hidden_states (B, L, D), pooled_projections (B, P)) (:func:`sd3_condition`); returns
    the transformer's output u = noise - x0 (B, C, h, w), the ``"u"`` kind."""

    def __init__(self, transformer: nn.Module) -> None:
        super().__init__()
        self.transformer = transformer

    def forward(self, z: Tensor, timestep: Tensor, cond: Any = None) -> Tensor:
        hidden, pooled = sd3_condition(cond)
        return self.transformer(hidden_states=z, timestep=timestep, encoder_hidden_states=hidden, pooled_projections=pooled).sample


_TRANSFORMERS["SD3Transformer2DModel"] = SD3TransformerAdapter


def unwrap_unet(net: nn.Module) -> nn.Module:
    """The diffusers model inside one of our adapters (or ``net`` itself)."""
    if isinstance(net, SD3TransformerAdapter):
        return net.transformer
    return net.unet if isinstance(net, (UNetAdapter, TextUNetAdapter)) else net


def adapt_unet(unet: nn.Module, vae_scale_factor: int = 8) -> nn.Module:
    """The adapter for a diffusers UNet: :class:`TextUNetAdapter` for a ``UNet2DConditionModel`` (``vae_scale_factor``:
    latent -> image size, for SDXL's size ids), else :class:`UNetAdapter`."""
    return TextUNetAdapter(unet, vae_scale_factor) if type(unet).__name__ == "UNet2DConditionModel" else UNetAdapter(unet)


def adapt_model(model: nn.Module) -> nn.Module:
    """The adapter for a diffusers model: a transformer's (e.g. :class:`SD3TransformerAdapter`), else :func:`adapt_unet`'s."""
    cls = _TRANSFORMERS.get(type(model).__name__)
    return cls(model) if cls is not None else adapt_unet(model)


def _subfolder(net: nn.Module) -> str:
    """Where a diffusers model goes in a pipeline folder: ``transformer`` or ``unet``."""
    return "transformer" if type(net).__name__ in _TRANSFORMERS else "unet"


def step_grid(boundaries: Tensor, n: int) -> Tensor:
    """n Euler steps over K windows (n >= K): window k gets n // K steps, plus one for k < n mod K (float64, n + 1 times)."""
    k = boundaries.numel() - 1
    if n < k:
        raise ConfigError(f"perflow: {n} inference steps are fewer than the {k} windows; use at least {k}")
    per = [n // k + (1 if i < n % k else 0) for i in range(k)]
    parts = [boundaries[i] + (boundaries[i + 1] - boundaries[i]) * torch.arange(m, dtype=torch.float64) / m for i, m in enumerate(per)]
    return torch.cat([*parts, boundaries[-1:].double()])


def load_diffusers_model(cls_name: str, folder: Path, *, dtype: torch.dtype = torch.float32, what: str = "model") -> nn.Module:
    """``diffusers.<cls_name>.from_pretrained(folder)`` from a local folder, in eval mode; a corrupt config or
    unreadable weights are one line naming the file (:class:`CheckpointError`)."""
    load_json(folder / "config.json")  # a corrupt config is named here; diffusers would only say "not a valid JSON file"
    cls = getattr(_diffusers(), cls_name, None)
    if cls is None:
        raise ConfigError(f"{folder / 'config.json'}: diffusers has no model class {cls_name!r}")
    try:  # low_cpu_mem_usage=False: the default asks for `accelerate` in a multi-line log message
        model = cls.from_pretrained(str(folder), local_files_only=True, low_cpu_mem_usage=False)
    except (OSError, ValueError, RuntimeError, KeyError, SafetensorError) as e:
        weights = sorted(p for p in folder.glob("diffusion_pytorch_model*") if p.suffix in (".safetensors", ".bin"))
        file = weights[0] if weights else folder / "diffusion_pytorch_model.safetensors"
        raise CheckpointError(f"{file}: cannot load the diffusers {what} weights: missing, truncated or corrupt ({type(e).__name__})") from None
    if any(p.dtype != dtype for p in model.parameters()):  # a no-op .to() makes diffusers log about fp32 modules
        model = model.to(dtype)
    return model.eval()


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
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ConfigError(f"diffusers scheduler: num_train_timesteps must be an integer >= 1, got {n!r}")
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
    if cls in _FLOW_SCHEDULERS:
        if not allow_flow:
            raise ConfigError(f"diffusers scheduler {cls!r} is a flow-matching scheduler, read here only with a transformer teacher "
                              "(an SD3-layout folder with transformer/, perflow.load_teacher)")
        return _flow_schedule_from_config(cfg)
    if cls not in _AFFINE_SCHEDULERS:
        why = f" ({_NOT_AFFINE_WHY[cls]})" if cls in _NOT_AFFINE_WHY else ""
        raise ConfigError(f"diffusers scheduler {cls!r} is not supported as an affine path{why}; use a discrete beta scheduler config "
                          f"({', '.join(sorted(_AFFINE_SCHEDULERS))}) or {', '.join(sorted(_FLOW_SCHEDULERS))}")
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


def _model_folder(folder: Path) -> tuple[str, Path]:
    """("unet" | "transformer", the model's folder) of a diffusers folder; one line if it has neither or both."""
    unet_cfg = _find(folder, "unet", "config.json")
    tr_cfg = folder / "transformer" / "config.json"
    if unet_cfg is None and not tr_cfg.is_file():
        raise ConfigError(f"diffusers folder {str(folder)!r} has neither unet/config.json nor transformer/config.json")
    if unet_cfg is not None and tr_cfg.is_file():
        raise ConfigError(f"diffusers folder {str(folder)!r} holds both a UNet and transformer/; keep one")
    return ("unet", unet_cfg.parent) if unet_cfg is not None else ("transformer", tr_cfg.parent)


def _load_transformer(folder: Path, schedule: Any, dtype: torch.dtype) -> nn.Module:
    """The adapter around ``folder``'s transformer; the schedule must be flow matching (theory §6.10)."""
    cfg_path = folder / "config.json"
    cls = load_json(cfg_path).get("_class_name")
    if cls not in _TRANSFORMERS:
        raise ConfigError(f"{cfg_path}: _class_name {cls!r} is not a supported transformer ({', '.join(sorted(_TRANSFORMERS))})")
    if not isinstance(schedule, DiscreteFlowMatchingSchedule):
        raise ConfigError(f"{cfg_path.parent}: a {cls} needs a flow-matching scheduler config ({', '.join(sorted(_FLOW_SCHEDULERS))}), "
                          f"got the affine path {schedule!r}")
    return _TRANSFORMERS[cls](load_diffusers_model(cls, folder, dtype=dtype, what="transformer"))


def load_teacher(folder: str | Path, *, dtype: torch.dtype = torch.float32, guidance: Guidance | float | None = None,
                 null_cond: Any = NULL_LABEL) -> Teacher:
    """A :class:`Teacher` from a local diffusers folder: a ``UNet2DModel`` + DDPM-family scheduler config,
    or an SD3-layout ``transformer/`` (``SD3Transformer2DModel``) + ``FlowMatchEulerDiscreteScheduler``
    config (theory §6.10), a conditional teacher of kind ``u`` on the straight line whose condition is
    the pair (encoder_hidden_states (B, L, D), pooled_projections (B, P)) (text encoders are not
    loaded).  ``guidance`` / ``null_cond`` as for :class:`Teacher` (for SD3 the null condition is the
    empty prompt's pair, (L, D) and (P,) or with a batch of 1)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ConfigError(f"diffusers folder {str(folder)!r} does not exist (only local folders are read)")
    sched_path = _find(folder, "scheduler", "scheduler_config.json")
    if sched_path is None:
        raise ConfigError(f"diffusers folder {str(folder)!r} has no scheduler/scheduler_config.json")
    part, model_folder = _model_folder(folder)
    schedule, kind = schedule_from_file(sched_path, allow_flow=True)
    if part == "transformer":
        net = _load_transformer(model_folder, schedule, dtype)
    else:
        net = UNetAdapter(load_diffusers_model("UNet2DModel", model_folder, dtype=dtype, what="UNet"))
    return Teacher(net, schedule, kind, time_map=schedule.t_to_timestep, guidance=guidance, null_cond=null_cond)


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
    return cfg.get("_class_name") in _FLOW_SCHEDULERS


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


def write_student_parts(student: PeRFlowStudent, folder: Path, teacher_cfg: dict[str, Any], *, stock_scheduler: bool = False,
                        extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write the student's ``unet/`` (or ``transformer/``), its schedulers and ``perflow.json`` into ``folder``;
    returns perflow.json's content.

    ``scheduler/`` is the :class:`PeRFlowScheduler` (any steps >= K) and the stock scheduler that is
    exact at K steps, when there is one (:func:`stock_scheduler_config`: ``scheduler_ddim/`` or
    ``scheduler_flowmatch/``), beside it; with ``stock_scheduler=True`` (an exact stock scheduler
    required) the two swap: ``scheduler/`` is the stock one and ``scheduler_perflow/`` ours.
    """
    net = unwrap_unet(student.net)
    if not hasattr(net, "save_pretrained"):
        raise ConfigError("perflow export: the student's network is not a diffusers model")
    stock = stock_scheduler_config(teacher_cfg, student.boundaries)
    if stock_scheduler and stock is None:
        need = ("windows on the teacher scheduler's own K-step shifted grid (DiscreteFlowMatchingSchedule.sampling_grid(K))"
                if cfg_is_flow(teacher_cfg) else "windows uniform in t with K dividing num_train_timesteps")
        raise ConfigError(f"perflow export: stock_scheduler=True needs {need} (no stock scheduler reproduces these windows); "
                          "export with PeRFlowScheduler instead")
    make_dirs(folder)
    part = _subfolder(net)
    net.save_pretrained(str(folder / part))
    ours = perflow_scheduler_config(student, teacher_cfg)
    stock_name = stock[1]["_class_name"] if stock is not None else None
    if stock_scheduler:
        k = student.boundaries.numel() - 1
        warnings.warn(f"perflow export: scheduler/ is a stock {stock_name}, exact at num_inference_steps={k} only; any other count samples "
                      "wrong without an error (the default export's PeRFlowScheduler takes any count >= K or refuses it)", UserWarning, stacklevel=3)
        save_json(folder / "scheduler" / "scheduler_config.json", stock[1])
        save_perflow_scheduler(folder / "scheduler_perflow", ours)
        where = (f"scheduler/: a stock {stock_name}, exact at K steps only; scheduler_perflow/: PeRFlowScheduler "
                 "(custom code in that folder: load with trust_remote_code=True, or import rectflow.perflow.diffusers_scheduler), any steps >= K")
    else:
        if stock is not None:
            save_json(folder / stock[0] / "scheduler_config.json", stock[1])
        save_perflow_scheduler(folder / "scheduler", ours)
        stock_dir = "scheduler_flowmatch/" if cfg_is_flow(teacher_cfg) else "scheduler_ddim/"
        stock_cls = "FlowMatchEulerDiscreteScheduler" if cfg_is_flow(teacher_cfg) else "DDIMScheduler"
        where = ("scheduler/: PeRFlowScheduler (custom code in scheduler/: from_pretrained(..., trust_remote_code=True)), any steps >= K; "
                 f"{stock_dir} (when present): a stock {stock_cls}, exact at K steps only")
    sampler = ("one Euler step per window on the straight line (== the stock flow-matching Euler step between window boundaries)"
               if cfg_is_flow(teacher_cfg) else "one Euler step per window on the window path (== DDIM between window boundaries)")
    weights = sorted(p for p in (folder / part).iterdir() if p.suffix in (".safetensors", ".bin"))
    meta = {"format": "rectflow.perflow", "windows": [float(v) for v in student.boundaries],
            "files_sha256": {f"{part}/{p.name}": sha256_file(p) for p in weights},  # verified by load_student
            "parameterization": student.parameterization, "teacher_scheduler": teacher_cfg,
            "stock_scheduler_exact": stock is not None, "scheduler": where, "model": part, "sampler": sampler, **(extra or {})}
    save_json(folder / "perflow.json", meta)
    return meta


def _write_transformer_pipeline_index(folder: Path, teacher_folder: Path, *, stock_scheduler: bool, stock_class: str | None) -> None:
    """Copy the teacher's other pipeline parts (VAE, text encoders, tokenizers: whatever it has) byte for byte
    and write ``model_index.json`` naming the student's transformer and scheduler; absent parts are
    ``[null, null]`` (load those with ``StableDiffusion3Pipeline.from_pretrained(folder, text_encoder=None, ...)``)."""
    index = load_json(teacher_folder / "model_index.json")
    new_index = {k: v for k, v in index.items() if k.startswith("_")}
    for key, value in index.items():
        if key.startswith("_") or key in ("transformer", "scheduler"):
            continue
        present = isinstance(value, list) and len(value) == 2 and value[0] is not None and (teacher_folder / key).is_dir()
        if present:
            shutil.copytree(teacher_folder / key, folder / key, dirs_exist_ok=True)
        new_index[key] = value if present else [None, None]
    new_index["transformer"] = index.get("transformer", ["diffusers", "SD3Transformer2DModel"])
    new_index["scheduler"] = ["diffusers", stock_class] if stock_scheduler else PERFLOW_SCHEDULER_ENTRY
    save_json(folder / "model_index.json", new_index)


@contextmanager
def staged_export(folder: Path) -> Iterator[Path]:
    """The one way an export is written: built in a hidden folder beside ``folder`` (yielded) and renamed
    into place when the block ends, so a kill or an error leaves no half-written export.  A previous
    export in ``folder`` (it holds ``perflow.json``) is replaced; any other non-empty folder is refused."""
    check_writable(folder, directory=True)
    if folder.exists() and any(folder.iterdir()) and not (folder / "perflow.json").is_file():
        raise ConfigError(f"{folder} is not empty and holds no PeRFlow export (perflow.json missing); nothing was written: use an empty or new directory")
    stage, old = folder.with_name(f".{folder.name}.export.tmp"), folder.with_name(f".{folder.name}.old.tmp")
    for p in (stage, old):
        if p.exists():
            shutil.rmtree(p)
    try:
        yield stage
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    if folder.exists():
        os.replace(folder, old)
    os.replace(stage, folder)
    shutil.rmtree(old, ignore_errors=True)


def export_student(student: PeRFlowStudent, folder: str | Path, teacher_folder: str | Path, *, stock_scheduler: bool = False) -> Path:
    """Write ``unet/`` (or ``transformer/``) + ``perflow.json`` + ``scheduler/scheduler_config.json`` (our
    :class:`PeRFlowScheduler`) (+ ``scheduler_ddim/`` or ``scheduler_flowmatch/`` when a stock scheduler
    reproduces the K-step sampler exactly; ``perflow.json["stock_scheduler_exact"]`` says which;
    ``stock_scheduler=True`` puts that stock one in ``scheduler/``).  A transformer student of a teacher
    folder with ``model_index.json`` (SD3 layout) also gets the teacher's other parts copied and a
    ``model_index.json``, so ``StableDiffusion3Pipeline.from_pretrained`` loads it (absent text encoders
    passed as None).  A complete text-to-image UNet pipeline folder: :func:`rectflow.perflow.latent.export_pipeline`."""
    folder, teacher_folder = Path(folder), Path(teacher_folder)
    sched_path = _find(teacher_folder, "scheduler", "scheduler_config.json")
    if sched_path is None:
        raise ConfigError(f"diffusers folder {str(teacher_folder)!r} has no scheduler/scheduler_config.json")
    teacher_cfg = load_json(sched_path)
    with staged_export(folder) as stage:
        meta = write_student_parts(student, stage, teacher_cfg, stock_scheduler=stock_scheduler)
        if meta["model"] == "transformer" and (teacher_folder / "model_index.json").is_file():
            stock = stock_scheduler_config(teacher_cfg, student.boundaries)
            _write_transformer_pipeline_index(stage, teacher_folder, stock_scheduler=stock_scheduler, stock_class=stock[1]["_class_name"] if stock else None)
    return folder


def verify_export_files(folder: Path, meta: dict[str, Any]) -> None:
    """CheckpointError naming the file when a weights file of an export no longer has the sha256 its ``perflow.json`` recorded
    (exports written before the record have none to check)."""
    for rel, digest in (meta.get("files_sha256") or {}).items():
        path = folder / rel
        if not path.is_file():
            raise CheckpointError(f"{path}: missing (the export's perflow.json lists it)")
        if sha256_file(path) != digest:
            raise CheckpointError(f"{path}: checksum mismatch: the file was changed or corrupted after the export was written")


def load_student(folder: str | Path, *, dtype: torch.dtype = torch.float32) -> PeRFlowStudent:
    """Our loader for an :func:`export_student` or :func:`~rectflow.perflow.latent.export_pipeline` folder
    (whether or not a stock scheduler is exact): the student on its windows, with the teacher's
    schedule and parameterisation (a ``UNet2DConditionModel`` gets :class:`TextUNetAdapter`, an
    ``SD3Transformer2DModel`` :class:`SD3TransformerAdapter`)."""
    folder = Path(folder)
    meta_path = folder / "perflow.json"
    if not meta_path.is_file():
        raise ConfigError(f"{str(folder)!r} has no perflow.json (not a PeRFlow export)")
    has_unet, has_tr = (folder / "unet" / "config.json").is_file(), (folder / "transformer" / "config.json").is_file()
    if not has_unet and not has_tr:
        raise ConfigError(f"{str(folder)!r} has neither unet/config.json nor transformer/config.json")
    meta = load_json(meta_path)
    verify_export_files(folder, meta)
    schedule, kind = schedule_from_config(meta["teacher_scheduler"], allow_flow=True)
    windows = torch.tensor(meta["windows"], dtype=torch.float64)
    if meta.get("model") == "transformer" or not has_unet:
        net = _load_transformer(folder / "transformer", schedule, dtype)
        return PeRFlowStudent(net, schedule, windows, kind, time_map=schedule.t_to_timestep)
    cls = load_json(folder / "unet" / "config.json").get("_class_name", "UNet2DModel")
    if cls not in ("UNet2DModel", "UNet2DConditionModel"):
        raise ConfigError(f"{folder / 'unet' / 'config.json'}: _class_name {cls!r} is not a UNet2DModel or UNet2DConditionModel")
    unet = load_diffusers_model(cls, folder / "unet", dtype=dtype, what="UNet")
    vae_cfg = load_json(folder / "vae" / "config.json") if (folder / "vae" / "config.json").is_file() else {}
    factor = 2 ** (len(vae_cfg.get("block_out_channels", [0] * 4)) - 1)  # without a VAE: 8, diffusers' own default
    return PeRFlowStudent(adapt_unet(unet, factor), schedule, windows, kind, time_map=schedule.t_to_timestep)
