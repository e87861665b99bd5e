"""A small, exact-resume trainer for velocity fields.

The trainer knows nothing about flows: it optimises ``objective.loss(model, batch)`` on
batches from ``objective.draw(n, generator, device)``.  Batch k is drawn from a generator
seeded by (seed, k) alone, so a run resumed from a checkpoint sees exactly the batches an
uninterrupted run would, and ends with bitwise-identical weights on the same machine.
Batches can be drawn ahead by DataLoader worker processes (``workers``), which hides
CPU-heavy couplings such as exact minibatch OT behind the training step.

Checkpoints are single safetensors files (model, EMA, optimizer state) with JSON metadata;
``metrics.jsonl`` gets one row per ``log_every`` steps: the mean loss and time per step over the
``steps`` steps the row covers (fewer than ``log_every`` after a resume mid-window).  ``loss`` is
the objective's value, for the library's objectives the per-sample sum of squares over the d
values of a sample (the paper's ||.||^2); ``loss_per_dim`` is it divided by d (the per-coordinate
mean squared error other libraries log), d read off the batch (:func:`values_per_sample`).

Speed knobs (all off by default, all keep the resume design): bf16 autocast (``precision``),
TF32 matmuls/convolutions on CUDA (``tf32``, set only while ``fit`` runs), channels-last memory
format (``channels_last``), ``torch.compile`` (``compile``), fused AdamW on CUDA, and a
power-function EMA (``ema_kind = "power"``, Karras et al. 2024) whose averaging window is a fixed
fraction of the run, so it suits short runs.

Data-parallel training: under ``torchrun --nproc_per_node=N`` (WORLD_SIZE > 1) the trainer joins
the process group, every rank draws the same global batch k and trains on its slice through
DistributedDataParallel (see :mod:`rectflow.engine.distributed`); N ranks with global batch B equal one
process with batch B.  Only rank 0 writes checkpoints and metrics.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import pickle
import signal
import threading
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from rectflow.engine import distributed as dist_utils
from rectflow.engine.checkpoint import NonFiniteWeightsError, check_run_record, checkpoint_path, list_checkpoints, load_optimizer_state, load_weights, read_checkpoint, save_checkpoint
from rectflow.engine.hardware import PRECISIONS, precision_note, resolve_device, resolve_precision, resolve_threads, torch_threads
from rectflow.engine.io import append_jsonl, atomic_path, make_dirs, read_jsonl
from rectflow.errors import CheckpointError, ConfigError, OutputError
from rectflow.protocols import Objective

__all__ = ["TrainConfig", "EMA", "Trainer", "TimeBudget", "step_generator", "resolve_device", "lr_at", "values_per_sample"]

@dataclass
class TrainConfig:
    """Training hyper-parameters (all plain values, so they round-trip through YAML/JSON)."""

    steps: int = 5000
    batch_size: int = 256
    lr: float = 1e-3
    optimizer: str = "adam"  # adam | adamw
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 0
    lr_schedule: str = "constant"  # constant | cosine (decay to lr_min after warmup)
    lr_min: float = 0.0
    grad_clip: float = 1.0  # max global grad norm; 0 disables
    ema_decay: float = 0.999  # 0 disables; the effective decay warms up as min(decay, (1 + k) / (10 + k))
    ema_kind: str = "exponential"  # exponential (ema_decay) | power (ema_gamma; ignores ema_decay)
    ema_gamma: float = 6.94  # power EMA exponent: weights ~ step^gamma (6.94 <-> EDM2 sigma_rel 0.10)
    precision: str = "auto"  # auto | fp32 | bf16: bf16 autocast of the loss computation (weights stay fp32); auto = bf16 where it is native
    threads: int | None = None  # torch threads while training; None = auto (the cores shared by this machine's ranks, one left to workers)
    tf32: bool = True  # allow TF32 matmuls/convolutions on CUDA while training
    channels_last: bool = False  # channels-last memory format for the model and 4-D batch tensors
    compile: bool = False  # torch.compile the model for training
    sample_every: int = 0  # write a sample grid every so many steps (image data; 0 = never)
    seed: int = 0
    log_every: int = 100
    ckpt_every: int = 1000
    keep_checkpoints: int = 2
    workers: int | None = None  # DataLoader processes drawing batches ahead; None = auto (1 for heavy couplings)
    device: str = "auto"  # auto (cuda, else mps, else cpu) | cpu | cuda | cuda:N | mps
    progress: bool = True

    def validate(self) -> None:
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ConfigError(f"train.{msg}")

        need(isinstance(self.steps, int) and self.steps >= 1, f"steps must be an integer >= 1, got {self.steps!r}")
        need(isinstance(self.batch_size, int) and self.batch_size >= 1, f"batch_size must be an integer >= 1, got {self.batch_size!r}")
        for name in ("lr", "lr_min", "weight_decay", "grad_clip", "ema_decay", "ema_gamma"):
            v = getattr(self, name)
            need(isinstance(v, (int, float)) and math.isfinite(v), f"{name} must be a finite number, got {v!r}")
        need(self.lr > 0, f"lr must be > 0, got {self.lr}")
        need(0 <= self.lr_min <= self.lr, f"lr_min must lie in [0, lr = {self.lr}], got {self.lr_min}")
        need(self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}")
        need(self.optimizer in ("adam", "adamw"), f"optimizer must be one of ['adam', 'adamw'], got {self.optimizer!r}")
        need(self.lr_schedule in ("constant", "cosine"), f"lr_schedule must be one of ['constant', 'cosine'], got {self.lr_schedule!r}")
        need(0 <= self.ema_decay < 1, f"ema_decay must lie in [0, 1), got {self.ema_decay}")
        need(self.grad_clip >= 0, f"grad_clip must be >= 0, got {self.grad_clip}")
        need(self.warmup_steps >= 0, f"warmup_steps must be >= 0, got {self.warmup_steps}")
        need(self.log_every >= 1, f"log_every must be >= 1, got {self.log_every}")
        need(self.ckpt_every >= 1, f"ckpt_every must be >= 1, got {self.ckpt_every}")
        need(self.keep_checkpoints >= 1, f"keep_checkpoints must be >= 1, got {self.keep_checkpoints}")
        need(self.workers is None or self.workers >= 0, f"workers must be >= 0 or null (auto), got {self.workers}")
        need(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), f"betas must be two numbers in [0, 1), got {self.betas}")
        need(self.ema_kind in ("exponential", "power"), f"ema_kind must be one of ['exponential', 'power'], got {self.ema_kind!r}")
        need(self.ema_gamma > 0, f"ema_gamma must be > 0, got {self.ema_gamma}")
        need(self.precision in PRECISIONS, f"precision must be one of {list(PRECISIONS)}, got {self.precision!r}")
        need(self.threads is None or (isinstance(self.threads, int) and not isinstance(self.threads, bool) and self.threads >= 1),
             f"threads must be an integer >= 1 or null (auto), got {self.threads!r}")
        need(isinstance(self.sample_every, int) and self.sample_every >= 0, f"sample_every must be an integer >= 0, got {self.sample_every!r}")

    @property
    def uses_ema(self) -> bool:
        """EMA weights are kept when ema_decay > 0 or the power EMA is chosen."""
        return self.ema_decay > 0 or self.ema_kind == "power"


def step_generator(seed: int, step: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator whose stream depends only on (seed, step): splitmix64 of the pair."""
    z = (seed * 0x9E3779B97F4A7C15 + step + 0x632BE59BD9B4E019) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    z ^= z >> 31
    return torch.Generator(device=device).manual_seed(z & 0x7FFFFFFFFFFFFFFF)


