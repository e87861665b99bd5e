"""PeRFlow as a resumable job: teacher in, student directory out (the API under ``rectflow perflow``).

A teacher is a rectflow run directory (a flow from N(0, I) to images; a velocity on the
straight path, theory §2.1), a LOCAL diffusers folder (``unet/`` + ``scheduler/``; see
:mod:`rectflow.perflow.diffusers_io`), or a LOCAL latent text-to-image pipeline folder
(``model_index.json`` + ``text_encoder/``, Stable Diffusion 1.x / 2.x or SDXL; see :mod:`rectflow.perflow.latent`)
trained on a folder of captioned images.  A class-conditional run (``model.num_classes`` > 0) is a
conditional teacher: the student learns on the run's labelled images (or ``data`` with labels) and
classifier-free guidance is used as :class:`PeRFlowSettings` says (theory §5.5).  :func:`train_perflow` writes into its output directory:

    perflow.json           settings, teacher (path + kind), windows, teacher NFE spent
    checkpoints/           Trainer checkpoints (safetensors; the job resumes from the newest)
    metrics.jsonl          loss / lr / ms per step
    student.safetensors    the student's (EMA) network weights
    delta.safetensors      student - teacher weights (apply to another model derived from the teacher)
    samples.png            a grid of K-step samples
    diffusers/             (diffusers teachers, ``export=True``) a diffusers folder of the student

A text-to-image pipeline job writes instead of ``student.safetensors``:

    latents/               the latent cache of the captioned images (built once, resumed after a kill)
    diffusers/             the student as a complete pipeline folder (StableDiffusion[XL]Pipeline.from_pretrained)
    delta.safetensors      student - teacher UNet weights (diffusers parameter names)
    lora/                  the delta as a LoRA (``pipe.load_lora_weights``), unless ``lora_rank=0``
    samples.png            K-step samples, one row per prompt

:func:`load_perflow` reads it back as a :class:`PeRFlowJob`.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import Tensor

from rectflow.data.image_sets import ImageGaussian, to_uint8
from rectflow.diffusion.specs import sample
from rectflow.engine.hardware import resolve_device, resolve_precision
from rectflow.engine.io import atomic_path, check_writable, load_json, load_tensors, make_dirs, save_json, save_tensors
from rectflow.engine.trainer import TrainConfig, Trainer
from rectflow.errors import CheckpointError, ConfigError, check_int
from rectflow.flow.guidance import guidance_nfe, map_condition
from rectflow.flow.paths import LinearPath
from rectflow.images.generate import save_image_grid
from rectflow.perflow.adapters import unwrap_unet
from rectflow.perflow.delta import save_delta
from rectflow.perflow.diffusers_io import export_student, load_teacher, verify_export_files
from rectflow.perflow.guidance_modes import LabelledData, as_guidance, guidance_plan
from rectflow.perflow.latent import LatentPipeline, export_pipeline, load_pipeline
from rectflow.perflow.latent_cache import LatentCacheData, build_latent_cache, check_caption_lengths, read_captions
from rectflow.perflow.lora import apply_lora, save_lora
from rectflow.perflow.model_card import write_model_card
from rectflow.perflow.objective import LOSS_SPACES, PeRFlowObjective
from rectflow.perflow.official import save_official_delta
from rectflow.perflow.student import PeRFlowStudent
from rectflow.perflow.teacher import Teacher
from rectflow.perflow.windows import make_windows
from rectflow.runs.experiment import load_run
from rectflow.runs.rundir import open_job, semantic_train

__all__ = [
    "LatentDataOptions",
    "PeRFlowJob",
    "PeRFlowSettings",
    "ExportOptions",
    "exported_windows",
    "lora_gap",
    "is_latent_pipeline",
    "is_pipeline_job",
    "load_perflow",
    "load_perflow_teacher",
    "sample_exported_pipeline",
    "sample_pipeline_latents",
    "train_perflow",
]

PERFLOW_JOB_FORMAT = "rectflow.perflow.job"


@dataclass
class PeRFlowSettings:
    """What defines a PeRFlow student (a resumed job must agree on all of it)."""

    windows: int = 4  # K: number of time windows = sampling steps
    spacing: str = "time"  # time | log_snr | teacher (the teacher scheduler's own K-step grid: SD3's shifted one): the window boundaries
    solver_steps: int = 24  # teacher DDIM steps across one window (teacher NFE per training example; 24 beat 12 on digits, perflow_levers.md)
    loss_space: str = "x0"  # native (the teacher's output kind on the window path) | velocity | x0 | eps | v
    start_fraction: float = 0.8  # share of training points at window starts (0 = the paper's uniform t), see PeRFlowObjective
    # (defaults: the best of benchmarks/results/perflow_study.md and perflow_levers.md)
    # Conditional teachers only (class labels, or text for a pipeline; theory §5.5); recorded for them, left out of unconditional jobs' records:
    guidance: float = 1.0  # classifier-free guidance scale w
    p_uncond: float = 0.0  # condition dropout of the student's training (keeps its unconditional branch for CFG)
    guidance_mode: str = "teacher"  # teacher: w in the teacher's window solve, student sampled at w = 1 (K NFE) | student: teacher at w = 1, student sampled with CFG at w (2K NFE)

    def validate(self) -> None:
        if self.windows < 1:
            raise ConfigError(f"perflow: windows must be >= 1, got {self.windows}")
        if self.solver_steps < 1:
            raise ConfigError(f"perflow: solver_steps must be >= 1, got {self.solver_steps}")
        if self.spacing not in ("time", "log_snr", "teacher"):
            raise ConfigError(f"perflow: spacing must be 'time', 'log_snr' or 'teacher', got {self.spacing!r}")
        if self.loss_space not in LOSS_SPACES:
            raise ConfigError(f"perflow: loss_space must be one of {list(LOSS_SPACES)}, got {self.loss_space!r}")
        if not 0.0 <= self.start_fraction <= 1.0:
            raise ConfigError(f"perflow: start_fraction must lie in [0, 1], got {self.start_fraction}")
        guidance_plan(self.guidance_mode, self.guidance, self.p_uncond)

    @property
    def guided(self) -> bool:
        """Whether any guidance key differs from the unconditional default."""
        return (self.guidance, self.p_uncond, self.guidance_mode) != (1.0, 0.0, "teacher")

    def scales(self) -> tuple[float, float]:
        """(the teacher's guidance scale in the window solve, the student's at sampling)."""
        return guidance_plan(self.guidance_mode, self.guidance, self.p_uncond)


GUIDANCE_KEYS = ("guidance", "p_uncond", "guidance_mode")


@dataclass
class LatentDataOptions:
    """How a folder of captioned images becomes the latent cache of a text-to-image job
    (:func:`~rectflow.perflow.latent_cache.build_latent_cache`).  Recorded under ``data`` in
    ``perflow.json``: a resumed job must agree on all of it."""

    caption_column: str = "text"  # metadata.jsonl key of the captions (without metadata.jsonl: a .txt beside each image)
    latent_mode: str = "mean"  # mean: the VAE posterior mean | sample: one seeded posterior draw per image
    dtype: str = "float32"  # stored dtype: float32 | float16 | bfloat16
    shard_size: int = 256  # images per cache shard (the unit in which a killed build resumes)
    encode_batch: int = 8  # images per VAE / text-encoder call
    seed: int = 0  # seed of the posterior draws (latent_mode "sample")

    def validate(self) -> None:
        """The checks of ``build_latent_cache``, made before anything is written."""
        for key in ("shard_size", "encode_batch", "seed"):
            v, low = getattr(self, key), 0 if key == "seed" else 1
            check_int(v, f"perflow latent cache: {key}", low)
        if self.latent_mode not in ("mean", "sample"):
            raise ConfigError(f"perflow latent cache: latent_mode must be 'mean' or 'sample', got {self.latent_mode!r}")
        if self.dtype not in ("float32", "float16", "bfloat16"):
            raise ConfigError(f"perflow latent cache: dtype must be float32, float16 or bfloat16, got {self.dtype!r}")
        if not isinstance(self.caption_column, str) or not self.caption_column:
            raise ConfigError(f"perflow latent cache: caption_column must be a non-empty string, got {self.caption_column!r}")


DEFAULT_LORA_RANK = 16  # text-to-image jobs: rank of the LoRA written beside the full delta (0: none)


@dataclass
class ExportOptions:
    """How a finished job writes its exports (not part of the job: a rerun of a finished job exports again).

    stock_scheduler: ``diffusers/`` names the stock scheduler that is exact at K steps in ``model_index.json`` (no custom code
        to trust; other step counts sample wrong) and keeps ours in ``scheduler_perflow/``; refused when none is exact.
    lora_bias: the LoRA also carries the bias changes (peft's ``lora_bias``; exact for biases, but ``fuse_lora`` then fails
        on layers without one).
    command: the command line that made the job, quoted in the model cards.
    """

    stock_scheduler: bool = False
    lora_bias: bool = False
    command: str | None = None
DEFAULT_PROMPTS = 4  # text-to-image jobs: the sample grid's prompts default to this many first distinct captions
PIPELINE_JOB_KIND = "pipeline"


def _is_diffusers_folder(p: Path) -> bool:
    return (p / "scheduler" / "scheduler_config.json").is_file() or (p / "scheduler_config.json").is_file()


def is_latent_pipeline(path: str | Path) -> bool:
    """Whether ``path`` is a latent text-to-image pipeline folder (``model_index.json`` and ``text_encoder/``, or
    an SDXL refiner's ``text_encoder_2/``; SD 1.x / 2.x, SDXL or SD3) rather than a pixel-space diffusers folder, a
    transformer folder without text encoders (precomputed conditions, Python only) or a rectflow run.  Whether
    it is a supported one, :func:`~rectflow.perflow.latent.load_pipeline` says."""
    p = Path(path)
    return (p / "model_index.json").is_file() and ((p / "text_encoder").is_dir() or (p / "text_encoder_2").is_dir())


def is_pipeline_job(path: str | Path) -> bool:
    """Whether ``path`` is a :func:`train_perflow` directory of a text-to-image pipeline teacher."""
    job = Path(path) / "perflow.json"
    if not job.is_file():
        return False
    try:
        rec = load_json(job)
    except CheckpointError:
        return False
    return isinstance(rec, dict) and rec.get("format") == PERFLOW_JOB_FORMAT and (rec.get("teacher") or {}).get("kind") == PIPELINE_JOB_KIND


# The student's training defaults measured on digits (benchmarks/results/perflow_study.md: lr 2e-4 -> 1e-3
# took K = 4 FD from 5.6 to 3.6); the CLI reads them from here.
DEFAULT_STEPS, DEFAULT_BATCH, DEFAULT_LR = 3000, 128, 1e-3
# Text-to-image pipelines (a full UNet fine-tune): the usual fine-tuning batch and learning rate, NOT measured here.
DEFAULT_PIPELINE_BATCH, DEFAULT_PIPELINE_LR = 16, 1e-5


def default_train_config(steps: int = DEFAULT_STEPS) -> TrainConfig:
    """Trainer settings of a PeRFlow student: lr 1e-3, batch 128, cosine after min(100, steps/10) warmup steps."""
    return TrainConfig(steps=steps, batch_size=DEFAULT_BATCH, lr=DEFAULT_LR, warmup_steps=min(100, steps // 10), lr_schedule="cosine")


def load_perflow_teacher(path: str | Path, device: str = "cpu") -> tuple[Teacher, Any | None, dict[str, Any]]:
    """(teacher, its data sampler or None, description) from a run directory, a diffusers folder or a
    latent text-to-image pipeline folder.

    A run's data are its target images (labelled for a class-conditional run, whose description
    then has ``num_classes``); a diffusers or pipeline folder has none (give ``data`` to
    :func:`train_perflow`).  A pipeline's teacher is text-conditional (``cond``: text embeddings)."""
    teacher, data, desc, _ = _load_teacher(path, device)
    return teacher, data, desc


