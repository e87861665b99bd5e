"""A diffusers scheduler for exported PeRFlow students (needs the optional ``diffusers``).

:class:`PeRFlowScheduler` follows diffusers' scheduler contract (``ConfigMixin`` config,
``set_timesteps``, ``step``) and reproduces :func:`rectflow.perflow.student.sample_perflow`: Euler
steps on the piecewise-linear window path (theory §5.4), the network's output (the teacher's
parameterisation) converted to a velocity there.  Unlike a stock DDIM config it is right at any
``num_inference_steps >= K``: the steps are spread over the K windows as evenly as possible (the
first ``n mod K`` windows get one more), and fewer than K steps are refused.  ``step`` finds its
place from the timestep itself, so it keeps no step counter.

A flow-matching teacher (SD3, theory §6.10) gives ``prediction_type="flow_prediction"`` (the
network outputs u = noise - x0, our ``"u"``) and ``time_input="sigma"`` (it reads sigma N, sigma =
1 - t, as diffusers' ``FlowMatchEulerDiscreteScheduler`` passes it); the step is then the stock
flow-matching Euler step z + (sigma' - sigma) u between grid points.

    from rectflow.perflow.diffusers_scheduler import PeRFlowScheduler   # the one extra import
    scheduler = PeRFlowScheduler.from_pretrained("student/scheduler")
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin, SchedulerOutput
from torch import Tensor

from rectflow.diffusion.parameterizations import convert
from rectflow.errors import ConfigError
from rectflow.perflow.diffusers_io import step_grid  # re-exported: defined where no diffusers import is needed
from rectflow.perflow.windows import WindowPath, window_index

__all__ = ["PeRFlowScheduler", "step_grid"]

_KINDS = {"epsilon": "eps", "v_prediction": "v", "sample": "x0", "flow_prediction": "u"}
# The network's time input at rectflow time t: DDPM's step index N (1 - t) - 1, or flow matching's sigma N.
_TIME_INPUTS = {"step_index": -1.0, "sigma": 0.0}


class PeRFlowScheduler(SchedulerMixin, ConfigMixin):
    """Euler on the window path of a PeRFlow student, for diffusers pipelines.

    Args (stored in ``scheduler_config.json``):
        windows: the K + 1 window boundaries in rectflow time (0 = noise, 1 = data).
        alphas, sigmas: the teacher's a(t_k), b(t_k) at the boundaries.
        num_train_timesteps: N of the teacher.
        prediction_type: the network's output, ``epsilon`` / ``v_prediction`` / ``sample`` /
            ``flow_prediction`` (u = noise - x0, a flow-matching transformer's).
        time_input: ``step_index`` (the UNet sees timestep N (1 - t) - 1) or ``sigma`` (a flow-matching
            network sees sigma N = N (1 - t)).
    """

    config_name = "scheduler_config.json"
    order = 1

    @register_to_config
    def __init__(self, windows: list[float], alphas: list[float], sigmas: list[float], num_train_timesteps: int = 1000,
                 prediction_type: str = "epsilon", time_input: str = "step_index") -> None:
        if prediction_type not in _KINDS:
            raise ConfigError(f"PeRFlowScheduler: prediction_type must be one of {sorted(_KINDS)}, got {prediction_type!r}")
        if time_input not in _TIME_INPUTS:
            raise ConfigError(f"PeRFlowScheduler: time_input must be one of {sorted(_TIME_INPUTS)}, got {time_input!r}")
        self.path = WindowPath.from_knots(windows, alphas, sigmas)
        self.kind = _KINDS[prediction_type]
        self.init_noise_sigma = 1.0
        self.set_timesteps(len(windows) - 1)

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None) -> None:
        self.grid = step_grid(self.path.boundaries, int(num_inference_steps))
        self.num_inference_steps = int(num_inference_steps)
        n = self.config.num_train_timesteps
        offset = _TIME_INPUTS[self.config.time_input]
        self.timesteps = ((1 - self.grid[:-1]) * n + offset).to(device=device)  # the teacher's continuous time input at each step's start

    def scale_model_input(self, sample: Tensor, timestep: Any = None) -> Tensor:
        return sample

    def _index(self, timestep: Tensor | float) -> int:
        ts = torch.as_tensor(timestep, dtype=torch.float64).reshape(-1)[:1].cpu()
        hits = torch.nonzero((self.timesteps.double().cpu() - ts).abs() < 1e-6 * max(1.0, float(ts.abs()))).flatten()
        if hits.numel() != 1:
            raise ValueError(f"PeRFlowScheduler.step: timestep {float(ts)} is not one of this schedule's {self.num_inference_steps} timesteps")
        return int(hits[0])

    def step(self, model_output: Tensor, timestep: Tensor | float, sample: Tensor, return_dict: bool = True, **kwargs: Any) -> SchedulerOutput | tuple[Tensor]:
        """One Euler step of the window path from this timestep's time to the next."""
        i = self._index(timestep)
        t, t_next = float(self.grid[i]), float(self.grid[i + 1])
        k = int(window_index(self.path.boundaries, torch.tensor([t], dtype=torch.float64))[0])
        if not float(self.path.boundaries[k]) <= t_next <= float(self.path.boundaries[k + 1]) + 1e-12:  # step_grid keeps every boundary
            raise RuntimeError(f"PeRFlowScheduler: the step {t} -> {t_next} crosses a window boundary (a bug in step_grid)")
        # in float32 whatever the pipeline's dtype, as diffusers' schedulers upcast: in fp16 / bf16 the
        # conversion's divisor a(t) can round to "singular" and a time near a boundary to the next window
        z = sample.float()
        tv = torch.full((sample.shape[0],), t, dtype=torch.float32, device=sample.device)
        v = convert(model_output.float(), src=self.kind, dst="velocity", z=z, path=self.path, t=tv)
        prev = (z + (t_next - t) * v).to(sample.dtype)
        return SchedulerOutput(prev_sample=prev) if return_dict else (prev,)

    def __len__(self) -> int:
        return self.config.num_train_timesteps