def lr_at(cfg: TrainConfig, step: int) -> float:
    """Learning rate for 0-based step ``step``: linear warmup, then constant or cosine decay."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "cosine":
        span = max(1, cfg.steps - cfg.warmup_steps)
        frac = min(1.0, (step - cfg.warmup_steps) / span)
        return cfg.lr_min + 0.5 * (cfg.lr - cfg.lr_min) * (1 + math.cos(math.pi * frac))
    return cfg.lr


class EMA:
    """Moving average of a model's floating-point parameters and buffers.

    ``kind="exponential"``: after 0-based step k, decay d_k = min(decay, (1 + k) / (10 + k)).
    ``kind="power"``: d_k = (1 - 1/(k + 1))^(gamma + 1) (EDM2's power-function EMA): the average
    weights the state after step j by about j^gamma, a window proportional to the run's length,
    so it suits short runs; the first update copies the weights.
    """
    def __init__(self, model: nn.Module, decay: float, kind: str = "exponential", gamma: float = 6.94) -> None:
        if kind not in ("exponential", "power"):
            raise ConfigError(f"EMA kind must be 'exponential' or 'power', got {kind!r}")
        self.decay, self.kind, self.gamma = decay, kind, gamma
        self.model = _clone_model(model)
        self._src = [p for p in _float_tensors(model)]
        self._dst = [p for p in _float_tensors(self.model)]

    def decay_at(self, step: int) -> float:
        """The decay applied by the update after 0-based step ``step``."""
        if self.kind == "power":
            return (1 - 1 / (step + 1)) ** (self.gamma + 1)
        return min(self.decay, (1 + step) / (10 + step))

    @torch.no_grad()
    def update(self, step: int) -> None:
        torch._foreach_lerp_(self._dst, self._src, 1 - self.decay_at(step))


def _float_tensors(model: nn.Module) -> list[Tensor]:
    out = [p.data for p in model.parameters() if p.is_floating_point()]
    out += [b for b in model.buffers() if b.is_floating_point()]
    return out


def _clone_model(model: nn.Module) -> nn.Module:
    clone = copy.deepcopy(model)
    for p in clone.parameters():
        p.requires_grad_(False)
    return clone.eval()


class Trainer:
    """Optimise ``objective`` for ``model``; optional ``run_dir`` for checkpoints and metrics.

    ``model_config`` is stored in every checkpoint and compared on resume, so a checkpoint
    from another model configuration is refused with a clear error.
    """
    def __init__(
        self,
        model: nn.Module,
        objective: Objective,
        config: TrainConfig,
        run_dir: str | Path | None = None,
        *,
        model_config: dict[str, Any] | None = None,
        run_record: dict[str, Any] | None = None,
        callbacks: list[Callable[["Trainer", int], None]] | None = None,
    ) -> None:
        config.validate()
        if not isinstance(objective, Objective):
            raise TypeError(f"{type(objective).__name__} is not an objective: it needs draw(n, generator, device), loss(model, batch) and a bool attribute 'heavy_draw'")
        self.cfg = config
        dist_utils.check_divisible(config.batch_size, dist_utils.planned_world_size())  # before any rendezvous
        self.dist = dist_utils.init_from_env(device=None if config.device == "auto" else config.device)
        self.local_batch = dist_utils.check_divisible(config.batch_size, self.dist.world_size)
        self.device = resolve_device(config.device)
        if self.device.type == "cuda" and self.device.index is None and self.dist.world_size > 1:
            self.device = torch.device("cuda", self.dist.local_rank)
        self.precision = resolve_precision(config.precision, self.device)  # what autocast runs: "auto" resolved on this device
        note = precision_note(self.precision, self.device)
        if note:
            warnings.warn(note, UserWarning, stacklevel=2)
        # auto threads: under torchrun each rank takes its share of the cores (torchrun itself pins every rank to 1 thread);
        # alone, the process's own count, less a core for DataLoader workers (never raised above what the caller set)
        auto = resolve_threads(None, workers=config.workers or 0)
        self.threads = config.threads or (auto if "LOCAL_WORLD_SIZE" in os.environ else min(torch.get_num_threads(), auto))
        self.model = model.to(self.device)
        if config.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.objective = objective
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.model_config = model_config or {}
        self.run_record = run_record  # what the run is; stored in checkpoints and compared on resume
        self.callbacks = callbacks or []
        opt_cls = torch.optim.AdamW if config.optimizer == "adamw" else torch.optim.Adam
        kw = {"foreach": True} if self.device.type == "cpu" else {"fused": True}
        self.optimizer = opt_cls(self.model.parameters(), lr=config.lr, betas=tuple(config.betas), weight_decay=config.weight_decay, **kw)
        self.ema = EMA(self.model, config.ema_decay, config.ema_kind, config.ema_gamma) if config.uses_ema else None
        self.step = 0  # number of optimisation steps completed
        self._train_model: nn.Module | None = None  # the model the loss sees (DDP / compiled wrapper)
        self.stop_requested = False  # set by a callback to end fit() after this step (with a checkpoint)
        self._in_step = False  # inside _step: the state may be half-updated
        self._per_sample: int | None = None  # values per sample d (loss_per_dim = loss / d), read off the first batch

    # ----- checkpoints ---------------------------------------------------------------
    def checkpoints(self) -> list[Path]:
        """Existing checkpoint files, oldest first."""
        return [] if self.run_dir is None else list_checkpoints(self.run_dir)

    def save_checkpoint(self) -> Path | None:
        """Write ``checkpoints/step_XXXXXXXX.safetensors`` (rank 0 only; other ranks return None)."""
        if not self.dist.is_main:
            return None
        try:
            path = save_checkpoint(
                checkpoint_path(self.run_dir, self.step),
                model=self.model,
                step=self.step,
                model_config=self.model_config,
                ema_model=self.ema.model if self.ema is not None else None,
                optimizer=self.optimizer,
                train_config=asdict(self.cfg),
                run_record=self.run_record,
            )
        except NonFiniteWeightsError as e:
            kept = self.checkpoints()
            raise FloatingPointError(
                f"training diverged at step {self.step} ({e}); "
                + (f"the last finite checkpoint {kept[-1].name} is kept" if kept else "no checkpoint was written")
                + " (lower lr or enable grad_clip)"
            ) from None
        for old in self.checkpoints()[: -self.cfg.keep_checkpoints]:
            old.unlink(missing_ok=True)
        return path

    def load_checkpoint(self, path: str | Path) -> None:
        """Restore model, EMA, optimizer and step from a checkpoint of this model config."""
        ckpt = read_checkpoint(path, model_config=self.model_config, device=self.device)
        check_run_record(ckpt, self.run_record)
        load_weights(self.model, ckpt, ema=False)
        if self.ema is not None:
            load_weights(self.ema.model, ckpt, ema=True)
        load_optimizer_state(self.optimizer, ckpt)
        self.step = ckpt.step

    def resume(self) -> bool:
        """Load the newest readable checkpoint of ``run_dir``; False when there is none."""
        for path in reversed(self.checkpoints()):
            self.load_checkpoint(path)
            self._truncate_metrics()
            return True
        return False

    def _truncate_metrics(self) -> None:
        """Drop the log rows after the resumed step (their steps are trained again).  A log holding
        lines that are not rows is refused with an error naming the file and line, not rewritten
        (nothing in it is lost); only a torn last line, left by a kill mid-append, is dropped."""
        if self.run_dir is None or not self.dist.is_main:
            return
        path = self.run_dir / "metrics.jsonl"
        try:
            rows = read_jsonl(path, strict=True, check=_log_row_problem)
        except CheckpointError as e:
            raise CheckpointError(f"{e}; the training log is damaged: repair it or move it away to resume") from None
        rows = [r for r in rows if r["step"] <= self.step]

        with atomic_path(path) as tmp:
            tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))

    # ----- training ------------------------------------------------------------------
    def _num_workers(self) -> int:
        if self.cfg.workers is not None:
            return self.cfg.workers
        if self.device.type == "cuda":  # forked workers cannot touch CUDA (images kept on the GPU); draw in-process
            return 0
        heavy = self.objective.heavy_draw
        return 1 if heavy and (os.cpu_count() or 1) >= 2 else 0

    def _batches(self, start: int) -> Iterator[Any]:
        """Batches for steps start .. steps-1: the global batch k drawn from the CPU generator
        step_generator(seed, k), then this rank's slice of it.  Without workers the draw is
        materialised directly on the training device (samplers keep their randomness a function of
        the generator); with ``workers`` > 0 it is drawn in worker processes on the CPU."""
        workers = self._num_workers()
        rank, world = self.dist.rank, self.dist.world_size
        cl = self.cfg.channels_last
        if workers == 0:
            for k in range(start, self.cfg.steps):
                batch = self.objective.draw(self.cfg.batch_size, step_generator(self.cfg.seed, k), self.device)
                yield _to_device(dist_utils.slice_batch(batch, rank, world), self.device, cl)
            return
        loader = DataLoader(
            _StepDraws(self.objective, self.cfg.batch_size, self.cfg.seed, rank, world),
            batch_size=None,
            sampler=range(start, self.cfg.steps),
            num_workers=workers,
            prefetch_factor=4,
            pin_memory=self.device.type == "cuda",
        )
        for batch in loader:
            if isinstance(batch, _FailedDraw):
                raise batch.error
            yield _to_device(batch, self.device, cl)

    def _model_for_loss(self) -> nn.Module:
        """The module the objective calls: DDP-wrapped under a process group, compiled on request."""
        if self._train_model is None:
            m: nn.Module = self.model
            if self.dist.world_size > 1:
                ids = [self.device.index] if self.device.type == "cuda" else None
                # buffers are broadcast from rank 0 before every forward only when some can change (BatchNorm
                # statistics); the library's networks hold only constant buffers
                changing = any(getattr(mod, "track_running_stats", False) for mod in m.modules())
                m = DistributedDataParallel(m, device_ids=ids, broadcast_buffers=changing)
            if self.cfg.compile:
                m = torch.compile(m, dynamic=False)  # a fixed batch: a symbolic batch dimension only costs speed
            self._train_model = m
        return self._train_model

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.precision == "bf16":
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _step(self, batch: Any, train_model: nn.Module, params: list[Tensor]) -> Tensor:
        """One optimisation step k -> k + 1 (weights, optimizer, EMA, then the counter); returns the loss."""
        k = self.step
        self._in_step = True
        for g in self.optimizer.param_groups:
            g["lr"] = lr_at(self.cfg, k)
        with self._autocast():
            out = self.objective.loss(train_model, batch)
        self.optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        if self.cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, self.cfg.grad_clip, foreach=True)
        self.optimizer.step()
        if self.ema is not None:
            self.ema.update(k)
        self.step = k + 1
        self._in_step = False
        return out.loss.detach()

    def fit(self, resume: bool = True) -> "Trainer":
        """Train until ``cfg.steps`` steps are done (continuing from the newest checkpoint if
        ``resume``).  Ctrl-C (SIGINT) is acted on between steps: the state after the last completed
        step is saved, then KeyboardInterrupt is raised (a second Ctrl-C stops at once, keeping the
        last saved checkpoint)."""
        cfg = self.cfg
        if self.run_dir is not None:
            make_dirs(self.run_dir)
            log = self.run_dir / "metrics.jsonl"
            if log.is_symlink():  # never read through, replaced or appended to: refused before any step
                raise OutputError(f"{log}: is a symbolic link; rectflow does not follow links inside its directories (remove it)")
            if resume:
                self.resume()
        if self.step >= cfg.steps:
            return self
        self.model.train()
        params = [p for p in self.model.parameters() if p.requires_grad]
        train_model = self._model_for_loss()
        loss_sum = torch.zeros((), device=self.device)
        n_in_window, t_window, saved = 0, time.perf_counter(), self.step
        self._per_sample = None  # values per sample d, from the first batch
        bar = tqdm(total=cfg.steps, initial=self.step, disable=not (cfg.progress and self.dist.is_main) or None, desc="train", unit="step", dynamic_ncols=True)
        batches = self._batches(self.step)
        with _SigintLatch() as interrupt, _tf32(cfg.tf32 if self.device.type == "cuda" else None), torch_threads(self.threads):
            try:
                for batch in batches:
                    if self._per_sample is None:
                        self._per_sample = values_per_sample(batch)
                    loss_sum += self._step(batch, train_model, params)
                    n_in_window += 1
                    bar.update(1)
                    if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                        self._log(float(dist_utils.all_reduce_mean(loss_sum)) / n_in_window, n_in_window, t_window, bar)
                        loss_sum.zero_()
                        n_in_window, t_window = 0, time.perf_counter()
                    if self.run_dir is not None and (self.step % cfg.ckpt_every == 0 or self.step == cfg.steps):
                        self.save_checkpoint()
                        saved = self.step
                    for cb in self.callbacks:
                        cb(self, self.step)
                    if self.stop_requested or interrupt.fired:  # a callback ended the run (TimeBudget), or Ctrl-C
                        if n_in_window:
                            self._log(float(dist_utils.all_reduce_mean(loss_sum)) / n_in_window, n_in_window, t_window, bar)
                        if self.run_dir is not None and saved != self.step:
                            self.save_checkpoint()
                        if interrupt.fired:
                            raise KeyboardInterrupt
                        break
            except KeyboardInterrupt:
                # raised between steps (by a callback): save that step; mid-step or after the save
                # above: the last saved checkpoint stands, as after kill -9
                if self.run_dir is not None and saved != self.step and not self._in_step and not interrupt.fired:
                    self.save_checkpoint()
                raise
            finally:
                bar.close()
                batches.close()
        return self

    def _log(self, mean_loss: float, n: int, t_window: float, bar) -> None:
        if not math.isfinite(mean_loss):
            raise FloatingPointError(
                f"training diverged: loss is {mean_loss} at step {self.step} (lower lr or enable grad_clip); "
                "the last checkpoint is kept"
            )
        # "steps": how many steps the row averages, (step - steps, step]; fewer than log_every after a
        # resume mid-window or a stop, so a reader never takes a partial window for a whole one
        row = {"step": self.step, "steps": n, "loss": mean_loss}
        if self._per_sample:
            row["loss_per_dim"] = mean_loss / self._per_sample
        row.update({"lr": lr_at(self.cfg, self.step - 1), "ms_per_step": 1e3 * (time.perf_counter() - t_window) / n})
        bar.set_postfix(loss=f"{mean_loss:.4f}", **({"loss_per_dim": f"{row['loss_per_dim']:.4g}"} if "loss_per_dim" in row else {}))
        if self.run_dir is not None and self.dist.is_main:
            append_jsonl(self.run_dir / "metrics.jsonl", row)

    @property
    def eval_model(self) -> nn.Module:
        """The EMA model if EMA is on, else the trained model (in eval mode)."""
        return (self.ema.model if self.ema is not None else self.model).eval()


class TimeBudget:
    """Trainer callback: end training (with a checkpoint) once ``seconds`` of wall time have passed
    since this object was made, checking every ``every`` steps.  Under DDP the ranks decide
    together (any rank over budget stops all), so they stop at the same step."""
    def __init__(self, seconds: float, every: int = 20) -> None:
        if not seconds > 0 or every < 1:
            raise ConfigError(f"time budget: seconds must be > 0 and every >= 1, got {seconds}, {every}")
        self.seconds, self.every = float(seconds), int(every)
        self.t0 = time.perf_counter()

    def __call__(self, trainer: "Trainer", step: int) -> None:
        if step % self.every:
            return
        over = time.perf_counter() - self.t0 > self.seconds
        if dist_utils.is_distributed():
            flag = torch.tensor(float(over), device=trainer.device)
            over = float(dist_utils.all_reduce_mean(flag)) > 0
        if over:
            trainer.stop_requested = True


class _SigintLatch:
    """While active (main thread only), the first SIGINT only sets ``fired``, so the trainer stops
    between steps with a consistent checkpoint; a second SIGINT raises KeyboardInterrupt at once."""

    def __enter__(self) -> "_SigintLatch":
        self.fired, self._old = False, None
        if threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.fired:
            raise KeyboardInterrupt
        self.fired = True

    def __exit__(self, *exc: Any) -> None:
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)


class _StepDraws(Dataset):
    """Map-style view of the batch stream: item k is this rank's slice of the global batch of step k
    (picklable for workers)."""

    def __init__(self, objective: Objective, batch_size: int, seed: int, rank: int = 0, world_size: int = 1) -> None:
        self.objective, self.batch_size, self.seed = objective, batch_size, seed
        self.rank, self.world_size = rank, world_size

    def __len__(self) -> int:
        return 2**62

    def __getitem__(self, k: int) -> Any:
        try:
            batch = self.objective.draw(self.batch_size, step_generator(self.seed, k), torch.device("cpu"))
        except Exception as e:  # any error: carried to the main process and raised there (see _FailedDraw)
            return _FailedDraw(e)
        return dist_utils.slice_batch(batch, self.rank, self.world_size)


def values_per_sample(batch: Any) -> int | None:
    """d, the values in one sample of a batch: of its first tensor with a batch dimension and more,
    (B, ...) -> prod(...), looking into tuples (a NamedTuple batch such as FlowBatch(x0, x1, t));
    None when it has none."""
    if isinstance(batch, Tensor):
        return batch[0].numel() if batch.dim() >= 2 and batch.shape[0] > 0 else None
    if isinstance(batch, (tuple, list)):
        for part in batch:
            d = values_per_sample(part)
            if d is not None:
                return d
    return None


def _log_row_problem(row: dict[str, Any]) -> str | None:
    """Why ``row`` is not a row of metrics.jsonl (None when it is one)."""
    step = row.get("step")
    return None if isinstance(step, int) and not isinstance(step, bool) else f"not a log row (step {step!r} is not an integer)"


class _FailedDraw:
    """An exception raised while drawing a batch in a worker process, sent to the main process
    to be raised there as itself: DataLoader would re-raise it as a new exception whose message
    holds the worker's whole traceback."""

    def __init__(self, error: Exception) -> None:
        try:
            pickle.loads(pickle.dumps(error))
        except Exception:  # an exception that cannot cross processes: keep its text
            error = RuntimeError(f"{type(error).__name__} while drawing a batch: {error}")
        self.error = error


@contextlib.contextmanager
def _tf32(allowed: bool | None) -> Iterator[None]:
    """Set CUDA's TF32 flags (matmuls and cuDNN convolutions) to ``allowed`` inside the block and
    restore them after; None leaves them alone (CPU).  False matters too: PyTorch's default lets
    cuDNN use TF32."""
    if allowed is None:
        yield
        return
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = bool(allowed)
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def _to_device(batch: Any, device: torch.device, channels_last: bool = False) -> Any:
    if isinstance(batch, Tensor):
        if batch.device != device:
            batch = batch.to(device, non_blocking=True)
        if channels_last and batch.dim() == 4 and batch.is_floating_point():
            batch = batch.contiguous(memory_format=torch.channels_last)
        return batch
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):
        return type(batch)(*(_to_device(b, device, channels_last) for b in batch))
    if isinstance(batch, (tuple, list)):
        return type(batch)(_to_device(b, device, channels_last) for b in batch)
    return batch
