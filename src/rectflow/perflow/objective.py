"""PeRFlow's training objective (theory §5.2-5.3): real data noised to a window's start, the teacher's
solve across the window, and the straight-line regression inside it (Trainer-compatible)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from rectflow.diffusion.parameterizations import convert
from rectflow.draws import rand, randint, randn
from rectflow.errors import ConfigError, check_fraction
from rectflow.flow.guidance import NULL_LABEL, drop_conditions
from rectflow.flow.losses import LossOutput, per_sample_mse
from rectflow.flow.paths import exact_dtype, expand_like
from rectflow.perflow.student import PeRFlowStudent
from rectflow.perflow.teacher import Teacher
from rectflow.perflow.windows import validate_windows, window_index

__all__ = ['PeRFlowBatch', 'PeRFlowObjective', 'PairsObjective', 'straight_loss']


# ----------------------------------------------------------------------------------------- training
class PeRFlowBatch(NamedTuple):
    """``z``: points on the windows' straight lines; ``t`` (B,); ``target``: velocity (B, ...);
    ``cond``: the examples' conditions (None: unconditional)."""

    z: Tensor
    t: Tensor
    target: Tensor
    cond: Any = None


class PeRFlowObjective:
    """Piecewise reflow (theory §5.2-5.3) for :class:`rectflow.engine.trainer.Trainer`.

    Args:
        teacher: the frozen :class:`Teacher`.
        data: ``sample(n, generator=, device=) -> x`` of real data (e.g. :class:`ImageDataset`), or
            ``-> (x, cond)`` for a conditional teacher (labels, text embeddings: batch dimension first),
            whose window solve and student then see each example's condition.
        boundaries: window boundaries (from :func:`make_windows`).
        solver_steps: DDIM steps of the teacher across one window (its NFE per example).
        loss_space: "native" (MSE of the student's own output, e.g. eps, against the target converted
            on the window path), "velocity", or a kind ("x0", "eps", "v"); see :func:`straight_loss`.
        t_margin: keeps the training t inside [t_{k-1} + margin dt, t_k - margin dt).
        start_fraction: share of each batch placed exactly at its window's start (the rest uniform in
            the window, as in the paper).  One Euler step per window only reads the student there;
            the interior of a window asks for E[z_end - z_start | z_t], which a small network learns
            slowly and at the expense of the start, so K-step students train faster with a share
            here (0 = the paper's uniform t; use 0 when sampling with several steps per window).
        p_uncond: condition dropout (theory §5.5): each example's condition is replaced by
            ``null_cond`` with this probability before the teacher's solve, so the null rows carry
            the teacher's unconditional flow and the student keeps a branch for guidance.
        null_cond: the null condition (NULL_LABEL for labels; the empty prompt's embedding, (L, D), for text).
        target: "teacher" (the paper's: z_end is the teacher's solve across the window) or "data"
            (fine-tuning without a teacher, e.g. on a new data domain: z_end = a(t_k) x + b(t_k) eps,
            the forward process of the same data and noise at the window's end, so each window's line
            is the window path between two noised copies of x and no network is called).
        window_weights: optional loss weight per window (K non-negative numbers, not all 0),
            normalised to mean 1, so the loss scale does not change; None weighs windows equally.
    Each draw costs ``solver_steps`` teacher calls on the whole batch; ``teacher_nfe`` counts network
    evaluations per example (a guided teacher's call counts 2).
    """

    heavy_draw = False

    def __init__(self, teacher: Teacher, data: Any, boundaries: Tensor, *, solver_steps: int = 4,
                 loss_space: str = "native", t_margin: float = 1e-4, start_fraction: float = 0.0,
                 p_uncond: float = 0.0, null_cond: Any = NULL_LABEL, target: str = "teacher",
                 window_weights: Sequence[float] | None = None) -> None:
        if solver_steps < 1:
            raise ConfigError(f"perflow.solver_steps must be >= 1, got {solver_steps}")
        check_fraction(start_fraction, "perflow.start_fraction")
        check_fraction(p_uncond, "perflow.p_uncond")
        if target not in ("teacher", "data"):
            raise ConfigError(f"perflow.target must be 'teacher' (the teacher's window solve) or 'data' (no teacher), got {target!r}")
        self.start_fraction, self.p_uncond, self.null_cond, self.target = float(start_fraction), float(p_uncond), null_cond, target
        _check_loss_space(loss_space)
        self.teacher, self.data, self.solver_steps = teacher, data, int(solver_steps)
        self.boundaries, self.loss_space, self.t_margin = validate_windows(boundaries), loss_space, float(t_margin)
        self.window_weights = _check_window_weights(window_weights, self.boundaries.numel() - 1)
        self.teacher_nfe = 0  # teacher evaluations per example, summed over draws

    @torch.no_grad()
    def draw(self, n: int, generator: torch.Generator, device) -> PeRFlowBatch:
        x = self.data.sample(n, generator=generator, device=device)
        x, cond = x if isinstance(x, tuple) else (x, None)
        eps = randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        k = randint(self.boundaries.numel() - 1, n, generator=generator, device=x.device)
        u = rand(n, generator=generator, dtype=exact_dtype(generator.device)).to(x.device, exact_dtype(x.device))
        if self.p_uncond > 0:  # before the teacher's solve: a dropped row follows the unconditional flow
            if cond is None:
                raise ConfigError("perflow.p_uncond > 0 needs conditional data (sample(n) -> (x, cond))")
            cond = drop_conditions(cond, self.null_cond, self.p_uncond, generator)
        b = self.boundaries.to(x.device, exact_dtype(x.device))
        t0, t1 = b[k], b[k + 1]
        c0 = self.teacher.path.coefficients(t0.to(x.dtype))
        z0 = expand_like(c0.a, x) * x + expand_like(c0.b, x) * eps  # forward process to the window start
        if self.target == "data":  # no teacher: the same data and noise, forward-processed to the window's end
            c1 = self.teacher.path.coefficients(t1.to(x.dtype))
            z1 = expand_like(c1.a, x) * x + expand_like(c1.b, x) * eps
        else:
            z1 = self.teacher.ddim(z0, t0, t1, self.solver_steps, cond)  # teacher ODE across this one window
            self.teacher_nfe += self.solver_steps * n * (1 if cond is None else self.teacher.nfe_per_eval)
        dt = t1 - t0
        v = (z1 - z0) / expand_like(dt.to(x.dtype), x)
        tau = (self.t_margin + u * (1 - 2 * self.t_margin)) * dt
        # t is kept in at least float32 (bf16 cannot tell windows 1e-2 apart) and clear of window_index's
        # snap to t1: in a window narrower than about 1e-2, t_margin * dt alone would round onto the next
        t_dtype = torch.promote_types(x.dtype, torch.float32)
        tau = torch.minimum(tau, dt - 16 * torch.finfo(t_dtype).eps * t1.abs().clamp_min(1.0)).clamp_min(0.0)
        if self.start_fraction > 0:
            at_start = rand(n, generator=generator, device=x.device) < self.start_fraction
            tau = torch.where(at_start, torch.zeros_like(tau), tau)
        z = z0 + expand_like(tau.to(x.dtype), x) * v
        return PeRFlowBatch(z, (t0 + tau).to(t_dtype), v, cond)

    def loss(self, model: nn.Module, batch: PeRFlowBatch) -> LossOutput:
        if self.window_weights is None:
            return straight_loss(model, batch, self.loss_space)
        w = self.window_weights.to(batch.t.device)[window_index(self.boundaries.to(batch.t.device), batch.t)]
        return straight_loss(model, batch, self.loss_space, weights=w)


