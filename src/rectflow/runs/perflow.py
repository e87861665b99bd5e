"""PeRFlow as a resumable job: teacher in, student directory out (the API under ``rectflow perflow``).

A teacher is either a rectflow run directory (a flow from N(0, I) to images; a velocity on the
straight path, theory §2) or a LOCAL diffusers folder (``unet/`` + ``scheduler/``; see
:mod:`rectflow.perflow.diffusers_io`).  A class-conditional run (``model.num_classes`` > 0) is a
conditional teacher: the student learns on the run's labelled images (or ``data`` with labels) and
classifier-free guidance is used as :class:`PeRFlowSettings` says (theory §5.5).  :func:`train_perflow` writes into its output directory:

    perflow.json           settings, teacher (path + kind), windows, teacher NFE spent
    checkpoints/           Trainer checkpoints (safetensors; the job resumes from the newest)
    metrics.jsonl          loss / lr / ms per step
    student.safetensors    the student's (EMA) network weights
    delta.safetensors      student - teacher weights (apply to another model derived from the teacher)
    samples.png            a grid of K-step samples
    diffusers/             (diffusers teachers, ``export=True``) a diffusers folder of the student

:func:`load_perflow` reads it back as a :class:`~rectflow.perflow.student.PeRFlowStudent`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from rectflow.data.images import ImageGaussian
from rectflow.engine.io import load_json, load_tensors, make_dirs, remove_stale_temporaries, save_json, save_tensors
from rectflow.engine.trainer import TrainConfig, Trainer, resolve_device
from rectflow.errors import CheckpointError, ConfigError
from rectflow.flow.paths import LinearPath
from rectflow.images.sampling import save_image_grid
from rectflow.perflow.delta import save_delta
from rectflow.perflow.diffusers_io import export_student, load_teacher
from rectflow.perflow.guidance import LabelledData, as_guidance, guidance_plan
from rectflow.perflow.objective import LOSS_SPACES, PeRFlowObjective
from rectflow.perflow.student import PeRFlowStudent, sample_perflow
from rectflow.perflow.teacher import Teacher
from rectflow.perflow.windows import make_windows
from rectflow.runs.experiment import load_run
from rectflow.runs.rundir import RESUMABLE_TRAIN_KEYS, guard_run_dir, lock_run_dir

__all__ = ["PeRFlowSettings", "PeRFlowJob", "load_perflow_teacher", "train_perflow", "load_perflow"]

PERFLOW_JOB_FORMAT = "rectflow.perflow.job"


@dataclass
class PeRFlowSettings:
    """What defines a PeRFlow student (a resumed job must agree on all of it)."""

    windows: int = 4  # K: number of time windows = sampling steps
    spacing: str = "time"  # time | log_snr: how the window boundaries are placed
    solver_steps: int = 12  # teacher DDIM steps across one window (teacher NFE per training example)
    loss_space: str = "x0"  # native (the teacher's output kind on the window path) | velocity | x0 | eps | v
    start_fraction: float = 0.8  # share of training points at window starts (0 = the paper's uniform t), see PeRFlowObjective
    # (defaults: the best of benchmarks/results/perflow_study.md)
    # Class-conditional teachers only (theory §5.5); recorded for them, left out of unconditional jobs' records:
    guidance: float = 1.0  # classifier-free guidance scale w
    p_uncond: float = 0.0  # condition dropout of the student's training (keeps its unconditional branch for CFG)
    guidance_mode: str = "teacher"  # teacher: w in the teacher's window solve, student sampled at w = 1 (K NFE) | student: teacher at w = 1, student sampled with CFG at w (2K NFE)

    def validate(self) -> None:
        if self.windows < 1:
            raise ConfigError(f"perflow: windows must be >= 1, got {self.windows}")
        if self.solver_steps < 1:
            raise ConfigError(f"perflow: solver_steps must be >= 1, got {self.solver_steps}")
        if self.spacing not in ("time", "log_snr"):
            raise ConfigError(f"perflow: spacing must be 'time' or 'log_snr', got {self.spacing!r}")
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


def _is_diffusers_folder(p: Path) -> bool:
    return (p / "scheduler" / "scheduler_config.json").is_file() or (p / "scheduler_config.json").is_file()


# The student's training defaults measured on digits (benchmarks/results/perflow_study.md: lr 2e-4 -> 1e-3
# took K = 4 FD from 5.6 to 3.6); the CLI reads them from here.
DEFAULT_STEPS, DEFAULT_BATCH, DEFAULT_LR = 3000, 128, 1e-3


def default_train_config(steps: int = DEFAULT_STEPS) -> TrainConfig:
    """Trainer settings of a PeRFlow student: lr 1e-3, batch 128, cosine after min(100, steps/10) warmup steps."""
    return TrainConfig(steps=steps, batch_size=DEFAULT_BATCH, lr=DEFAULT_LR, warmup_steps=min(100, steps // 10), lr_schedule="cosine")


def load_perflow_teacher(path: str | Path, device: str = "cpu") -> tuple[Teacher, Any | None, dict[str, Any]]:
    """(teacher, its data sampler or None, description) from a run directory or a diffusers folder.

    A run's data are its target images (labelled for a class-conditional run, whose description
    then has ``num_classes``); a diffusers folder has none (give ``data`` to
    :func:`train_perflow`)."""
    p = Path(path)
    if not p.is_dir():
        raise ConfigError(f"perflow teacher {str(p)!r}: no such directory (a rectflow run or a local diffusers folder)")
    if _is_diffusers_folder(p):
        teacher = load_teacher(p)
        teacher.model.to(resolve_device(device))
        return teacher, None, {"kind": "diffusers", "path": str(p.resolve()), "parameterization": teacher.parameterization}
    if not (p / "config.json").is_file():
        raise ConfigError(f"perflow teacher {str(p)!r}: neither a rectflow run (config.json) nor a diffusers folder (scheduler/scheduler_config.json)")

    run = load_run(p, device=device)
    if run.config.reflow.distill:
        raise ConfigError(f"{p} is a one-step distillation run, not a flow; give a k-RF run")
    if not isinstance(run.source, ImageGaussian):
        raise ConfigError(f"{p}: PeRFlow needs a flow from Gaussian noise to images (source is {run.config.source!r})")
    # A rectflow run is a velocity on the straight path X_t = t X1 + (1 - t) X0 (theory §2).
    teacher = Teacher(run.model, LinearPath(), "velocity")
    desc = {"kind": "run", "path": str(p.resolve()), "checkpoint": str(run.checkpoint), "step": run.step, "parameterization": "velocity"}
    n_classes = int(run.config.model.num_classes)
    if n_classes > 0:  # only then: records of unconditional jobs stay as they were
        desc["num_classes"] = n_classes
    return teacher, run.target, desc  # lazy: loading a job to sample never opens the images


def _job_record(settings: PeRFlowSettings, train: TrainConfig, teacher: dict[str, Any], data: str, boundaries: Tensor, shape: tuple[int, ...]) -> dict[str, Any]:
    kept = asdict(settings)
    if not teacher.get("num_classes"):  # unconditional: the guidance keys are at their defaults and left out (records of earlier jobs match)
        kept = {k: v for k, v in kept.items() if k not in GUIDANCE_KEYS}
    return json.loads(json.dumps({  # JSON round trip: compared with the record read back on resumption
        "format": PERFLOW_JOB_FORMAT,
        "settings": kept,
        "train": {k: v for k, v in asdict(train).items() if k not in RESUMABLE_TRAIN_KEYS},
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
) -> Path:
    """Train (or resume) a PeRFlow student of the teacher at ``teacher_path`` into ``out``.

    Args:
        settings: windows, spacing, window solver steps, and for a class-conditional teacher the
            guidance scale, condition dropout and guidance mode (:class:`PeRFlowSettings`).
        train: the Trainer settings (steps, batch, lr, EMA, device, seed...); default
            :func:`default_train_config`.
        data: a sampler of real images in [-1, 1] (``sample(n, generator=, device=)``); default the
            run's target images.  Required for diffusers teachers.  A class-conditional teacher
            needs labelled images (``sample_labelled``, e.g. digits or class folders).
        data_name: how ``data`` is named in ``perflow.json`` (compared on resumption).
        export: for diffusers teachers, also write ``out/diffusers`` (a diffusers folder).
    A directory holding a job of other settings, teacher or data is refused; nothing is overwritten.
    """
    settings = settings or PeRFlowSettings()
    settings.validate()
    train = train or default_train_config()
    train.validate()
    out = Path(out)
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
    record = _job_record(settings, train, desc, data_name or type(data).__name__, boundaries, shape)
    job = out / "perflow.json"
    keys = ("format", "settings", "train", "teacher", "data", "windows", "shape")
    guard_run_dir(out, "perflow.json", record, what="PeRFlow job", normalise=lambda d: {k: d.get(k) for k in keys}, foreign_ok=False)
    with lock_run_dir(out, "PeRFlow job directory"):
        guard_run_dir(out, "perflow.json", record, what="PeRFlow job", normalise=lambda d: {k: d.get(k) for k in keys}, foreign_ok=False)
        remove_stale_temporaries(out, out / "checkpoints", out / "diffusers")  # left by a kill mid-write
        student = PeRFlowStudent.from_teacher(teacher, boundaries)
        objective = PeRFlowObjective(teacher, data, boundaries, solver_steps=settings.solver_steps, loss_space=settings.loss_space,
                                     start_fraction=settings.start_fraction, p_uncond=settings.p_uncond if conditional else 0.0)
        make_dirs(out)
        save_json(job, record)
        mcfg = {"perflow": record["settings"], "teacher": desc["path"], "windows": record["windows"]}
        trainer = Trainer(student, objective, train, out, model_config=mcfg, run_record={k: record[k] for k in keys}).fit(resume=True)
        final = trainer.ema.model if trainer.ema is not None else trainer.model
        final = final.eval()
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
            export_student(final, out / "diffusers", teacher_path)
    return out


@dataclass
class PeRFlowJob:
    """A finished PeRFlow job: the student, the image shape (C, H, W) and the job record."""
    student: PeRFlowStudent
    shape: tuple[int, ...]
    record: dict[str, Any]

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

    def sample(self, n: int, *, steps_per_window: int = 1, seed: int = 0, labels: Tensor | None = None, guidance: float | None = None) -> Tensor:
        """n images (n, C, H, W) on the CPU: K * ``steps_per_window`` Euler steps from seeded noise.

        Class-conditional jobs: ``labels`` (n,) (default 0, 1, ..., num_classes - 1 in turn) and the
        guidance scale (default :attr:`guidance`; NFE doubles when it is not 1)."""
        dev = next(self.student.parameters()).device
        noise = torch.randn((n, *self.shape), generator=torch.Generator().manual_seed(seed)).to(dev)
        if not self.num_classes:
            if labels is not None or guidance is not None:
                raise ConfigError("perflow: labels and guidance need a class-conditional job; this student is unconditional")
            with torch.no_grad():
                return sample_perflow(self.student, noise, self.boundaries, steps_per_window).x.cpu()
        y = torch.arange(n) % self.num_classes if labels is None else torch.as_tensor(labels).long()
        if y.shape != (n,) or bool(((y < 0) | (y >= self.num_classes)).any()):
            raise ConfigError(f"perflow: give one label in [0, {self.num_classes}) per sample ({n}), got shape {tuple(y.shape)}")
        w = self.guidance if guidance is None else guidance
        with torch.no_grad():
            return sample_perflow(self.student, noise, self.boundaries, steps_per_window, cond=y.to(dev), guidance=w).x.cpu()


def load_perflow(out: str | Path, device: str = "cpu") -> PeRFlowJob:
    """The trained student of a :func:`train_perflow` directory (teacher architecture + student weights)."""
    out = Path(out)
    job, weights = out / "perflow.json", out / "student.safetensors"
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
