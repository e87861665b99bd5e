"""PeRFlow as a resumable job: teacher in, student directory out (the API under ``rectflow perflow``).

A teacher is either a rectflow run directory (a flow from N(0, I) to images; a velocity on the
straight path, theory §2) or a LOCAL diffusers folder (``unet/`` + ``scheduler/``; see
:mod:`rectflow.perflow.diffusers_io`).  :func:`train_perflow` writes into its output directory:

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

    A run's data are its target images; a diffusers folder has none (give ``data`` to
    :func:`train_perflow`).  Class-conditional runs are refused (not supported yet)."""
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
    if run.config.model.num_classes > 0:
        raise ConfigError(f"{p} is class-conditional; PeRFlow of conditional runs is not supported yet")
    if run.config.reflow.distill:
        raise ConfigError(f"{p} is a one-step distillation run, not a flow; give a k-RF run")
    if not isinstance(run.source, ImageGaussian):
        raise ConfigError(f"{p}: PeRFlow needs a flow from Gaussian noise to images (source is {run.config.source!r})")
    # A rectflow run is a velocity on the straight path X_t = t X1 + (1 - t) X0 (theory §2).
    teacher = Teacher(run.model, LinearPath(), "velocity")
    desc = {"kind": "run", "path": str(p.resolve()), "checkpoint": str(run.checkpoint), "step": run.step, "parameterization": "velocity"}
    return teacher, run.target, desc


def _job_record(settings: PeRFlowSettings, train: TrainConfig, teacher: dict[str, Any], data: str, boundaries: Tensor, shape: tuple[int, ...]) -> dict[str, Any]:
    return json.loads(json.dumps({  # JSON round trip: compared with the record read back on resumption
        "format": PERFLOW_JOB_FORMAT,
        "settings": asdict(settings),
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
        settings: windows, spacing, window solver steps (:class:`PeRFlowSettings`).
        train: the Trainer settings (steps, batch, lr, EMA, device, seed...); default
            :func:`default_train_config`.
        data: a sampler of real images in [-1, 1] (``sample(n, generator=, device=)``); default the
            run's target images.  Required for diffusers teachers.
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
    if data is None:
        if run_data is None:
            raise ConfigError("perflow: a diffusers teacher needs real training images (give data, e.g. --data PATH)")
        data, data_name = run_data, data_name or "run target"
    boundaries = make_windows(settings.windows, spacing=settings.spacing, path=teacher.path)
    shape = tuple(data.sample(1, generator=torch.Generator().manual_seed(0)).shape[1:])
    record = _job_record(settings, train, desc, data_name or type(data).__name__, boundaries, shape)
    job = out / "perflow.json"
    keys = ("format", "settings", "train", "teacher", "data", "windows", "shape")
    guard_run_dir(out, "perflow.json", record, what="PeRFlow job", normalise=lambda d: {k: d.get(k) for k in keys}, foreign_ok=False)
    with lock_run_dir(out, "PeRFlow job directory"):
        guard_run_dir(out, "perflow.json", record, what="PeRFlow job", normalise=lambda d: {k: d.get(k) for k in keys}, foreign_ok=False)
        remove_stale_temporaries(out, out / "checkpoints", out / "diffusers")  # left by a kill mid-write
        student = PeRFlowStudent.from_teacher(teacher, boundaries)
        objective = PeRFlowObjective(teacher, data, boundaries, solver_steps=settings.solver_steps, loss_space=settings.loss_space,
                                     start_fraction=settings.start_fraction)
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
        record["teacher_nfe_per_example"] = settings.solver_steps
        record["teacher_nfe_this_session"] = objective.teacher_nfe
        record["steps_done"] = trainer.step
        save_json(job, record)
        save_image_grid(PeRFlowJob(final, shape, record).sample(64), out / "samples.png", scale=max(1, 64 // shape[-1]))
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

    def sample(self, n: int, *, steps_per_window: int = 1, seed: int = 0) -> Tensor:
        """n images (n, C, H, W) on the CPU: K * ``steps_per_window`` Euler steps from seeded noise."""
        dev = next(self.student.parameters()).device
        noise = torch.randn((n, *self.shape), generator=torch.Generator().manual_seed(seed)).to(dev)
        with torch.no_grad():
            return sample_perflow(self.student, noise, self.boundaries, steps_per_window).x.cpu()


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
