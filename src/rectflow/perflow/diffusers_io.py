"""diffusers in and out for PeRFlow: loading a teacher, exporting and loading a student (optional extra: ``pip install rectflow[perflow]``).

The network adapters are in :mod:`rectflow.perflow.adapters`, the scheduler-config translation in
:mod:`rectflow.perflow.scheduler_config`.

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

import os
import shutil
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from torch import nn

from rectflow.diffusion.schedules import DiscreteFlowMatchingSchedule
from rectflow.engine.io import check_writable, load_json, make_dirs, save_json, sha256_file
from rectflow.errors import CheckpointError, ConfigError
from rectflow.flow.guidance import NULL_LABEL
from rectflow.perflow.adapters import TRANSFORMERS, UNetAdapter, adapt_unet, diffusers_module, unwrap_unet
from rectflow.perflow.guidance_modes import Guidance
from rectflow.perflow.scheduler_config import (
    FLOW_SCHEDULERS,
    PERFLOW_SCHEDULER_ENTRY,
    cfg_is_flow,
    perflow_scheduler_config,
    save_perflow_scheduler,
    schedule_from_config,
    schedule_from_file,
    stock_scheduler_config,
)
from rectflow.perflow.student import PeRFlowStudent
from rectflow.perflow.teacher import Teacher

__all__ = ["export_student", "load_diffusers_model", "load_student", "load_teacher", "staged_export", "verify_export_files", "write_student_parts"]


def _subfolder(net: nn.Module) -> str:
    """Where a diffusers model goes in a pipeline folder: ``transformer`` or ``unet``."""
    return "transformer" if type(net).__name__ in TRANSFORMERS else "unet"




def load_diffusers_model(cls_name: str, folder: Path, *, dtype: torch.dtype = torch.float32, what: str = "model") -> nn.Module:
    """``diffusers.<cls_name>.from_pretrained(folder)`` from a local folder, in eval mode; a corrupt config or
    unreadable weights are one line naming the file (:class:`CheckpointError`)."""
    load_json(folder / "config.json")  # a corrupt config is named here; diffusers would only say "not a valid JSON file"
    cls = getattr(diffusers_module(), cls_name, None)
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
    if cls not in TRANSFORMERS:
        raise ConfigError(f"{cfg_path}: _class_name {cls!r} is not a supported transformer ({', '.join(sorted(TRANSFORMERS))})")
    if not isinstance(schedule, DiscreteFlowMatchingSchedule):
        raise ConfigError(f"{cfg_path.parent}: a {cls} needs a flow-matching scheduler config ({', '.join(sorted(FLOW_SCHEDULERS))}), "
                          f"got the affine path {schedule!r}")
    return TRANSFORMERS[cls](load_diffusers_model(cls, folder, dtype=dtype, what="transformer"))


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
