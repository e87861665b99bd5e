"""One-step models beyond reflow: MeanFlow and shortcut models, which learn the average velocity over
an interval (theory §2.6).

On the straight path x_t = (1 - t) x0 + t x1 the average velocity of the flow from time s to time t
is u(z, s, t) = (Phi_{s->t}(z) - z) / (t - s) for z = x_s, so one step z_t = z_s + (t - s) u(z_s, s, t)
is exact.  Differentiating (t - s) u(z_s, s, t) = int_s^t v(z_tau, tau) dtau along the flow in s gives
the MeanFlow identity

    u(z_s, s, t) = v(z_s, s) + (t - s) d/ds u(z_s, s, t),   d/ds = partial_s + v . grad_z,

whose right side is the regression target (its derivative by one forward-mode Jacobian-vector
product in the direction (v, 1, 0), under stop-gradient).  With s = t it is flow matching.

Shortcut models learn the same quantity on dyadic step sizes d without derivatives: flow matching at
d = 0, and self-consistency u(z, t, t + 2d) = (u(z, t, t + d) + u(z', t + d, t + 2d)) / 2 with
z' = z + d u(z, t, t + d) (two half jumps make one full jump).  Both use a network of the two times,
``model(z, s, t) -> (B, ...)``: the jump from time s to time t divided by t - s.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import torch
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from rectflow.draws import draw_device, rand, randint
from rectflow.errors import ConfigError, check_fraction, check_int
from rectflow.flow.couplings import Coupling
from rectflow.flow.losses import LossOutput, check_coupling, per_sample_mse
from rectflow.flow.paths import exact_dtype
from rectflow.flow.solvers import SolveResult, check_grid, time_grid, time_vector
from rectflow.flow.time_sampling import UniformTime

__all__ = ["MeanFlowBatch", "MeanFlowObjective", "meanflow_target", "ShortcutObjective", "shortcut_target", "sample_mean_flow"]

AverageVelocity = Callable[[Tensor, Tensor, Tensor], Tensor]


class MeanFlowBatch(NamedTuple):
    """Coupled pairs x0, x1 (B, ...) and start / end times s <= t (B,)."""

    x0: Tensor
    x1: Tensor
    s: Tensor
    t: Tensor


def _col(t: Tensor, like: Tensor) -> Tensor:
    return t.reshape(-1, *([1] * (like.dim() - 1))).to(like.dtype)


def meanflow_target(model: AverageVelocity, z: Tensor, s: Tensor, t: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """(u, target): the model's u(z, s, t) (with its graph) and the MeanFlow target
    v + (t - s) d/ds u(z, s, t) (detached), the derivative taken along the direction (v, 1, 0).
    Attention runs on PyTorch's math kernel here: the fused kernels have no forward-mode derivative.  The derivative
    runs outside bf16 autocast, in the inputs' precision: autocast casts a convolution's weights but not its dual
    inputs, so a JVP through a conv net under autocast fails (``precision: bf16`` leaves MeanFlow's loss in float32)."""
    with sdpa_kernel(SDPBackend.MATH), torch.autocast(z.device.type, enabled=False):
        u, du_ds = torch.func.jvp(model, (z, s, t), (v, torch.ones_like(s), torch.zeros_like(t)))
    return u, (v + _col(t - s, z) * du_ds).detach()


class MeanFlowObjective:
    """MeanFlow as a trainer objective (the :class:`~rectflow.flow.losses.Objective` protocol).

    Args:
        coupling: pairs (x0 source, x1 target), e.g. an independent coupling.
        time_sampler: draws the two times, ordered into s <= t (default uniform).
        equal_fraction: the share of samples with s = t (plain flow matching), which anchors u at
            the instantaneous velocity (the paper uses 25-75 %).
        adaptive_power: p of the paper's adaptive weighting: each squared error e is divided by
            sg(e + c)^p (p = 0: the plain squared error).  None (the default) takes the measured best
            for the data's shape (benchmarks/results/meanflow_screen*.md): p = 0 for points (B, D)
            (N -> 8 Gaussians, 3000 steps: one-step W2 0.63 at p = 0, 0.74 at 0.5, 1.43 at 1) and the
            paper's p = 1 for images (B, C, H, W) (8x8 digits, 2000 steps: one-step FD 100 at p = 1,
            200 at p = 0).
        adaptive_c: the c of the weighting.
    """

    def __init__(self, coupling: Coupling, time_sampler: Any = None, equal_fraction: float = 0.25, adaptive_power: float | None = None,
                 adaptive_c: float = 1e-3) -> None:
        check_fraction(equal_fraction, "meanflow: equal_fraction")
        if not ((adaptive_power is None or adaptive_power >= 0) and adaptive_c > 0):
            raise ConfigError(f"meanflow: adaptive_power must be None or >= 0 and adaptive_c > 0, got {adaptive_power}, {adaptive_c}")
        self.adaptive_power = None if adaptive_power is None else float(adaptive_power)
        self.adaptive_c = float(adaptive_c)
        self.coupling = check_coupling(coupling)
        self.time_sampler = time_sampler or UniformTime()
        self.equal_fraction = float(equal_fraction)

    @property
    def heavy_draw(self) -> bool:
        return self.coupling.heavy

    def draw(self, n: int, generator: torch.Generator, device: Any) -> MeanFlowBatch:
        x0, x1 = self.coupling.sample(n, generator=generator, device=device)
        a = self.time_sampler(n, generator=generator, device=device).to(x0.dtype)
        b = self.time_sampler(n, generator=generator, device=device).to(x0.dtype)
        s, t = torch.minimum(a, b), torch.maximum(a, b)
        equal = rand(n, generator=generator, device=x0.device, draw_on=x0.device) < self.equal_fraction
        return MeanFlowBatch(x0, x1, s, torch.where(equal, s, t))  # s = t rows at the noisier draw, as the paper's r = t

    def power_for(self, x: Tensor) -> float:
        """The adaptive weight's power for data like ``x``: the given one, else 0 for points, 1 for images."""
        if self.adaptive_power is not None:
            return self.adaptive_power
        return 1.0 if x.dim() > 2 else 0.0

    def loss(self, model: nn.Module, batch: MeanFlowBatch) -> LossOutput:
        x0, x1, s, t = batch
        z = x0 + _col(s, x0) * (x1 - x0)  # theory §2.6: the straight path at the start time s
        u, target = meanflow_target(model, z, s, t, x1 - x0)
        err = per_sample_mse(u, target)
        p = self.power_for(x0)
        weighted = err / (err.detach() + self.adaptive_c) ** p if p else err
        return LossOutput(weighted.mean(), err.detach())


@torch.no_grad()
def shortcut_target(model: AverageVelocity, z: Tensor, t: Tensor, d: Tensor, smallest: float = 0.0) -> Tensor:
    """(u(z, t, t + d) + u(z', t + d, t + 2d)) / 2 with z' = z + d u(z, t, t + d): the target of the jump
    of size 2d (no gradient).  Half jumps d <= ``smallest`` (the smallest level's, which no row
    regresses) query the model at gap 0, the flow-matching input: two Euler steps of the velocity."""
    gap = torch.where(d <= smallest * (1 + 1e-6), torch.zeros_like(d), d)
    first = model(z, t, t + gap)
    z_mid = z + _col(d, z) * first
    return 0.5 * (first + model(z_mid, t + d, t + d + gap))


class ShortcutObjective:
    """Shortcut models (Frans et al. 2025) as a trainer objective.

    A share ``1 - consistency_fraction`` of each batch is flow matching (d = 0: u(z_t, t, t) against
    X1 - X0); the rest draws d = 2^-k (k uniform in 1 .. ``levels``) and a start t on the grid of
    multiples of 2d below 1 - 2d, and regresses the jump of size 2d on :func:`shortcut_target`.
    The smallest trained jump is 2^(1 - levels) (the half jumps of 2^-levels query the flow-matching
    input, gap 0); sample with ``sample_mean_flow(model, x, steps)`` for steps that are powers of two
    up to 2^(levels - 1).
    """

    def __init__(self, coupling: Coupling, levels: int = 7, consistency_fraction: float = 0.25) -> None:
        check_int(levels, "shortcut: levels")
        check_fraction(consistency_fraction, "shortcut: consistency_fraction")
        self.coupling = check_coupling(coupling)
        self.levels, self.consistency_fraction = levels, float(consistency_fraction)

    @property
    def heavy_draw(self) -> bool:
        return self.coupling.heavy

    def draw(self, n: int, generator: torch.Generator, device: Any) -> MeanFlowBatch:
        """``s`` holds the start time and ``t`` the start plus d (d = 0: the flow-matching rows)."""
        x0, x1 = self.coupling.sample(n, generator=generator, device=device)
        gdev = draw_device(generator, x0.device)
        exact = exact_dtype(gdev)  # float64 where the generator's device has it (dyadic jumps are exact in float32 too)
        u = rand(n, generator=generator, dtype=exact, draw_on=gdev)
        k = randint(self.levels + 1, n, low=1, generator=generator, draw_on=gdev)
        d = torch.pow(2.0, -k.to(exact))
        slots = torch.floor(u * (1 / (2 * d))).clamp_max(1 / (2 * d) - 1)  # t on the grid of multiples of 2d in [0, 1 - 2d]
        start = slots * 2 * d
        fm = rand(n, generator=generator, draw_on=gdev) >= self.consistency_fraction
        start = torch.where(fm, u, start)
        d = torch.where(fm, torch.zeros_like(d), d)
        return MeanFlowBatch(x0, x1, start.to(x0.dtype).to(x0.device), (start + d).to(x0.dtype).to(x0.device))

    def loss(self, model: nn.Module, batch: MeanFlowBatch) -> LossOutput:
        x0, x1, s, t = batch
        d = t - s
        z = x0 + _col(s, x0) * (x1 - x0)
        fm = d == 0
        target = (x1 - x0).clone()
        if bool((~fm).any()):
            target[~fm] = shortcut_target(model, z[~fm], s[~fm], d[~fm], smallest=2.0**-self.levels).to(target.dtype)  # bf16 autocast: the network's dtype
        err = per_sample_mse(model(z, s, torch.where(fm, t, s + 2 * d)), target)
        return LossOutput(err.mean(), err.detach())


@torch.no_grad()
def sample_mean_flow(model: AverageVelocity, x: Tensor, steps: int = 1, *, grid: Tensor | None = None) -> SolveResult:
    """z_{k+1} = z_k + (t_{k+1} - t_k) u(z_k, t_k, t_{k+1}) from x at t = 0 (one network call per step)."""
    g = check_grid(grid if grid is not None else time_grid(steps), name="sample_mean_flow: the time grid", increasing=True, unit_interval=True)
    for s, t in zip(g, g[1:]):
        x = x + (t - s) * model(x, time_vector(x, s), time_vector(x, t)).to(x.dtype)
    return SolveResult(x, len(g) - 1, None, torch.tensor(g, dtype=torch.float64))
