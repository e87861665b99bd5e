"""rectflow: rectified flow, reflow, distillation, PeRFlow and diffusion <-> flow matching in PyTorch.

One time convention everywhere: t = 0 is the source pi0 (noise or domain A), t = 1 the target pi1
(data); the maths is in docs/theory.md.  Subpackages, lowest layer first:

* :mod:`rectflow.models`, :mod:`rectflow.data`: networks and samplers of distributions;
* :mod:`rectflow.flow`: paths, training times, couplings, losses, ODE solvers, sample metrics;
* :mod:`rectflow.engine`, :mod:`rectflow.diffusion`: the trainer and checkpoints; diffusion
  schedules, parameterisations, weightings and samplers;
* :mod:`rectflow.reflow`, :mod:`rectflow.perflow`, :mod:`rectflow.images`: reflow and
  distillation maths, PeRFlow, image guidance and metrics;
* :mod:`rectflow.runs`: run directories and jobs (the CLI is a thin layer over it).
"""

from __future__ import annotations

import importlib
from typing import Any

from rectflow.version import __version__

# Every public name, and the subpackage it lives in: imported on first use (PEP 562), so `import rectflow` or
# `import rectflow.flow` does not load the run layer, matplotlib or diffusers.
_EXPORTS = {
    **dict.fromkeys(["make_distribution"], "rectflow.data"),
    **dict.fromkeys(["ConvertedModel", "CustomSchedule", "DDPMSchedule", "DiffusionObjective", "FlowMatchingSchedule", "NoiseSchedule", "VPCosineSchedule", "VPLinearSchedule", "churn", "convert", "ddim", "ddpm", "diffusion_time", "euler_eta", "flow_sde", "log_snr", "make_weighting", "parse_spec", "sample"], "rectflow.diffusion"),
    **dict.fromkeys(["TrainConfig", "Trainer"], "rectflow.engine"),
    **dict.fromkeys(["CheckpointError", "ConfigError", "DataError", "RectflowError"], "rectflow.errors"),
    **dict.fromkeys(["AffinePath", "Coupling", "FlowMatchingObjective", "IndependentCoupling", "LinearPath", "LogitNormalTime", "LossOutput", "MinibatchOTCoupling", "Objective", "SolveResult", "UniformTime", "UShapedTime", "dopri5", "energy_distance", "euler", "flow_matching_loss", "heun", "make_time_sampler", "midpoint", "ot_pairing", "rk4", "solve", "wasserstein2"], "rectflow.flow"),
    **dict.fromkeys(["ConditionalFlowMatchingObjective", "GuidedVelocity", "fd", "fid", "sample_guided", "sample_images"], "rectflow.images"),
    **dict.fromkeys(["DiTVelocity", "MLPVelocity", "UNetVelocity"], "rectflow.models"),
    **dict.fromkeys(["PeRFlowObjective", "PeRFlowStudent", "Teacher", "apply_delta", "load_delta", "make_windows", "sample_perflow", "save_delta"], "rectflow.perflow"),
    **dict.fromkeys(["DistillationObjective", "PairCoupling", "PairStore", "PseudoHuberLoss", "crossing_probability", "diagnose_coupling", "distillation_loss", "generate_pairs", "one_step", "straightness", "transport_cost"], "rectflow.reflow"),
    **dict.fromkeys(["ExperimentConfig", "config_from_dict", "diagnose_runs", "evaluate_run", "generate_run_pairs", "load_config", "load_perflow", "load_run", "reflow_chain", "train_distill", "train_perflow", "train_reflow", "train_run"], "rectflow.runs"),
}


_SUBPACKAGES = ("cli", "data", "diffusion", "draws", "engine", "errors", "flow", "images", "models", "perflow", "protocols", "reflow", "runs", "version")


def __getattr__(name: str) -> Any:
    if name in _SUBPACKAGES:  # rectflow.flow etc. as attributes, imported on first use
        return importlib.import_module(f"rectflow.{name}")
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'rectflow' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # the next access is a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))

__all__ = [
    "__version__",
    # errors
    "RectflowError", "ConfigError", "DataError", "CheckpointError",
    # networks and distributions
    "MLPVelocity", "UNetVelocity", "DiTVelocity", "make_distribution",
    # flow matching (theory §1-3)
    "AffinePath", "LinearPath", "UniformTime", "LogitNormalTime", "UShapedTime", "make_time_sampler",
    "Coupling", "IndependentCoupling", "MinibatchOTCoupling", "ot_pairing",
    "FlowMatchingObjective", "LossOutput", "flow_matching_loss",
    "SolveResult", "solve", "euler", "midpoint", "heun", "rk4", "dopri5",
    "wasserstein2", "energy_distance",
    # training
    "Objective", "TrainConfig", "Trainer",
    # diffusion = Gaussian flow matching (theory §6)
    "NoiseSchedule", "FlowMatchingSchedule", "VPCosineSchedule", "VPLinearSchedule", "DDPMSchedule", "CustomSchedule",
    "diffusion_time", "log_snr", "convert", "ConvertedModel", "DiffusionObjective", "make_weighting",
    "ddim", "euler_eta", "ddpm", "churn", "flow_sde",
    # the one sampling verb: every sampler by name ("euler:4", "dopri5", "dpm++2m:10", "edm:8", "meanflow:1")
    "sample", "parse_spec",
    # reflow and distillation (theory §4)
    "PairStore", "PairCoupling", "generate_pairs", "DistillationObjective", "PseudoHuberLoss", "distillation_loss", "one_step",
    "straightness", "transport_cost", "crossing_probability", "diagnose_coupling",
    # images and guidance
    "GuidedVelocity", "ConditionalFlowMatchingObjective", "sample_guided", "sample_images", "fd", "fid",
    # PeRFlow (theory §5)
    "make_windows", "Teacher", "PeRFlowStudent", "PeRFlowObjective", "sample_perflow", "save_delta", "load_delta", "apply_delta",
    # runs and jobs
    "ExperimentConfig", "load_config", "config_from_dict", "train_run", "load_run", "evaluate_run",
    "generate_run_pairs", "train_reflow", "reflow_chain", "train_distill", "diagnose_runs",
    "train_perflow", "load_perflow",
]
