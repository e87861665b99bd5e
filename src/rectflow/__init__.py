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
