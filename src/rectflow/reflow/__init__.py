"""Reflow maths: pair stores and pair generation, the pair coupling, the distillation objective
and the straightness / transport-cost / crossing diagnostics (theory §4)."""

from rectflow.reflow import diagnostics, distill, pairs
from rectflow.reflow.diagnostics import *  # noqa: F403 (re-exports diagnostics.__all__)
from rectflow.reflow.distill import *  # noqa: F403 (re-exports distill.__all__)
from rectflow.reflow.pairs import *  # noqa: F403 (re-exports pairs.__all__)

__all__ = [*pairs.__all__, *distill.__all__, *diagnostics.__all__]