def _load_teacher(path: str | Path, device: str) -> tuple[Teacher, Any | None, dict[str, Any], LatentPipeline | None]:
    """:func:`load_perflow_teacher` plus the :class:`LatentPipeline` of a pipeline folder (else None)."""
    p = Path(path)
    if not p.is_dir():
        raise ConfigError(f"perflow teacher {str(p)!r}: no such directory (a rectflow run or a local diffusers folder)")
    if is_latent_pipeline(p):
        pipe = load_pipeline(p, device=resolve_device(device))
        desc = {"kind": PIPELINE_JOB_KIND, "path": str(p.resolve()), "parameterization": pipe.parameterization, "condition": "text"}
        return pipe.teacher, None, desc, pipe
    if _is_diffusers_folder(p):
        if (p / "transformer").is_dir():
            raise ConfigError(f"{p}: a transformer folder without its text encoders (text_encoder/, tokenizer/, text_encoder_2/, tokenizer_2/) "
                              "takes precomputed text conditions, which the job cannot cache; add the encoders or train it from Python "
                              "(perflow.load_teacher, PeRFlowObjective)")
        teacher = load_teacher(p)
        teacher.model.to(resolve_device(device))
        return teacher, None, {"kind": "diffusers", "path": str(p.resolve()), "parameterization": teacher.parameterization}, None
    if not (p / "config.json").is_file():
        raise ConfigError(f"perflow teacher {str(p)!r}: neither a rectflow run (config.json) nor a diffusers folder (scheduler/scheduler_config.json)")

    run = load_run(p, device=device)
    if run.config.reflow.distill:
        raise ConfigError(f"{p} is a one-step distillation run, not a flow; give a k-RF run")
    if not isinstance(run.source, ImageGaussian):
        raise ConfigError(f"{p}: PeRFlow needs a flow from Gaussian noise to images (source is {run.config.source!r})")
    # A rectflow run is a velocity on the straight path X_t = t X1 + (1 - t) X0 (theory §2.1).
    teacher = Teacher(run.model, LinearPath(), "velocity")
    desc = {"kind": "run", "path": str(p.resolve()), "checkpoint": str(run.checkpoint), "step": run.step, "parameterization": "velocity"}
    n_classes = int(run.config.model.num_classes)
    if n_classes > 0:  # only then: records of unconditional jobs stay as they were
        desc["num_classes"] = n_classes
    return teacher, run.target, desc, None  # lazy: loading a job to sample never opens the images


