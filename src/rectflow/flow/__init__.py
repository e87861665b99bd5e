"""Flow matching maths: probability paths, training times, couplings, the rectified-flow loss,
ODE solvers and the sampler on top of them, likelihoods, MeanFlow, and sample metrics (theory §1-3)."""

from rectflow.flow import couplings, likelihood, losses, meanflow, metrics, paths, sampling, solvers, time_sampling
from rectflow.flow.couplings import *  # noqa: F403 (re-exports couplings.__all__)
from rectflow.flow.likelihood import *  # noqa: F403 (re-exports likelihood.__all__)
from rectflow.flow.losses import *  # noqa: F403 (re-exports losses.__all__)
from rectflow.flow.meanflow import *  # noqa: F403 (re-exports meanflow.__all__)
from rectflow.flow.metrics import *  # noqa: F403 (re-exports metrics.__all__)
from rectflow.flow.paths import *  # noqa: F403 (re-exports paths.__all__)
from rectflow.flow.sampling import *  # noqa: F403 (re-exports sampling.__all__)
from rectflow.flow.solvers import *  # noqa: F403 (re-exports solvers.__all__)
from rectflow.flow.time_sampling import *  # noqa: F403 (re-exports time_sampling.__all__)

__all__ = [*paths.__all__, *time_sampling.__all__, *couplings.__all__, *losses.__all__, *solvers.__all__, *sampling.__all__, *likelihood.__all__, *meanflow.__all__, *metrics.__all__]
