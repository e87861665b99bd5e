"""Fast image sampling and image files: a compile-friendly fixed-step sampler, batch sampling to
PNG grids and ``.npz``, input/output pair grids (domain transfer) and a training callback that
writes sample grids periodically.

:class:`FixedStepSampler` unrolls a fixed-step Runge-Kutta method (theory §3.2) over a time
grid fixed at construction: the loop runs over Python constants only, with no data-dependent
control flow and no host synchronisation, so ``torch.compile(sampler, fullgraph=True)`` captures
the whole solve (and ``mode="reduce-overhead"`` replays it as a CUDA graph).  It gives the same
result as :func:`rectflow.flow.solvers.fixed_step` to float rounding.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

from rectflow.data.image_sets import to_uint8
from rectflow.diffusion.specs import parse_spec, sample, spec_label
from rectflow.engine.distributed import is_main_process
from rectflow.engine.io import atomic_path
from rectflow.engine.trainer import step_generator
from rectflow.errors import ConfigError
from rectflow.flow.solvers import FIXED_STEP_METHODS, check_grid, rk_step, time_grid
from rectflow.images.conditional import GuidedVelocity, LabelConditioned

__all__ = [
    "FixedStepSampler",
    "image_grid",
    "save_image_grid",
    "write_named_images",
    "save_pair_grid",
    "sample_images",
    "SampleGridCallback",
]


class FixedStepSampler(nn.Module):
    """x0 (B, ...) [, y (B,)] -> x1: a fixed-step solve of dZ = v(Z, t) dt, unrolled at construction.

    Args:
        model: the velocity network ``model(x, t)`` or ``model(x, t, y=...)`` (a
            :class:`~rectflow.images.conditional.GuidedVelocity` works too, with ``y`` None).
        method: euler | midpoint | heun | rk4.
        steps: number of steps (ignored if ``grid`` is given).
        grid: explicit time grid (increasing or decreasing).
    Attributes: ``nfe`` = stages x steps velocity evaluations per sample.
    """

    def __init__(self, model: nn.Module, method: str = "euler", steps: int = 1, grid: Sequence[float] | Tensor | None = None) -> None:
        super().__init__()
        if method not in FIXED_STEP_METHODS:
            raise ConfigError(f"FixedStepSampler: method must be one of {list(FIXED_STEP_METHODS)}, got {method!r}")
        g = check_grid(grid if grid is not None else time_grid(steps), name="FixedStepSampler: the time grid")
        self.model = model
        self.tableau = FIXED_STEP_METHODS[method]
        self.grid = g
        self.nfe = self.tableau.stages * (len(g) - 1)

    def forward(self, x: Tensor, y: Tensor | None = None) -> Tensor:
        kw = {} if y is None else {"y": y}

        def f(z: Tensor, t: Tensor) -> Tensor:
            return self.model(z, t, **kw)

        for t, t_next in zip(self.grid, self.grid[1:]):
            x, _ = rk_step(f, x, t, t_next - t, self.tableau)
        return x


def image_grid(images: Tensor, nrow: int | None = None, padding: int = 2, pad_value: int = 255) -> np.ndarray:
    """Tile images (N, C, H, W) in [-1, 1] into one uint8 array (rows*H', cols*W', C) with C in {1, 3}
    (one channel stays grey; 4 channels drop alpha).  ``nrow`` images per row (default ~sqrt(N))."""
    if images.dim() != 4 or images.shape[0] == 0:
        raise ValueError(f"image_grid: expected images (N, C, H, W), got shape {tuple(images.shape)}")
    x = to_uint8(images.detach().cpu())
    if x.shape[1] == 4:
        x = x[:, :3]
    if x.shape[1] not in (1, 3):
        raise ValueError(f"image_grid: images need 1, 3 or 4 channels, got {x.shape[1]}")
    n, c, h, w = x.shape
    cols = nrow or max(1, math.ceil(math.sqrt(n)))
    rows = math.ceil(n / cols)
    out = np.full((rows * (h + padding) + padding, cols * (w + padding) + padding, c), pad_value, dtype=np.uint8)
    arr = x.permute(0, 2, 3, 1).numpy()
    for i in range(n):
        r, q = divmod(i, cols)
        y0, x0 = padding + r * (h + padding), padding + q * (w + padding)
        out[y0 : y0 + h, x0 : x0 + w] = arr[i]
    return out


def _save_png(arr: np.ndarray, path: str | Path, scale: int = 1) -> Path:
    img = Image.fromarray(arr[:, :, 0] if arr.shape[2] == 1 else arr)
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    path = Path(path)
    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG")
    return path


def write_named_images(images: Tensor, names: list[str], folder: str | Path) -> list[Path]:
    """One PNG per image (N, C, H, W) in [-1, 1], ``folder/NAME.png`` for each of ``names`` (sub-folders flattened with
    ``_``, so two inputs never write one file), atomically."""
    folder = Path(folder)
    if len(names) != images.shape[0]:
        raise ConfigError(f"write_named_images: {images.shape[0]} images but {len(names)} names")
    stems = [str(Path(n).with_suffix("")).replace("/", "_").replace("\\", "_") for n in names]
    if len(set(stems)) != len(stems):
        stems = [f"{i:05d}_{s}" for i, s in enumerate(stems)]
    arr = to_uint8(images.detach().cpu().clamp(-1, 1)).permute(0, 2, 3, 1).numpy()
    return [_save_png(a, folder / f"{s}.png") for a, s in zip(arr, stems)]


def save_image_grid(images: Tensor, path: str | Path, nrow: int | None = None, scale: int = 1) -> Path:
    """Write a PNG grid of images (N, C, H, W) in [-1, 1] atomically; ``scale`` enlarges small images."""
    return _save_png(image_grid(images, nrow), path, scale)


def save_pair_grid(inputs: Tensor, outputs: Tensor, path: str | Path, per_row: int = 8, scale: int = 1) -> Path:
    """PNG of input/output pairs (domain transfer: x0 next to T(x0)): each row shows ``per_row``
    pairs as input, output, input, output, ...  inputs and outputs (N, C, H, W) in [-1, 1]."""
    if inputs.shape != outputs.shape:
        raise ValueError(f"save_pair_grid: inputs {tuple(inputs.shape)} and outputs {tuple(outputs.shape)} differ in shape")
    both = torch.stack([inputs.detach().cpu(), outputs.detach().cpu()], dim=1).flatten(0, 1)  # in0, out0, in1, out1, ...
    return _save_png(image_grid(both, nrow=2 * per_row), path, scale)


@torch.no_grad()
def sample_images(
    model: nn.Module,
    source: Any,
    n: int,
    out: str | Path | None = None,
    *,
    method: str = "euler",
    steps: int = 100,
    labels: Tensor | None = None,
    guidance: float = 1.0,
    batch_size: int = 500,
    seed: int = 0,
    device: str | torch.device | None = None,
    grid_n: int = 64,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    x0: Tensor | None = None,
) -> tuple[Tensor, dict[str, Any]]:
    """Draw n images in batches and (if ``out`` is given) write ``out/samples.npz`` (uint8 images
    (n, C, H, W) and labels) and ``out/grid.png`` (the first ``grid_n``).

    ``x0`` (n, C, H, W): map these source samples instead of drawing them (domain transfer of your own
    inputs, in the source's value range); ``source`` and ``seed`` are then unused.

    Source batch i is drawn from ``step_generator(seed, i)``, so the samples depend only on the
    seed and the batch size.  ``labels`` (n,) with ``guidance`` w samples the guided flow (see
    :mod:`rectflow.images.conditional`); fixed-step methods run the unrolled :class:`FixedStepSampler`.
    Returns the images (n, C, H, W) in [-1, 1] on the CPU and a summary (NFE per sample, time).
    """
    if n < 1 or batch_size < 1:
        raise ConfigError(f"sample_images: n and batch_size must be >= 1, got {n}, {batch_size}")
    if x0 is not None and x0.shape[0] != n:
        raise ConfigError(f"sample_images: n = {n} but {x0.shape[0]} given inputs x0")
    if labels is not None and labels.shape != (n,):
        raise ConfigError(f"sample_images: {n} samples but labels of shape {tuple(labels.shape)}")
    spec = spec_label(method, None if method == "dopri5" else steps)
    parse_spec(spec)  # an unknown sampler or too few steps: refused before any work
    dev = torch.device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    parts, nfe, t_start = [], 0, time.perf_counter()
    try:
        for i, start in enumerate(range(0, n, batch_size)):
            m = min(batch_size, n - start)
            xb = source.sample(m, generator=step_generator(seed, i), device=dev) if x0 is None else x0[start:start + m].to(dev)
            yb = None if labels is None else labels[start : start + m].to(dev)
            if method in FIXED_STEP_METHODS:  # unrolled: one module torch.compile / CUDA graphs can capture
                f: nn.Module = model if yb is None else GuidedVelocity(model, yb, guidance)
                sampler = FixedStepSampler(f, method, steps)
                x1, k = sampler(xb), sampler.nfe * getattr(f, "nfe_per_eval", 1)
            else:  # dopri5 and the diffusion samplers: the library's one sampling verb
                net = model if yb is None else LabelConditioned(model)
                res = sample(net, xb, spec, cond=yb, guidance=guidance if yb is not None else 1.0, rtol=rtol, atol=atol)
                x1, k = res.x, res.nfe
            nfe = max(nfe, k)
            if not bool(torch.isfinite(x1).all()):
                raise FloatingPointError(f"sampling with {method} produced NaN or inf in batch {i} (diverged weights, or a guidance scale that is not finite)")
            parts.append(x1.float().cpu())
    finally:
        model.train(was_training)
    images = torch.cat(parts)
    summary = {"n": n, "method": method, "steps": parse_spec(spec)[1], "nfe": nfe, "guidance": guidance if labels is not None else None, "seconds": time.perf_counter() - t_start}
    if out is not None:
        out = Path(out)
        payload = {"images": to_uint8(images).numpy()}
        if labels is not None:
            payload["labels"] = labels.cpu().numpy()
        if x0 is not None:  # transfer: the inputs beside their outputs, and a side-by-side grid input -> output
            payload["inputs"] = to_uint8(x0.float().cpu().clamp(-1, 1)).numpy()
        with atomic_path(out / "samples.npz") as tmp:
            with open(tmp, "wb") as fh:
                np.savez(fh, **payload)
        if x0 is None:
            save_image_grid(images[:grid_n], out / "grid.png")
        else:
            save_pair_grid(x0[:grid_n].float().cpu().clamp(-1, 1), images[:grid_n], out / "grid.png", per_row=4)
    return images, summary


class SampleGridCallback:
    """Trainer callback: every ``every`` steps write ``<run_dir>/samples/step_XXXXXXXX.png`` from the
    EMA (or raw) model, on the main process only.  The source draws come from a fixed seed, so the
    grids of a run show the same noise developing into images.

    Args:
        source: sampler of pi0 (``sample(n, generator=, device=)``).
        every: interval in steps.
        n: number of images in the grid.
        steps: Euler steps.
        labels: optional labels (n,) for a class-conditional model (guidance scale ``guidance``).
    """
    def __init__(self, source: Any, every: int, n: int = 64, steps: int = 20, labels: Tensor | None = None, guidance: float = 1.0, seed: int = 0) -> None:
        if every < 1 or n < 1 or steps < 1:
            raise ConfigError(f"sample grids: every, n and steps must be >= 1, got {every}, {n}, {steps}")
        self.source, self.every, self.n, self.steps = source, every, n, steps
        self.labels, self.guidance, self.seed = labels, guidance, seed
        self.written: list[Path] = []

    def __call__(self, trainer: Any, step: int) -> None:
        if step % self.every or trainer.run_dir is None or not is_main_process():
            return
        model = trainer.eval_model
        x0 = self.source.sample(self.n, generator=torch.Generator().manual_seed(self.seed), device=trainer.device)
        with torch.no_grad():
            if self.labels is not None:
                model = GuidedVelocity(model, self.labels.to(trainer.device), self.guidance)
            x1 = FixedStepSampler(model, "euler", self.steps)(x0)
        trainer.model.train()
        path = save_image_grid(x1, trainer.run_dir / "samples" / f"step_{step:08d}.png", scale=max(1, 64 // x1.shape[-1]))
        self.written.append(path)
