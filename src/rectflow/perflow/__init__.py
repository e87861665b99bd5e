"""PeRFlow: piecewise rectified flow that accelerates a pretrained diffusion or flow model (theory §5).

Rectflow time t: 0 = noise, 1 = data (diffusion time s = 1 - t, see :mod:`rectflow.diffusion.schedules`).

* :func:`make_windows` splits [0, 1] into K windows 0 = t_0 < t_1 < ... < t_K = 1 (uniform in t,
  uniform in the teacher's log-SNR, or user-given boundaries).
* :class:`Teacher` is any model that is a prediction (eps, x0, v, velocity, u) on an affine path
  z_t = a(t) x + b(t) eps; :meth:`Teacher.ddim` runs a batched DDIM across one window per
  example (each example may sit in a different window).
* :class:`PeRFlowObjective` (Trainer-compatible): real data x, noise eps, window k per example;
  z_start = a(t_{k-1}) x + b(t_{k-1}) eps (forward process), z_end = teacher DDIM across window k;
  the student regresses the straight line: at z_t = z_start + (t - t_{k-1}) v,
  v = (z_end - z_start) / (t_k - t_{k-1}).
* Parameterisation inheritance.  Inside window k the straight line from z_start to the DDIM end
  point z_end = a_k x-hat + b_k eps-hat (x-hat, eps-hat the teacher's predictions at z_start) is
  itself an affine path in (x-hat, eps-hat) with *linearly interpolated* coefficients
  A(t) = a_{k-1} + r (a_k - a_{k-1}), B(t) = b_{k-1} + r (b_k - b_{k-1}), r = (t - t_{k-1}) / (t_k - t_{k-1}):
  z_t = A(t) x-hat + B(t) eps-hat, v = (a_k - a_{k-1})/dt x-hat + (b_k - b_{k-1})/dt eps-hat.
  :class:`WindowPath` is that piecewise-linear path; the student keeps the teacher's output kind
  (e.g. eps) *on the window path*, so at each window start its prediction means exactly what the
  teacher's does, and one Euler step per window of the teacher-initialised student is the teacher's
  K-step DDIM.  The weight change is stored as a delta (:func:`save_delta` / :func:`apply_delta`).
* Sampling: the library's one verb, ``rectflow.sample(student, x0, "perflow:N")`` (N >= K Euler steps on the
  student's ``sampling_grid(N)``; N = K is K-step generation), over the solver :func:`sample_perflow` (m Euler steps
  per window of any callable), both returning a :class:`~rectflow.flow.solvers.SolveResult` with the NFE.
"""

from rectflow.perflow import adapters, delta, diffusers_io, latent, latent_cache, lora, objective, scheduler_config, student, teacher, windows  # noqa: F401 (latent text-to-image pipelines; diffusers imported lazily)
from rectflow.perflow.adapters import *  # noqa: F403 (re-exports adapters.__all__)
from rectflow.perflow.delta import *  # noqa: F403 (re-exports delta.__all__)
from rectflow.perflow.diffusers_io import *  # noqa: F403 (re-exports diffusers_io.__all__)
from rectflow.perflow.guidance_modes import GUIDANCE_MODES, Guidance, LabelledData, guidance_plan  # noqa: F401 (classifier-free guidance, theory §5.5)
from rectflow.perflow.latent import LatentPipeline, export_pipeline, load_pipeline  # noqa: F401
from rectflow.perflow.latent_cache import LatentCache, LatentCacheData, build_latent_cache  # noqa: F401
from rectflow.perflow.lora import apply_lora, lora_state_dict, save_lora  # noqa: F401
from rectflow.perflow.objective import *  # noqa: F403 (re-exports objective.__all__)
from rectflow.perflow.scheduler_config import *  # noqa: F403 (re-exports scheduler_config.__all__)
from rectflow.perflow.student import *  # noqa: F403 (re-exports student.__all__)
from rectflow.perflow.teacher import *  # noqa: F403 (re-exports teacher.__all__)
from rectflow.perflow.windows import *  # noqa: F403 (re-exports windows.__all__)

__all__ = [*windows.__all__, *teacher.__all__, *student.__all__, *objective.__all__, *delta.__all__, *adapters.__all__, *scheduler_config.__all__, *diffusers_io.__all__]
