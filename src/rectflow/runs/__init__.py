"""Run jobs: configs, run directories, training/reflow/distillation/PeRFlow/diagnose jobs,
evaluation, plots, the HTML report and the demo.  The CLI is a thin layer over this package."""

from rectflow.runs import config, diagnose, distill_job, evaluation, experiment, lineage, perflow_job, reflow_job, rundir
from rectflow.runs.config import *  # noqa: F403 (re-exports config.__all__)
from rectflow.runs.diagnose import *  # noqa: F403 (re-exports diagnose.__all__)
from rectflow.runs.distill_job import *  # noqa: F403 (re-exports distill_job.__all__)
from rectflow.runs.evaluation import *  # noqa: F403 (re-exports evaluation.__all__)
from rectflow.runs.experiment import *  # noqa: F403 (re-exports experiment.__all__)
from rectflow.runs.lineage import *  # noqa: F403 (re-exports lineage.__all__)
from rectflow.runs.perflow_job import *  # noqa: F403 (re-exports perflow_job.__all__)
from rectflow.runs.reflow_job import *  # noqa: F403 (re-exports reflow_job.__all__)
from rectflow.runs.rundir import *  # noqa: F403 (re-exports rundir.__all__)

__all__ = [*config.__all__, *rundir.__all__, *experiment.__all__, *evaluation.__all__, *lineage.__all__, *reflow_job.__all__, *distill_job.__all__, *diagnose.__all__, *perflow_job.__all__]