def _check_window_weights(weights: Sequence[float] | None, k: int) -> Tensor | None:
    """K non-negative finite weights, not all 0, as a tensor of mean 1 (None stays None)."""
    if weights is None:
        return None
    w = torch.as_tensor(list(weights), dtype=torch.float64)
    if w.numel() != k or not torch.isfinite(w).all() or (w < 0).any() or w.sum() <= 0:
        raise ConfigError(f"perflow.window_weights must be {k} finite non-negative numbers (one per window), not all 0; got {list(weights)}")
    return w / w.mean()


LOSS_SPACES = ("native", "velocity", "x0", "eps", "v")


def _check_loss_space(loss_space: str) -> None:
    if loss_space not in LOSS_SPACES:
        raise ConfigError(f"perflow.loss_space must be one of {list(LOSS_SPACES)}, got {loss_space!r}")


def straight_loss(model: nn.Module, batch: PeRFlowBatch, loss_space: str = "native", weights: Tensor | None = None) -> LossOutput:
    """MSE of a :class:`PeRFlowStudent` against straight-line velocity targets, compared in
    ``loss_space``: "native" (the student's own output kind), "velocity", or a kind ("x0", "eps",
    "v") that both sides are converted to on the window path.  The space is the loss weighting
    over t: "x0" keeps the window ends as easy as the teacher's denoising, while eps / v / velocity
    ask for the noise near the clean end of the last window, where it is hardly predictable.
    ``weights`` (B,): per-example loss weights (the logged per-sample errors stay unweighted)."""
    _check_loss_space(loss_space)
    if isinstance(model, PeRFlowStudent) and loss_space != "velocity":
        dst = model.parameterization if loss_space == "native" else loss_space
        raw = model.raw(batch.z, batch.t, batch.cond)
        pred = raw if dst == model.parameterization else convert(raw, src=model.parameterization, dst=dst, z=batch.z, path=model.window_path, t=batch.t)
        target = convert(batch.target, src="velocity", dst=dst, z=batch.z, path=model.window_path, t=batch.t)
    else:
        pred = model(batch.z, batch.t) if batch.cond is None else model(batch.z, batch.t, batch.cond)
        target = batch.target
    err = per_sample_mse(pred, target)
    loss = err.mean() if weights is None else (weights.to(err.dtype) * err).mean()
    return LossOutput(loss, err.detach())


class PairsObjective:
    """Reflow on precomputed (noise-end, data-end) pairs (InstaFlow's 2-RF baseline): the straight line
    z_t = (1 - r) z_start + r z_end over the single window [t_0, t_1] = [0, 1] (use a K = 1 student)."""

    heavy_draw = False

    def __init__(self, z_start: Tensor, z_end: Tensor, *, loss_space: str = "native", t_margin: float = 1e-4) -> None:
        if z_start.shape != z_end.shape:
            raise ConfigError("perflow.PairsObjective: z_start and z_end must have the same shape")
        self.z_start, self.z_end, self.loss_space, self.t_margin = z_start, z_end, loss_space, float(t_margin)

    def draw(self, n: int, generator: torch.Generator, device) -> PeRFlowBatch:
        i = randint(self.z_start.shape[0], n, generator=generator, device="cpu")
        u = rand(n, generator=generator, device="cpu", dtype=torch.float64)
        z0, z1 = self.z_start[i].to(device), self.z_end[i].to(device)
        t = (self.t_margin + u * (1 - 2 * self.t_margin)).to(device)
        v = z1 - z0
        return PeRFlowBatch(z0 + expand_like(t.to(z0.dtype), z0) * v, t.to(z0.dtype), v)

    def loss(self, model: nn.Module, batch: PeRFlowBatch) -> LossOutput:
        return straight_loss(model, batch, self.loss_space)
