"""rectflow: rectified flow, reflow, distillation, PeRFlow and diffusion <-> flow matching in PyTorch.

Notation and time convention follow SPEC.md: t = 0 is the source pi0, t = 1 the target pi1.
"""

from .couplings import IndependentCoupling, MinibatchOTCoupling, ot_pairing
from .errors import CheckpointError, ConfigError, DataError, RectflowError
from .losses import FlowMatchingObjective, LossOutput, flow_matching_loss
from .metrics import energy_distance, wasserstein2
from .models import MLPVelocity
from .paths import AffinePath, LinearPath
from .solvers import SolveResult, dopri5, euler, heun, midpoint, rk4, solve
from .time_sampling import LogitNormalTime, UniformTime, UShapedTime, make_time_sampler
from .training import TrainConfig, Trainer

__version__ = "0.1.0"

__all__ = [
    "AffinePath",
    "LinearPath",
    "IndependentCoupling",
    "MinibatchOTCoupling",
    "ot_pairing",
    "FlowMatchingObjective",
    "LossOutput",
    "flow_matching_loss",
    "MLPVelocity",
    "SolveResult",
    "solve",
    "euler",
    "midpoint",
    "heun",
    "rk4",
    "dopri5",
    "UniformTime",
    "LogitNormalTime",
    "UShapedTime",
    "make_time_sampler",
    "TrainConfig",
    "Trainer",
    "wasserstein2",
    "energy_distance",
    "RectflowError",
    "ConfigError",
    "DataError",
    "CheckpointError",
]

# Reflow, distillation and straight-coupling diagnostics (SPEC section 4).
from .diagnostics import crossing_probability, diagnose_coupling, diagnose_runs, straightness, transport_cost
from .distill import DistillationObjective, PseudoHuberLoss, distillation_loss, one_step, train_distill
from .pairs import PairCoupling, PairStore, generate_pairs
from .reflow import generate_run_pairs, reflow_chain, train_reflow

__all__ += [
    "PairStore",
    "PairCoupling",
    "generate_pairs",
    "generate_run_pairs",
    "train_reflow",
    "reflow_chain",
    "DistillationObjective",
    "PseudoHuberLoss",
    "distillation_loss",
    "one_step",
    "train_distill",
    "straightness",
    "transport_cost",
    "crossing_probability",
    "diagnose_coupling",
    "diagnose_runs",
]

# Diffusion models = Gaussian flow matching (SPEC section 6).
from .parameterizations import ConvertedModel, convert
from .samplers import churn, ddim, ddpm, euler_eta, flow_sde
from .schedules import (
    CustomSchedule,
    DDPMSchedule,
    FlowMatchingSchedule,
    NoiseSchedule,
    VPCosineSchedule,
    VPLinearSchedule,
    diffusion_time,
    log_snr,
)
from .weighting import DiffusionObjective, make_weighting

__all__ += [
    "NoiseSchedule",
    "FlowMatchingSchedule",
    "VPCosineSchedule",
    "VPLinearSchedule",
    "DDPMSchedule",
    "CustomSchedule",
    "diffusion_time",
    "log_snr",
    "convert",
    "ConvertedModel",
    "DiffusionObjective",
    "make_weighting",
    "ddim",
    "euler_eta",
    "ddpm",
    "churn",
    "flow_sde",
]
