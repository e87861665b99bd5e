"""The diffusers scheduler of exported PeRFlow students (needs the optional ``diffusers``).

:class:`PeRFlowScheduler` lives in :mod:`rectflow.perflow.scheduling_perflow`, a file that imports nothing from
rectflow, so that every export can ship it in ``scheduler/`` as a diffusers custom component: stock diffusers loads
an export with ``from_pretrained(folder, trust_remote_code=True)`` and no rectflow installed.  This module is
rectflow's door to it: the class, the file to copy (:data:`SCHEDULER_FILE`) and the ``model_index.json`` entry that
names it (:data:`SCHEDULER_ENTRY`).

It reproduces :func:`rectflow.perflow.student.sample_perflow` (Euler on the window path, theory §5.4) at any
``num_inference_steps >= K``; it also reads the official PeRFlow repository's configs and prediction types
(``ddim_eps``, ``diff_eps``, ``velocity``; its time input int(N tau)).

    from rectflow.perflow.diffusers_scheduler import PeRFlowScheduler
    scheduler = PeRFlowScheduler.from_pretrained("student/scheduler")
"""

from __future__ import annotations

import sys
from pathlib import Path

from rectflow.perflow import scheduling_perflow
from rectflow.perflow.scheduling_perflow import OFFICIAL_PREDICTIONS, PeRFlowScheduler, PeRFlowSchedulerOutput
from rectflow.perflow.windows import step_grid  # re-exported: defined where no diffusers import is needed

__all__ = ["PeRFlowScheduler", "PeRFlowSchedulerOutput", "OFFICIAL_PREDICTIONS", "SCHEDULER_FILE", "SCHEDULER_ENTRY", "step_grid"]

SCHEDULER_FILE = Path(scheduling_perflow.__file__)
# diffusers loads a component whose model_index.json entry names a module file in the component's own folder
# (custom code, with trust_remote_code=True)
SCHEDULER_ENTRY = [SCHEDULER_FILE.stem, "PeRFlowScheduler"]

# An export's model_index.json names the module "scheduling_perflow"; diffusers resolves a component passed to
# from_pretrained (scheduler=...) through sys.modules under that name, so make it this module's own copy.
sys.modules.setdefault(SCHEDULER_FILE.stem, scheduling_perflow)
