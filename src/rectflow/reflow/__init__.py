"""Reflow maths: pair stores and pair generation, the pair coupling, the distillation objective
and the straightness / transport-cost / crossing diagnostics (theory section 4)."""

from rectflow.reflow.pairs import PAIRS_FORMAT, PairSettings, PairStore, PairCoupling, generate_pairs, state_dict_sha256, shard_name
from rectflow.reflow.distill import DistillLoss, DistillBatch, l2_loss, PseudoHuberLoss, make_distill_loss, distillation_loss, DistillationObjective, one_step
from rectflow.reflow.diagnostics import Straightness, TransportCost, Crossings, CouplingDiagnostics, straightness, transport_cost, segment_intersections, crossing_probability, flow_coupling, diagnose_coupling, diagnose_flow

__all__ = [
    "PAIRS_FORMAT",
    "PairSettings",
    "PairStore",
    "PairCoupling",
    "generate_pairs",
    "state_dict_sha256",
    "shard_name",
    "DistillLoss",
    "DistillBatch",
    "l2_loss",
    "PseudoHuberLoss",
    "make_distill_loss",
    "distillation_loss",
    "DistillationObjective",
    "one_step",
    "Straightness",
    "TransportCost",
    "Crossings",
    "CouplingDiagnostics",
    "straightness",
    "transport_cost",
    "segment_intersections",
    "crossing_probability",
    "flow_coupling",
    "diagnose_coupling",
    "diagnose_flow",
]
