"""PeRFlowScheduler: the diffusers scheduler of PeRFlow students, in one file that needs only torch, numpy and diffusers.

This module imports nothing from rectflow on purpose. Every export copies it into its ``scheduler/`` folder and
names it in ``model_index.json`` as the custom component ``["scheduling_perflow", "PeRFlowScheduler"]``, so a
stock diffusers install loads the exported pipeline without rectflow:

    pipe = StableDiffusionPipeline.from_pretrained("export/diffusers", trust_remote_code=True)
    image = pipe("a photo of a cat", num_inference_steps=4).images[0]      # any count >= K

rectflow itself uses the same class (``rectflow.perflow.diffusers_scheduler`` re-exports it).

What it computes (rectflow's theory §5.4, in rectflow time t: 0 = noise, 1 = data). The K windows
0 = t_0 < ... < t_K = 1 carry the teacher's signal and noise coefficients a_k, s_k at their boundaries; inside a
window the student's path z = A(t) x + B(t) eps interpolates them linearly, so A' and B' are constant there.
``num_inference_steps = n >= K`` Euler steps are spread over the windows (the first n mod K windows get one more)
and each step turns the network's output into the velocity dz/dt on that path:

* ``epsilon`` / ``ddim_eps``: x = (z - B eps) / A, v = A' x + B' eps (one step per window is DDIM between boundaries);
* ``sample``: eps = (z - A x) / B;  ``v_prediction``: x = (A z - B v) / (A^2 + B^2), eps = (B z + A v) / (A^2 + B^2);
* ``flow_prediction`` (SD3's u = noise - x) and ``velocity`` (the official code's dz/dtau, tau = 1 - t): v = -output;
* ``diff_eps`` (the official SD 1.5 deltas): the output is the noise of the window as its own diffusion,
  z_start = g z_end + sqrt(1 - g^2) eps with g = a_start / a_end, so z_end = z_start / g - sqrt(1/g^2 - 1) eps.

The network's time input (``time_input``): ``step_index`` is DDPM's step index N (1 - t) - 1 (what rectflow's
students are trained on), ``sigma`` is N (1 - t) (flow-matching transformers), ``official`` is the official
repository's int(N tau) at grid points truncated to integers (its students' convention: 1000 at pure noise).

Config: the window boundaries and knots (``windows``, ``window_alphas``, ``window_sigmas``) and the teacher's own
schedule (``beta_start`` ... ``trained_betas``, or ``shift`` for a flow-matching teacher), so that
``DDIMScheduler.from_config(pipe.scheduler.config)`` gives the teacher's scheduler back.  Built from a stock
config without windows (``PeRFlowScheduler.from_config(pipe.scheduler.config, prediction_type="diff_eps",
num_time_windows=4)``, as the official README does), the windows are uniform and the knots are the official
ones: sqrt(alphas_cumprod[N tau - 1]), with alphas_cumprod[0] at the data end.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers.configuration_utils import ConfigMixin, FrozenDict, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import BaseOutput

__all__ = ["PeRFlowScheduler", "PeRFlowSchedulerOutput", "OFFICIAL_PREDICTIONS"]

# our prediction types -> what the network outputs
_KINDS = {"epsilon": "eps", "ddim_eps": "eps", "v_prediction": "v", "sample": "x0", "flow_prediction": "u", "velocity": "u", "diff_eps": "diff_eps"}
OFFICIAL_PREDICTIONS = ("ddim_eps", "diff_eps", "velocity")  # the official repository's prediction types
_TIME_OFFSETS = {"step_index": -1.0, "sigma": 0.0, "official": 0.0}
# The teacher scheduler's own sampling keys, passed through untouched (not used here): so that a stock scheduler made with
# ``from_config(pipe.scheduler.config)`` samples as the teacher's did (SD's clip_sample=False, steps_offset, spacing ...).
# Stored only when given.
TEACHER_SAMPLER_KEYS = ("clip_sample", "clip_sample_range", "set_alpha_to_one", "steps_offset", "timestep_spacing", "thresholding",
                        "sample_max_value", "skip_prk_steps", "interpolation_type", "use_karras_sigmas", "timestep_type")
_SOURCE = Path(__file__)  # this file: copied beside every saved config, so a re-saved pipeline still loads without rectflow


@dataclass
class PeRFlowSchedulerOutput(BaseOutput):
    """``prev_sample`` (B, C, H, W): the sample at the next grid time; ``pred_original_sample``: the x0 implied by
    the model output on the window path at this time."""

    prev_sample: torch.Tensor
    pred_original_sample: torch.Tensor | None = None


def _betas(num_train_timesteps: int, beta_start: float, beta_end: float, beta_schedule: str, trained_betas: Any) -> np.ndarray:
    if trained_betas is not None:
        return np.asarray(trained_betas, dtype=np.float64)
    if beta_schedule == "linear":
        return np.linspace(beta_start, beta_end, num_train_timesteps, dtype=np.float64)
    if beta_schedule == "scaled_linear":
        return np.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=np.float64) ** 2
    if beta_schedule == "squaredcos_cap_v2":
        f = lambda s: np.cos((s + 0.008) / 1.008 * np.pi / 2) ** 2  # noqa: E731
        s = np.arange(num_train_timesteps + 1) / num_train_timesteps
        return np.minimum(1 - f(s[1:]) / f(s[:-1]), 0.999)
    raise ValueError(f"PeRFlowScheduler: beta_schedule must be linear, scaled_linear or squaredcos_cap_v2, got {beta_schedule!r}")


def steps_per_window(k: int, n: int) -> list[int]:
    """n steps over k windows: window i gets n // k, plus one for i < n mod k (the official split)."""
    if n < k:
        raise ValueError(f"PeRFlowScheduler: {n} inference steps are fewer than the {k} windows; use at least {k}")
    return [n // k + (1 if i < n % k else 0) for i in range(k)]


class PeRFlowScheduler(SchedulerMixin, ConfigMixin):
    """Euler on the window path of a PeRFlow student (see the module docstring), under diffusers' scheduler contract:
    ``set_timesteps``, ``step`` (-> ``prev_sample``, ``pred_original_sample``), ``add_noise`` (img2img),
    ``scale_model_input``, ``set_begin_index``, ``init_noise_sigma``, ``order``.  ``step`` finds its place from the
    timestep itself (float, half, bfloat16 or ``int(t)`` all work) and keeps no step counter."""

    config_name = "scheduler_config.json"
    order = 1

    @register_to_config
    def __init__(self, num_train_timesteps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012, beta_schedule: str = "scaled_linear",
                 trained_betas: Any = None, shift: float | None = None, prediction_type: str = "epsilon", time_input: str | None = None,
                 windows: list[float] | None = None, window_alphas: list[float] | None = None, window_sigmas: list[float] | None = None,
                 num_time_windows: int | None = None, alphas: list[float] | None = None, sigmas: list[float] | None = None,
                 t_noise: float = 1.0, t_clean: float = 0.0, set_alpha_to_one: bool | None = None, clip_sample: bool | None = None,
                 clip_sample_range: float | None = None, steps_offset: int | None = None, timestep_spacing: str | None = None,
                 thresholding: bool | None = None, sample_max_value: float | None = None, skip_prk_steps: bool | None = None,
                 interpolation_type: str | None = None, use_karras_sigmas: bool | None = None, timestep_type: str | None = None) -> None:
        if prediction_type not in _KINDS:
            raise ValueError(f"PeRFlowScheduler: prediction_type must be one of {sorted(_KINDS)}, got {prediction_type!r}")
        official = prediction_type in OFFICIAL_PREDICTIONS
        if official and time_input not in (None, "official"):
            raise ValueError(f"PeRFlowScheduler: prediction_type {prediction_type!r} is the official repository's; it needs its time input "
                             f"(time_input='official'), not {time_input!r}: this config is another student's")
        if windows is not None and num_time_windows is not None and int(num_time_windows) != len(windows) - 1:
            raise ValueError(f"PeRFlowScheduler: num_time_windows={num_time_windows} but the config's windows are {len(windows) - 1}")
        time_input = time_input or ("official" if official else "sigma" if shift is not None else "step_index")
        if time_input not in _TIME_OFFSETS:
            raise ValueError(f"PeRFlowScheduler: time_input must be one of {sorted(_TIME_OFFSETS)}, got {time_input!r}")
        if (t_noise, t_clean) != (1.0, 0.0):
            raise ValueError(f"PeRFlowScheduler: only t_noise = 1 and t_clean = 0 are supported, got {t_noise}, {t_clean}")
        self.kind = _KINDS[prediction_type]
        self.time_offset = _TIME_OFFSETS[time_input]
        self.official_grid = time_input == "official"
        n_train = int(num_train_timesteps)
        self.betas = self.alphas = self.alphas_cumprod = None  # a flow-matching teacher has no DDPM schedule
        if shift is None:
            self.betas = torch.tensor(_betas(n_train, beta_start, beta_end, beta_schedule, trained_betas), dtype=torch.float32)
            self.alphas = 1.0 - self.betas
            self.alphas_cumprod = torch.cumprod(self.alphas.double(), 0).float()
        window_alphas = window_alphas if window_alphas is not None else alphas  # exports before rectflow 0.3 named them alphas / sigmas
        window_sigmas = window_sigmas if window_sigmas is not None else sigmas
        if windows is None:
            k = int(num_time_windows or 4)
            windows = [i / k for i in range(k + 1)]
            tau = 1.0 - np.asarray(windows)
            if shift is not None:  # a flow-matching teacher: z = (1 - sigma) x + sigma eps with sigma = tau
                window_alphas, window_sigmas = list(1.0 - tau), list(tau)
            else:  # the official knots: alphas_cumprod[N tau - 1], alphas_cumprod[0] at the data end
                abar = torch.cumprod(1 - torch.tensor(_betas(n_train, beta_start, beta_end, beta_schedule, trained_betas)), 0).numpy()
                idx = np.clip(np.round(tau * n_train).astype(np.int64) - 1, 0, n_train - 1)
                window_alphas, window_sigmas = list(np.sqrt(abar[idx])), list(np.sqrt(1 - abar[idx]))
        elif window_alphas is None or window_sigmas is None:
            raise ValueError("PeRFlowScheduler: windows need window_alphas and window_sigmas (the teacher's a, b at the boundaries)")
        self.windows = np.asarray(windows, dtype=np.float64)
        self.knot_a, self.knot_b = np.asarray(window_alphas, dtype=np.float64), np.asarray(window_sigmas, dtype=np.float64)
        k = len(self.windows) - 1
        if k < 1 or not (self.knot_a.shape == self.knot_b.shape == self.windows.shape) or not np.all(np.diff(self.windows) > 0) \
                or abs(self.windows[0]) > 1e-12 or abs(self.windows[-1] - 1) > 1e-12:
            raise ValueError(f"PeRFlowScheduler: windows must increase from 0 to 1 with one a and b knot each, got {list(self.windows)}")
        if self.official_grid and not np.allclose(self.windows, np.linspace(0, 1, k + 1), atol=1e-9):
            raise ValueError("PeRFlowScheduler: time_input='official' needs uniform windows (the official repository's)")
        self.num_windows = k
        self.init_noise_sigma = 1.0
        self._begin_index: int | None = None
        unset = [key for key in TEACHER_SAMPLER_KEYS if self.config.get(key) is None]
        if unset:  # an unset teacher key is left out, so a stock scheduler built from this config takes its own default
            self._internal_dict = FrozenDict({key: v for key, v in self._internal_dict.items() if key not in unset})
        self.set_timesteps(k)

    # ----- the grid
    @property
    def begin_index(self) -> int | None:
        return self._begin_index

    def set_begin_index(self, begin_index: int = 0) -> None:
        """Where img2img starts in ``timesteps`` (kept for diffusers' contract; ``step`` finds its place from the timestep)."""
        self._begin_index = int(begin_index)

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None) -> None:
        """``num_inference_steps`` >= K Euler steps; ``timesteps`` (float32) are the network's time inputs at each step's start."""
        n = int(num_inference_steps)
        per = steps_per_window(self.num_windows, n)
        grid, window = [], []
        n_train = self.config.num_train_timesteps
        k = self.num_windows
        for i, m in enumerate(per):
            lo, hi = self.windows[i], self.windows[i + 1]
            if self.official_grid:  # the official scheduler: int(N tau), tau = linspace(start, end, m, endpoint=False), start = 1. * (K - i) / K
                tau = np.linspace(1.0 * (k - i) / k, 1.0 * (k - i - 1) / k, num=m, endpoint=False)
                ints = (tau * n_train).astype(np.int64)
                grid += list(1.0 - ints / n_train)
                window += [self._official_window(int(v) / n_train) for v in ints]
            else:
                grid += list(lo + (hi - lo) * np.arange(m) / m)
                window += [i] * m
        self.grid = np.asarray(grid + [1.0], dtype=np.float64)
        self.step_window = window
        self.num_inference_steps = n
        self.timesteps = torch.tensor((1.0 - self.grid[:-1]) * n_train + self.time_offset, dtype=torch.float32, device=device)
        a, b, _, _ = self.coefficients(self.grid)
        self.sigmas = torch.tensor(b, dtype=torch.float32)  # the noise coefficient B(t) at each grid time, n + 1 values
        self._begin_index = None

    def _official_window(self, tau: float) -> int:
        """The official scheduler's window of tau (its lookup: the first window whose end lies below tau - 0.1 / N),
        as our window index (0 at the noise end)."""
        k, n = self.num_windows, self.config.num_train_timesteps
        ends = [1.0 * (k - i - 1) / k for i in range(k)]
        idx = 0
        while idx < k - 1 and tau - 0.1 / n <= ends[idx]:
            idx += 1
        return idx

    def coefficients(self, t: np.ndarray | float, window: np.ndarray | int | None = None) -> tuple[np.ndarray, ...]:
        """(A, B, A', B') of the window path at times t (float64); ``window`` picks the window (default: the one t starts)."""
        t = np.asarray(t, dtype=np.float64)
        k = np.clip(np.searchsorted(self.windows, t, side="right") - 1, 0, self.num_windows - 1) if window is None else np.asarray(window)
        t0, t1 = self.windows[k], self.windows[k + 1]
        da = (self.knot_a[k + 1] - self.knot_a[k]) / (t1 - t0)
        db = (self.knot_b[k + 1] - self.knot_b[k]) / (t1 - t0)
        return self.knot_a[k] + (t - t0) * da, self.knot_b[k] + (t - t0) * db, da, db

    # ----- finding a step from its timestep
    def index_for_timestep(self, timestep: Any) -> int:
        """The step whose timestep this is.  ``timestep`` may be the schedule's own (float32), or the same value in another dtype
        (float16 / bfloat16 / float64 / a Python number: matched within that dtype's rounding) or truncated by ``int()``; every
        element of a batch of timesteps must be the same.  A value that matches no timestep, or more than one (a half-precision
        timestep of a schedule whose steps are closer than its rounding), is refused (ValueError)."""
        try:
            ts = torch.as_tensor(timestep).reshape(-1).cpu()
        except (TypeError, ValueError, RuntimeError):
            raise ValueError(f"PeRFlowScheduler.step: the timestep must be a number or a tensor of numbers, got {timestep!r}") from None
        if ts.numel() == 0 or ts.is_complex() or ts.dtype == torch.bool:
            raise ValueError(f"PeRFlowScheduler.step: the timestep must be a real number, got {timestep!r}")
        if ts.numel() > 1 and not bool((ts == ts[0]).all()):
            raise ValueError("PeRFlowScheduler.step: a batch of different timesteps (every sample of a batch steps at the same time)")
        value = float(ts[0].double())
        if value != value or value in (float("inf"), float("-inf")):
            raise ValueError(f"PeRFlowScheduler.step: the timestep is {value}")
        sched = self.timesteps.double().cpu()
        if ts.is_floating_point():  # the schedule's timesteps that round to this value in its dtype
            hits = torch.nonzero(sched.to(ts.dtype).double() == value).flatten()
        else:
            hits = torch.empty(0, dtype=torch.long)
        if hits.numel() == 0 and value == round(value):  # int(t): truncation by less than one
            hits = torch.nonzero((sched - value >= 0) & (sched - value < 1)).flatten()
        if hits.numel() != 1:
            what = "matches none" if hits.numel() == 0 else f"matches {hits.numel()} (its dtype cannot tell them apart; pass the scheduler's own float32 timesteps)"
            raise ValueError(f"PeRFlowScheduler.step: timestep {value} ({ts.dtype}) {what} of this schedule's {self.num_inference_steps} timesteps "
                             f"({[round(float(x), 3) for x in sched[:6]]}...)")
        return int(hits[0])

    # ----- the step
    def _velocity(self, out: torch.Tensor, z: torch.Tensor, t: float, k: int) -> torch.Tensor:
        a, b, da, db = (float(v) for v in self.coefficients(t, k))
        if self.kind == "eps":
            return da * (z - b * out) / a + db * out
        if self.kind == "x0":
            return da * out + db * (z - a * out) / b
        if self.kind == "v":
            n2 = a * a + b * b
            return da * (a * z - b * out) / n2 + db * (b * z + a * out) / n2
        if self.kind == "u":
            return -out
        # diff_eps: the window as its own diffusion from z_start = g z_end + sqrt(1 - g^2) eps
        t0, t1 = self.windows[k], self.windows[k + 1]
        g = self.knot_a[k] / self.knot_a[k + 1]
        lam_s, eta_s = 1.0 / g, -np.sqrt(1.0 - g * g) / g
        span, into = t1 - t0, t - t0
        den = lam_s * into + (span - into)
        z_end = (lam_s * span / den) * z + (eta_s * (span - into) / den) * out
        return (z_end - z) / (t1 - t)

    def step(self, model_output: torch.Tensor, timestep: Any, sample: torch.Tensor, return_dict: bool = True,
             **kwargs: Any) -> PeRFlowSchedulerOutput | tuple[torch.Tensor, torch.Tensor]:
        """One Euler step of the window path from this timestep's grid time to the next (in float32 whatever the
        pipeline's dtype, as diffusers' schedulers upcast)."""
        i = self.index_for_timestep(timestep)
        t, t_next, k = float(self.grid[i]), float(self.grid[i + 1]), self.step_window[i]
        z = sample.float()
        v = self._velocity(model_output.float(), z, t, k)
        a, b, da, db = (float(x) for x in self.coefficients(t, k))
        x0 = (db * z - b * v) / (a * db - b * da)  # solves z = A x + B eps, v = A' x + B' eps
        prev = (z + (t_next - t) * v).to(sample.dtype)
        x0 = x0.to(sample.dtype)
        return PeRFlowSchedulerOutput(prev_sample=prev, pred_original_sample=x0) if return_dict else (prev, x0)

    def scale_model_input(self, sample: torch.Tensor, timestep: Any = None) -> torch.Tensor:
        return sample

    def time_of(self, timesteps: torch.Tensor) -> np.ndarray:
        """Rectflow times t of timesteps (B,): grid times where they are this schedule's, else N (1 - t) + offset solved for t."""
        ts = torch.as_tensor(timesteps).reshape(-1).double().cpu().numpy()
        sched = self.timesteps.double().cpu().numpy()
        t = 1.0 - (ts - self.time_offset) / self.config.num_train_timesteps
        for j, v in enumerate(ts):
            hit = np.nonzero(np.abs(sched - v) < 1e-4)[0]
            if hit.size:
                t[j] = self.grid[hit[0]]
        return np.clip(t, 0.0, 1.0)

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """z = A(t) x + B(t) eps on the window path at each timestep's time (B,): the sample the student expects
        there (img2img starts from it); at a window boundary A, B are the teacher's own coefficients."""
        a, b, _, _ = self.coefficients(self.time_of(timesteps))
        shape = (-1,) + (1,) * (original_samples.dim() - 1)
        a = torch.as_tensor(np.atleast_1d(a), dtype=torch.float32, device=original_samples.device).reshape(shape)
        b = torch.as_tensor(np.atleast_1d(b), dtype=torch.float32, device=original_samples.device).reshape(shape)
        return (a * original_samples.float() + b * noise.float()).to(original_samples.dtype)

    def scale_noise(self, sample: torch.Tensor, timestep: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """Flow-matching pipelines' name for :meth:`add_noise` (SD3 img2img calls it as ``scale_noise(sample, timestep, noise)``)."""
        if noise is None:
            raise ValueError("PeRFlowScheduler.scale_noise needs the noise")
        return self.add_noise(sample, noise, torch.as_tensor(timestep).reshape(-1).expand(sample.shape[0]))

    # ----- saving: the code travels with the config
    def save_pretrained(self, save_directory: str | Path, push_to_hub: bool = False, **kwargs: Any) -> None:
        """``scheduler_config.json`` and this scheduler's code (``scheduling_perflow.py``) in ``save_directory``, so a pipeline
        saved again (``pipe.save_pretrained``) still loads with ``trust_remote_code=True`` and no rectflow."""
        super().save_pretrained(save_directory, push_to_hub=push_to_hub, **kwargs)
        target = Path(save_directory) / _SOURCE.name
        if target.resolve() != _SOURCE.resolve():
            shutil.copyfile(_SOURCE, target)

    def __len__(self) -> int:
        return self.config.num_train_timesteps


# diffusers names a component in model_index.json by its class's module; under the module name of the custom component
# (the file's own name), a pipeline saved again writes ["scheduling_perflow", "PeRFlowScheduler"] as the export did.
PeRFlowScheduler.__module__ = _SOURCE.stem
