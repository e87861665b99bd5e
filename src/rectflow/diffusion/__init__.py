"""Diffusion models as Gaussian flow matching: noise schedules, output parameterisations,
loss weightings and the DDIM/DDPM/SDE samplers (theory §6), and the library's one sampling verb
(:func:`rectflow.diffusion.specs.sample`: every sampler by name)."""

from rectflow.diffusion import parameterizations, samplers, schedules, specs, weighting
from rectflow.diffusion.parameterizations import *  # noqa: F403 (re-exports parameterizations.__all__)
from rectflow.diffusion.samplers import *  # noqa: F403 (re-exports samplers.__all__)
from rectflow.diffusion.schedules import *  # noqa: F403 (re-exports schedules.__all__)
from rectflow.diffusion.specs import *  # noqa: F403 (re-exports specs.__all__)
from rectflow.diffusion.weighting import *  # noqa: F403 (re-exports weighting.__all__)

__all__ = [*schedules.__all__, *parameterizations.__all__, *weighting.__all__, *samplers.__all__, *specs.__all__]