def _job_record(settings: PeRFlowSettings, train: TrainConfig, teacher: dict[str, Any], data: Any, boundaries: Tensor, shape: tuple[int, ...]) -> dict[str, Any]:
    kept = asdict(settings)
    if not (teacher.get("num_classes") or teacher.get("kind") == PIPELINE_JOB_KIND):  # unconditional: the guidance keys are at their defaults and left out (records of earlier jobs match)
        kept = {k: v for k, v in kept.items() if k not in GUIDANCE_KEYS}
    return json.loads(json.dumps({  # JSON round trip: compared with the record read back on resumption
        "format": PERFLOW_JOB_FORMAT,
        "settings": kept,
        "train": semantic_train(asdict(train)),
        "teacher": teacher,
        "data": data,
        "windows": [float(v) for v in boundaries],
        "shape": list(shape),
    }))


def train_perflow(
    teacher_path: str | Path,
    out: str | Path,
    *,
    settings: PeRFlowSettings | None = None,
    train: TrainConfig | None = None,
    data: Any | None = None,
    data_name: str | None = None,
    export: bool = False,
    latent: LatentDataOptions | None = None,
    lora_rank: int | None = None,
    prompts: Sequence[str] | None = None,
    samples_per_prompt: int = 4,
    export_options: ExportOptions | None = None,
) -> Path:
    """Train (or resume) a PeRFlow student of the teacher at ``teacher_path`` into ``out``.

    Args:
        settings: windows, spacing, window solver steps, and for a conditional (class or text) teacher the
            guidance scale, condition dropout and guidance mode (:class:`PeRFlowSettings`).
        train: the Trainer settings (steps, batch, lr, EMA, device, seed...); default
            :func:`default_train_config`.
        data: a sampler of real images in [-1, 1] (``sample(n, generator=, device=)``); default the
            run's target images.  Required for diffusers teachers.  A class-conditional teacher
            needs labelled images (``sample_labelled``, e.g. digits or class folders).
        data_name: how ``data`` is named in ``perflow.json`` (compared on resumption).
        export: for diffusers teachers, also write ``out/diffusers`` (a diffusers folder).
        export_options: how the exports are written (:class:`ExportOptions`).

    Latent text-to-image pipeline teachers (:func:`is_latent_pipeline`) take instead:
        data: the folder of captioned images (``metadata.jsonl`` or a ``.txt`` per image), encoded
            once into ``out/latents`` (a killed build resumes; training reads the cache only).
        latent: how the cache is made (:class:`LatentDataOptions`).
        lora_rank: rank of the LoRA written to ``out/lora`` (default 16; 0: none).
        prompts: the prompts of ``samples.png`` (default: the first 4 distinct captions), each
            sampled ``samples_per_prompt`` times in K steps (with guidance in mode "student").
    and always write ``out/diffusers`` (a complete pipeline folder), ``delta.safetensors`` (UNet
    parameter names) and ``samples.png``.
    A directory holding a job of other settings, teacher or data is refused; nothing is overwritten.
    """
    settings = settings or PeRFlowSettings()
    settings.validate()
    train = train or default_train_config()
    train.validate()
    out = Path(out)
    train = _resolved_precision(train, out)
    if Path(teacher_path).is_dir() and is_latent_pipeline(teacher_path):
        return _train_pipeline_job(Path(teacher_path), out, settings, train, data, latent or LatentDataOptions(), lora_rank, prompts, samples_per_prompt,
                                   export_options or ExportOptions())
    extras = [name for name, v in (("latent", latent), ("lora_rank", lora_rank), ("prompts", prompts)) if v is not None]
    if extras:
        raise ConfigError(f"perflow: {', '.join(extras)} apply to a text-to-image pipeline teacher (model_index.json and text_encoder/); "
                          f"{teacher_path} is not one")
    device = resolve_device(train.device)
    teacher, run_data, desc = load_perflow_teacher(teacher_path, str(device))
    conditional = bool(desc.get("num_classes"))
    if not conditional and settings.guided:
        raise ConfigError(f"perflow: guidance, p_uncond and guidance_mode need a class-conditional teacher; {teacher_path} is unconditional")
    if data is None:
        if run_data is None:
            raise ConfigError("perflow: a diffusers teacher needs real training images (give data, e.g. --data PATH)")
        data, data_name = run_data, data_name or "run target"
    if conditional and not isinstance(data, LabelledData):
        data = LabelledData(data)  # sample(n) -> (images, labels)
    teacher_w, _ = settings.scales()
    teacher.guidance = as_guidance(teacher_w) if conditional and teacher_w != 1.0 else None
    boundaries = make_windows(settings.windows, spacing=settings.spacing, path=teacher.path)
    first = data.sample(1, generator=torch.Generator().manual_seed(0))
    shape = tuple((first[0] if isinstance(first, tuple) else first).shape[1:])
    record = _older_job_compatible(_job_record(settings, train, desc, data_name or type(data).__name__, boundaries, shape), out)
    job = out / "perflow.json"
    keys = ("format", "settings", "train", "teacher", "data", "windows", "shape")
    with open_job(out, "perflow.json", record, what="PeRFlow job", normalise=lambda d: {k: d.get(k) for k in keys}, foreign_ok=False,
                  temporaries=("checkpoints", "diffusers")):
        student = PeRFlowStudent.from_teacher(teacher, boundaries)
        objective = PeRFlowObjective(_solving(teacher, train), data, boundaries, solver_steps=settings.solver_steps, loss_space=settings.loss_space,
                                     start_fraction=settings.start_fraction, p_uncond=settings.p_uncond if conditional else 0.0)
        make_dirs(out)
        save_json(job, record)
        mcfg = {"perflow": record["settings"], "teacher": desc["path"], "windows": record["windows"]}
        trainer = Trainer(student, objective, train, out, model_config=mcfg, run_record={k: record[k] for k in keys}).fit(resume=True)
        final = trainer.eval_model
        save_tensors(out / "student.safetensors", {k: v.detach().cpu().contiguous() for k, v in final.net.state_dict().items()},
                     {"format": "rectflow.perflow.student", "job": json.dumps(record)})
        if isinstance(teacher.model, torch.nn.Module):
            save_delta(out / "delta.safetensors", final.net, teacher.model, boundaries, {"teacher": desc["path"]})
        record["teacher_nfe_per_example"] = settings.solver_steps * (teacher.nfe_per_eval if conditional else 1)
        record["teacher_nfe_this_session"] = objective.teacher_nfe
        record["steps_done"] = trainer.step
        save_json(job, record)
        save_image_grid(PeRFlowJob(final, shape, record).sample(64), out / "samples.png", scale=max(1, 64 // shape[-1]))  # conditional: classes in turn
        if export and desc["kind"] == "diffusers":
            export_student(final, out / "diffusers", teacher_path, stock_scheduler=(export_options or ExportOptions()).stock_scheduler)
    return out


def _older_job_compatible(record: dict[str, Any], out: Path) -> dict[str, Any]:
    """``record`` as a job made before ``train.steps`` defined a cosine job recorded it (rectflow 0.2.0 left it out): such a
    job resumes with its own, unrecorded, step count unchecked, as it did then."""
    old = load_json(out / "perflow.json") if (out / "perflow.json").is_file() else None
    if isinstance(old, dict) and isinstance(old.get("train"), dict) and "steps" not in old["train"] and "steps" in record["train"]:
        record = {**record, "train": {k: v for k, v in record["train"].items() if k != "steps"}}
    return record


def _resolved_precision(train: TrainConfig, out: Path) -> TrainConfig:
    """``precision="auto"`` made concrete once: the precision a job in ``out`` recorded, else bf16 where it is native on the
    device (:func:`~rectflow.engine.hardware.resolve_precision`); so a resumed job computes as it started."""
    if train.precision != "auto":
        return train
    old = load_json(out / "perflow.json") if (out / "perflow.json").is_file() else None
    recorded = old.get("train", {}).get("precision") if isinstance(old, dict) and isinstance(old.get("train"), dict) else None
    return replace(train, precision=recorded if recorded in ("fp32", "bf16") else resolve_precision("auto", resolve_device(train.device)))


def _solving(teacher: Teacher, train: TrainConfig) -> Teacher:
    """The teacher of the window solves: compiled with the student when ``train.compile`` is set (the
    solve is most of a training step); the plain teacher stays the student's start and the delta's base."""
    return teacher.compiled() if train.compile else teacher


_JOB_KEYS = ("format", "settings", "train", "teacher", "data", "windows", "shape")


def _train_pipeline_job(folder: Path, out: Path, settings: PeRFlowSettings, train: TrainConfig, data: Any, opts: LatentDataOptions,
                        lora_rank: int | None, prompts: Sequence[str] | None, per_prompt: int, exp: ExportOptions) -> Path:
    """:func:`train_perflow` for a latent text-to-image pipeline teacher (see there)."""
    opts.validate()
    rank = DEFAULT_LORA_RANK if lora_rank is None else lora_rank
    check_int(rank, "perflow: lora_rank", 0, note=" (0: no LoRA)")
    check_int(per_prompt, "perflow: samples_per_prompt")
    if not isinstance(data, (str, Path)):
        raise ConfigError(f"perflow: the text-to-image pipeline {folder} needs a folder of captioned images as data "
                          "(--data PATH: a metadata.jsonl with file_name and text, or a .txt beside each image)")
    images = Path(data)
    items = read_captions(images, caption_column=opts.caption_column)  # no captions: refused before anything is loaded or written
    if prompts is None:
        prompts = list(dict.fromkeys(text for _, text in items))[:DEFAULT_PROMPTS]
    elif isinstance(prompts, str) or not all(isinstance(q, str) for q in prompts) or not prompts:
        raise ConfigError(f"perflow: prompts must be a non-empty list of strings, got {prompts!r}")
    prompts = list(prompts)
    teacher, _, desc, pipe = _load_teacher(folder, str(resolve_device(train.device)))
    check_caption_lengths(pipe, images, items)  # too long for the tokenizer: refused before anything is written
    pipe.check_prompts(prompts)
    boundaries = make_windows(settings.windows, spacing=settings.spacing, path=teacher.path)
    record = _older_job_compatible(_job_record(settings, train, desc, {"images": str(images.resolve()), **asdict(opts)}, boundaries, pipe.latent_shape), out)
    job = out / "perflow.json"

    def normalise(d: dict[str, Any]) -> dict[str, Any]:
        return {k: d.get(k) for k in _JOB_KEYS}

    with open_job(out, "perflow.json", record, what="PeRFlow job", normalise=normalise, foreign_ok=False, temporaries=("checkpoints", "lora")):
        make_dirs(out)
        save_json(job, record)  # before the cache: a kill during the build leaves this job's directory, which resumes
        try:
            cache = build_latent_cache(pipe, images, out / "latents", shard_size=opts.shard_size, encode_batch=opts.encode_batch, dtype=opts.dtype,
                                       latent_mode=opts.latent_mode, seed=opts.seed, caption_column=opts.caption_column, progress=train.progress)
        except ConfigError as e:  # the cache is the job's own: say what changed and what to do, not which directory to pick
            if "with other settings" not in str(e):
                raise
            raise ConfigError(f"PeRFlow job {out}: its latent cache no longer matches the data ({e}); the images or captions in "
                              f"{images} changed since the job cached them: start a new job (another --out)") from None
        data = LatentCacheData(cache, pipeline=pipe)  # training reads latents and text embeddings; the VAE and text encoder stay idle
        teacher_w, student_w = settings.scales()
        teacher.guidance = as_guidance(teacher_w, data.null_cond) if teacher_w != 1.0 else None
        student = pipe.student(boundaries)
        objective = PeRFlowObjective(_solving(teacher, train), data, boundaries, solver_steps=settings.solver_steps, loss_space=settings.loss_space,
                                     start_fraction=settings.start_fraction, p_uncond=settings.p_uncond, null_cond=data.null_cond)
        record["cache"] = {"path": str(cache.path.resolve()), "settings": cache.settings.to_dict()}
        save_json(job, record)
        mcfg = {"perflow": record["settings"], "teacher": desc["path"], "windows": record["windows"]}
        trainer = Trainer(student, objective, train, out, model_config=mcfg, run_record=normalise(record)).fit(resume=True)
        final = trainer.eval_model

        # the student's guidance (the default of `rectflow sample`) goes in before the folder is renamed into place
        export_pipeline(final, pipe, out / "diffusers", stock_scheduler=exp.stock_scheduler,
                        extra={"guidance_scale": student_w, "guidance_mode": settings.guidance_mode})
        net = unwrap_unet(final.net)
        save_delta(out / "delta.safetensors", net, pipe.denoiser, boundaries, {"teacher": desc["path"]})
        lora = None
        if rank > 0:
            lora = save_lora(out / "lora", net, pipe.denoiser, rank=rank, bias=exp.lora_bias, boundaries=boundaries, metadata={"teacher": desc["path"]},
                             prefix="transformer" if pipe.is_sd3 else "unet").to_dict()
            lora.update(lora_gap(final, pipe, out / "lora", prompts, guidance=student_w))
        elif (out / "lora").is_dir():
            shutil.rmtree(out / "lora")  # a LoRA of an earlier run of this job would no longer match the student
        official = _export_official(final, pipe, out / "official", boundaries, desc["path"])
        _write_cards(out, pipe, boundaries, student_w, exp.command, steps=trainer.step, lora=lora, official=official,
                     stock=exp.stock_scheduler, prompt=prompts[0])
        rows = [q for q in prompts for _ in range(per_prompt)]
        noise = torch.randn((len(rows), *pipe.latent_shape), generator=torch.Generator().manual_seed(0))
        grid = _decode_in_batches(final, pipe, rows, noise, steps=None, guidance=student_w, batch_size=8)
        save_image_grid(grid, out / "samples.png", nrow=per_prompt, scale=max(1, 64 // grid.shape[-1]))
        record.update(teacher_nfe_per_example=settings.solver_steps * teacher.nfe_per_eval, teacher_nfe_this_session=objective.teacher_nfe,
                      steps_done=trainer.step, prompts=prompts, lora=lora, official=official,
                      outputs={"pipeline": "diffusers", "delta": "delta.safetensors", "lora": "lora" if lora else None,
                               "official": "official" if official.get("written") else None, "samples": "samples.png"})
        save_json(job, record)  # last: its steps_done marks a finished job
    return out


@torch.no_grad()
def lora_gap(student: PeRFlowStudent, pipe: LatentPipeline, lora: Path, prompts: Sequence[str], *, guidance: float = 1.0, n: int = 4,
             seed: int = 1234) -> dict[str, float]:
    """How far the LoRA is from the full delta on a fixed batch (``n`` noises from ``seed``, the prompts in turn), sampled
    in K steps: ``lora_gap`` = |z_lora - z_full| / |z_full| and ``lora_missed_share`` = |z_lora - z_full| / |z_base - z_full|,
    with z_base the teacher's weights on the same windows (1: the LoRA helps no more than no delta; 0: exact)."""
    rows = [prompts[i % len(prompts)] for i in range(n)]
    noise = torch.randn((n, *pipe.latent_shape), generator=torch.Generator().manual_seed(seed))
    full = sample_pipeline_latents(student, pipe, rows, noise, guidance=guidance)
    other = pipe.student(student.boundaries).eval().to(next(student.parameters()).device)
    base = sample_pipeline_latents(other, pipe, rows, noise, guidance=guidance)
    apply_lora(unwrap_unet(other.net), lora)
    with_lora = sample_pipeline_latents(other, pipe, rows, noise, guidance=guidance)
    miss = float((with_lora - full).norm())
    return {"lora_gap": miss / max(float(full.norm()), 1e-12), "lora_missed_share": miss / max(float((base - full).norm()), 1e-12)}


def _export_official(student: PeRFlowStudent, pipe: LatentPipeline, folder: Path, boundaries: Tensor, teacher: str) -> dict[str, Any]:
    """``folder``: the delta in the official repository's format, where it applies (an eps UNet teacher, uniform
    windows); otherwise the reason, recorded in perflow.json."""
    try:
        save_official_delta(folder, unwrap_unet(student.net), pipe.denoiser, pipe.scheduler_config, boundaries, pipe.parameterization,
                            metadata={"teacher": teacher})
    except ConfigError as e:
        if folder.is_dir():
            shutil.rmtree(folder)  # an earlier export of this job would no longer match the student
        return {"written": False, "why": str(e)}
    return {"written": True}


def _write_cards(out: Path, pipe: LatentPipeline, boundaries: Tensor, guidance: float, command: str | None, *, steps: int,
                 lora: dict[str, Any] | None, official: dict[str, Any], stock: bool, prompt: str) -> None:
    """Model cards of the job's exports, with the command and what was measured."""
    k, base = boundaries.numel() - 1, pipe.folder.name
    measured = {"training steps": steps, "windows K": k}
    pipeline_class = pipe.model_index.get("_class_name")
    stock_cls = None
    if stock:
        stock_cls = load_json(out / "diffusers" / "model_index.json")["scheduler"][1]
    write_model_card(out / "diffusers", "pipeline", base_model=base, windows=k, pipeline=pipeline_class, guidance=guidance, command=command,
                     measured=measured, stock_scheduler=stock_cls, prompt=prompt, name=f"{out.name}/diffusers")
    if lora is not None:
        write_model_card(out / "lora", "lora", base_model=base, windows=k, pipeline=pipeline_class, guidance=guidance, command=command, prompt=prompt,
                         name=f"{out.name}/lora", pipeline_folder=f"{out.name}/diffusers",
                         measured={**measured, "LoRA rank": lora.get("rank"), "LoRA vs full delta, K-step latents |dz|/|z|": lora["lora_gap"],
                                   "share of the delta's effect the LoRA misses": lora["lora_missed_share"]})
    if official.get("written"):
        write_model_card(out / "official", "official", base_model=base, windows=k, pipeline=pipeline_class, command=command, measured=measured,
                         name=f"{out.name}/official")


def sample_pipeline_latents(student: PeRFlowStudent, pipe: LatentPipeline, prompts: Sequence[str], noise: Tensor, *, steps: int | None = None,
                            guidance: float = 1.0) -> Tensor:
    """Latents (n, C, h, w) of a text-to-image PeRFlow student from ``noise`` (n, C, h, w), one prompt per row:
    Euler on the window path in ``steps`` steps (default K; any steps >= K, spread over the windows as
    :class:`~rectflow.perflow.diffusers_scheduler.PeRFlowScheduler` spreads them), with classifier-free
    guidance at ``guidance`` against the empty prompt (2 network evaluations per step when it is not 1).
    The stock ``StableDiffusionPipeline`` (SDXL: ``StableDiffusionXLPipeline``) on the exported folder computes the same."""
    prompts = list(prompts)
    if len(prompts) != noise.shape[0]:
        raise ConfigError(f"perflow: give one prompt per sample ({noise.shape[0]}), got {len(prompts)}")
    n_steps = student.boundaries.numel() - 1 if steps is None else int(steps)  # fewer than K: refused by the spec's grid
    dev = next(student.parameters()).device
    cond, null = (map_condition(lambda c: c.to(dev), c) for c in (pipe.encode_text(prompts), pipe.null_embedding()))  # SDXL: (hidden, pooled) pairs
    return sample(student, noise.to(dev), f"perflow:{n_steps}", cond=cond, guidance=guidance, null_cond=null).x


def _decode_in_batches(student: PeRFlowStudent, pipe: LatentPipeline, prompts: Sequence[str], noise: Tensor, *, steps: int | None,
                       guidance: float, batch_size: int) -> Tensor:
    """Images (n, 3, H, W) in [-1, 1] on the CPU: :func:`sample_pipeline_latents` decoded by the VAE, ``batch_size`` at a time."""
    out = []
    for i in range(0, noise.shape[0], batch_size):
        z = sample_pipeline_latents(student, pipe, prompts[i:i + batch_size], noise[i:i + batch_size], steps=steps, guidance=guidance)
        out.append(pipe.decode_latents(z).float().clamp(-1, 1).cpu())
    return torch.cat(out)


def exported_windows(folder: str | Path) -> int:
    """K of an exported PeRFlow pipeline folder (or of a pipeline job directory: its ``diffusers/``)."""
    folder = _exported_folder(folder)
    meta = load_json(folder / "perflow.json")
    windows = meta.get("windows") if isinstance(meta, dict) else None
    if not isinstance(windows, list) or len(windows) < 2:
        raise CheckpointError(f"{folder / 'perflow.json'}: no window boundaries (not a PeRFlow export)")
    return len(windows) - 1


def _exported_folder(folder: str | Path) -> Path:
    folder = Path(folder)
    if is_pipeline_job(folder):
        folder = folder / "diffusers"
    if not (folder / "perflow.json").is_file() or not (folder / "model_index.json").is_file():
        raise ConfigError(f"{folder}: not an exported PeRFlow pipeline folder (needs model_index.json and perflow.json)")
    verify_export_files(folder, load_json(folder / "perflow.json"))  # the student's weights as exported, checksummed
    return folder


def sample_exported_pipeline(folder: str | Path, prompts: Sequence[str], out: str | Path, *, n: int | None = None, steps: int | None = None,
                             guidance: float | None = None, seed: int = 0, batch_size: int = 4, device: str = "auto") -> dict[str, Any]:
    """Sample an exported PeRFlow text-to-image pipeline folder (or a pipeline job directory) into ``out``:
    ``sample_00000.png`` ..., ``grid.png`` and ``samples.json`` (prompt of every file, steps, guidance, seed).

    Args:
        prompts: the prompts, used in turn (sample i has prompt i mod len(prompts)).
        n: number of images (default: one per prompt).
        steps: Euler steps (default K, the number of windows; fewer are refused).
        guidance: classifier-free guidance scale (default: the one the student was trained to sample
            with, 1 unless its guidance mode was "student").
        seed: seed of the initial noise (all n drawn at once: the images do not depend on ``batch_size``).
    Returns:
        the content of ``samples.json``.
    """
    folder = _exported_folder(folder)
    k = exported_windows(folder)
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts or not all(isinstance(q, str) for q in prompts):
        raise ConfigError("perflow sample: give at least one prompt (a string) to sample a text-to-image pipeline")
    steps = k if steps is None else int(steps)
    if steps < k:
        raise ConfigError(f"perflow sample: {steps} steps are fewer than the {k} windows of {folder}; use at least {k}")
    n = len(prompts) if n is None else int(n)
    if n < 1 or batch_size < 1:
        raise ConfigError(f"perflow sample: n and batch_size must be >= 1, got {n} and {batch_size}")
    out = check_writable(out, directory=True)
    meta = load_json(folder / "perflow.json")
    w = float(meta.get("guidance_scale", 1.0)) if guidance is None else float(guidance)
    pipe = load_pipeline(folder, device=resolve_device(device))  # its UNet is the student's
    student = PeRFlowStudent.from_teacher(pipe.teacher, torch.tensor(meta["windows"], dtype=torch.float64), net=pipe.teacher.model).eval()
    rows = [prompts[i % len(prompts)] for i in range(n)]
    noise = torch.randn((n, *pipe.latent_shape), generator=torch.Generator().manual_seed(seed))
    images = _decode_in_batches(student, pipe, rows, noise, steps=steps, guidance=w, batch_size=batch_size)
    make_dirs(out)
    files = []
    for i, img in enumerate(to_uint8(images)):
        name = f"sample_{i:05d}.png"
        arr = img.permute(1, 2, 0).numpy()
        with atomic_path(out / name) as tmp:
            Image.fromarray(arr).save(tmp, format="PNG")
        files.append({"file": name, "prompt": rows[i]})
    save_image_grid(images, out / "grid.png", nrow=min(n, len(prompts)), scale=max(1, 64 // images.shape[-1]))
    summary = {"folder": str(folder.resolve()), "windows": k, "steps": steps, "guidance": w, "nfe": steps * guidance_nfe(w),
               "seed": seed, "samples": files}
    save_json(out / "samples.json", summary)
    return summary


@dataclass
class PeRFlowJob:
    """A finished PeRFlow job: the student, the image shape (C, H, W) (a pipeline job: the latent shape),
    the job record, and for a text-to-image job the exported :class:`LatentPipeline` (VAE, text encoder)."""
    student: PeRFlowStudent
    shape: tuple[int, ...]
    record: dict[str, Any]
    pipeline: LatentPipeline | None = None

    @property
    def boundaries(self) -> Tensor:
        return self.student.boundaries

    @property
    def num_classes(self) -> int:
        """Classes of a class-conditional teacher (0: unconditional)."""
        return int(self.record["teacher"].get("num_classes", 0))

    @property
    def guidance(self) -> float:
        """The student's default guidance scale at sampling: w for guidance_mode "student", else 1."""
        s = {**asdict(PeRFlowSettings()), **self.record["settings"]}
        return guidance_plan(s["guidance_mode"], s["guidance"], s["p_uncond"])[1]

    def sample(self, n: int, *, steps_per_window: int = 1, seed: int = 0, labels: Tensor | None = None, guidance: float | None = None,
               prompts: Sequence[str] | None = None) -> Tensor:
        """n images (n, C, H, W) on the CPU: K * ``steps_per_window`` Euler steps from seeded noise.

        Class-conditional jobs: ``labels`` (n,) (default 0, 1, ..., num_classes - 1 in turn) and the
        guidance scale (default :attr:`guidance`; NFE doubles when it is not 1).  Text-to-image jobs:
        ``prompts`` (used in turn) and the guidance scale; the latents are decoded by the VAE
        (images (n, 3, H, W) in [-1, 1])."""
        dev = next(self.student.parameters()).device
        noise = torch.randn((n, *self.shape), generator=torch.Generator().manual_seed(seed)).to(dev)
        spec = f"perflow:{(self.boundaries.numel() - 1) * check_int(steps_per_window, 'steps_per_window')}"
        if self.pipeline is not None:
            if labels is not None:
                raise ConfigError("perflow: a text-to-image job samples from prompts, not labels")
            if not prompts or isinstance(prompts, str):
                raise ConfigError("perflow: a text-to-image job needs prompts (a list of strings, used in turn)")
            rows = [list(prompts)[i % len(prompts)] for i in range(n)]
            steps = (self.boundaries.numel() - 1) * steps_per_window
            w = self.guidance if guidance is None else guidance
            return _decode_in_batches(self.student, self.pipeline, rows, noise, steps=steps, guidance=w, batch_size=8)
        if prompts is not None:
            raise ConfigError("perflow: prompts need a text-to-image pipeline job")
        if not self.num_classes:
            if labels is not None or guidance is not None:
                raise ConfigError("perflow: labels and guidance need a class-conditional job; this student is unconditional")
            return sample(self.student, noise, spec).x.cpu()
        y = torch.arange(n) % self.num_classes if labels is None else torch.as_tensor(labels).long()
        if y.shape != (n,) or bool(((y < 0) | (y >= self.num_classes)).any()):
            raise ConfigError(f"perflow: give one label in [0, {self.num_classes}) per sample ({n}), got shape {tuple(y.shape)}")
        w = self.guidance if guidance is None else guidance
        return sample(self.student, noise, spec, cond=y.to(dev), guidance=w).x.cpu()


def load_perflow(out: str | Path, device: str = "cpu") -> PeRFlowJob:
    """The trained student of a :func:`train_perflow` directory (teacher architecture + student weights)."""
    out = Path(out)
    job, weights = out / "perflow.json", out / "student.safetensors"
    if is_pipeline_job(out):  # text-to-image: the student is the exported pipeline's UNet
        record = load_json(job)
        if "steps_done" not in record or not (out / "diffusers" / "perflow.json").is_file():
            raise CheckpointError(f"{out}: not a finished PeRFlow job (its pipeline export diffusers/ is not written yet; run the job again to finish it)")
        pipe = load_pipeline(out / "diffusers", device=resolve_device(device))
        windows = torch.tensor(record["windows"], dtype=torch.float64)
        student = PeRFlowStudent.from_teacher(pipe.teacher, windows, net=pipe.teacher.model)
        return PeRFlowJob(student.eval(), tuple(record["shape"]), record, pipeline=pipe)
    if not job.is_file() or not weights.is_file():
        raise CheckpointError(f"{out}: not a finished PeRFlow job (needs perflow.json and student.safetensors)")
    record = load_json(job)
    if record.get("format") != PERFLOW_JOB_FORMAT:
        raise CheckpointError(f"{job}: not a PeRFlow job file (format {record.get('format')!r})")
    teacher, _, _ = load_perflow_teacher(record["teacher"]["path"], device)
    student = PeRFlowStudent.from_teacher(teacher, torch.tensor(record["windows"], dtype=torch.float64))
    tensors, _ = load_tensors(weights, device=device)
    try:
        student.net.load_state_dict(tensors)
    except RuntimeError as e:
        raise CheckpointError(f"{weights}: weights do not fit the teacher's network ({str(e).splitlines()[0]})") from None
    return PeRFlowJob(student.eval(), tuple(record["shape"]), record)
