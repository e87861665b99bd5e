"""PeRFlow: time windows, the teacher's per-window solve, the student in the teacher's output
space, its objective, K-step sampling, weight deltas and diffusers in/out (theory section 5)."""

from rectflow.perflow.windows import make_windows, validate_windows, window_index, WindowPath, window_grid
from rectflow.perflow.teacher import Teacher, teacher_ddim_sample
from rectflow.perflow.student import PeRFlowStudent, sample_perflow
from rectflow.perflow.objective import PeRFlowBatch, PeRFlowObjective, PairsObjective, straight_loss
from rectflow.perflow.delta import weight_delta, save_delta, load_delta, apply_delta
from rectflow.perflow.diffusers_io import UNetAdapter, schedule_from_config, load_teacher, export_student, load_student, ddim_scheduler_config

__all__ = [
    "make_windows",
    "validate_windows",
    "window_index",
    "WindowPath",
    "window_grid",
    "Teacher",
    "teacher_ddim_sample",
    "PeRFlowStudent",
    "sample_perflow",
    "PeRFlowBatch",
    "PeRFlowObjective",
    "PairsObjective",
    "straight_loss",
    "weight_delta",
    "save_delta",
    "load_delta",
    "apply_delta",
    "UNetAdapter",
    "schedule_from_config",
    "load_teacher",
    "export_student",
    "load_student",
    "ddim_scheduler_config",
]
