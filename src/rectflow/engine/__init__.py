"""The training engine: the exact-resume trainer, checkpoints, atomic file io and torchrun helpers.
It knows nothing about flows."""

from rectflow.engine import checkpoint, distributed, io, trainer
from rectflow.engine.checkpoint import *  # noqa: F403 (re-exports checkpoint.__all__)
from rectflow.engine.distributed import *  # noqa: F403 (re-exports distributed.__all__)
from rectflow.engine.io import *  # noqa: F403 (re-exports io.__all__)
from rectflow.engine.trainer import *  # noqa: F403 (re-exports trainer.__all__)

__all__ = [*io.__all__, *distributed.__all__, *checkpoint.__all__, *trainer.__all__]
