"""Flow matching maths: probability paths, training times, couplings, the rectified-flow loss,
ODE solvers and the sampler on top of them, and sample metrics (theory sections 1-3)."""

from rectflow.flow.paths import AffinePath, LinearPath, PathCoefficients, PathSample, expand_like
from rectflow.flow.time_sampling import TimeSampler, UniformTime, LogitNormalTime, UShapedTime, LossWeight, make_time_sampler
from rectflow.flow.couplings import Coupling, Sampler, IndependentCoupling, MinibatchOTCoupling, ot_pairing, squared_cost
from rectflow.flow.losses import Objective, check_coupling, LossOutput, FlowBatch, FlowMatchingObjective, flow_matching_loss, per_sample_mse
from rectflow.flow.solvers import Velocity, SolveResult, ButcherTableau, FIXED_STEP_METHODS, METHODS, time_grid, check_grid, rk_step, fixed_step, euler, midpoint, heun, rk4, dopri5, solve
from rectflow.flow.sampling import sample_model, parse_solver_spec, solver_label
from rectflow.flow.metrics import wasserstein2, energy_distance

__all__ = [
    "AffinePath",
    "LinearPath",
    "PathCoefficients",
    "PathSample",
    "expand_like",
    "TimeSampler",
    "UniformTime",
    "LogitNormalTime",
    "UShapedTime",
    "LossWeight",
    "make_time_sampler",
    "Coupling",
    "Sampler",
    "IndependentCoupling",
    "MinibatchOTCoupling",
    "ot_pairing",
    "squared_cost",
    "Objective",
    "check_coupling",
    "LossOutput",
    "FlowBatch",
    "FlowMatchingObjective",
    "flow_matching_loss",
    "per_sample_mse",
    "Velocity",
    "SolveResult",
    "ButcherTableau",
    "FIXED_STEP_METHODS",
    "METHODS",
    "time_grid",
    "check_grid",
    "rk_step",
    "fixed_step",
    "euler",
    "midpoint",
    "heun",
    "rk4",
    "dopri5",
    "solve",
    "sample_model",
    "parse_solver_spec",
    "solver_label",
    "wasserstein2",
    "energy_distance",
]
