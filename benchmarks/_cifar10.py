"""Shared parts of the CIFAR-10 benchmarks (``cifar10.py`` on a GPU, ``cifar10_cpu.py`` on a CPU, and the phased ones):
sampling + FD rows for any velocity model, and the time budget of a resumable training stage.

The Frechet distance here is measured in the penultimate features of a small CIFAR-10 classifier
trained by the benchmark itself (``rectflow.images.classifier_features.train_cifar_classifier``, cached),
because no pretrained Inception weights can be fetched.  Its values are comparable within one results
file only (same classifier, same reference statistics).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor, nn

from rectflow.diffusion.specs import parse_spec
from rectflow.images.generate import sample_images, save_image_grid
from rectflow.images.quality import extract_features, feature_statistics, frechet_distance

# ----- sampling and FD -------------------------------------------------------------------------


class Bf16(nn.Module):
    """Runs a velocity model under bf16 autocast (when ``enabled``) and returns float32 (fixed-step sampling)."""

    def __init__(self, model: nn.Module, enabled: bool) -> None:
        super().__init__()
        self.model, self.enabled = model, enabled

    def forward(self, x: Tensor, t: Tensor, **kw: Any) -> Tensor:
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=self.enabled):
            return self.model(x, t, **kw).float()


class FeatureStats:
    """The FD reference: a feature network and the (mu, sigma) of real images in its features."""

    def __init__(self, name: str, net: nn.Module, real: Tensor, device: torch.device, batch_size: int = 1000) -> None:
        self.name, self.net, self.device, self.batch_size = name, net, device, batch_size
        self.mu, self.sigma = feature_statistics(extract_features(net, real, batch_size=batch_size, device=device))

    def fd(self, images: Tensor) -> float:
        """FD of images (N, C, H, W) in [-1, 1] to the reference statistics."""
        return frechet_distance(*feature_statistics(extract_features(self.net, images, batch_size=self.batch_size, device=self.device)), self.mu, self.sigma)


def evaluate_model(model: nn.Module, source: Any, specs: list[str], *, stage: str, n: int, feats: list[FeatureStats], device: torch.device,
                   grid_dir: Path | None, grid_specs: tuple[str, ...] = (), bf16: bool = False, fast_model: nn.Module | None = None,
                   batch_size: int = 500, rtol: float = 1e-3, seed: int = 12345, log: Callable[[str], None] = print) -> list[dict]:
    """FD rows of ``n`` samples of ``model`` for each solver spec (``euler:4``, ``dopri5``, ...).

    Fixed-step solvers run under bf16 autocast when ``bf16`` (adaptive dopri5 always in fp32: its
    error control needs fp32 velocities).  Every spec starts from the same source draws (``seed``).
    ``fast_model`` (e.g. a compiled ``model``) runs the fixed-step solvers.  A 64-image grid is
    written for the specs in ``grid_specs``.
    """
    rows = []
    fast = Bf16(fast_model if fast_model is not None else model, bf16)
    for spec in specs:
        method, steps = parse_spec(spec)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        images, summary = sample_images(fast if method != "dopri5" else model, source, n, method=method, steps=steps or 1,
                                        batch_size=batch_size, seed=seed, device=device, rtol=rtol, atol=rtol)
        secs = time.perf_counter() - t0
        if grid_dir is not None and spec in grid_specs:
            save_image_grid(images[:64], grid_dir / f"{stage}_{spec.replace(':', '')}.png", scale=2 if images.shape[-1] <= 16 else 1)
        row = {"stage": stage, "solver": spec, "nfe": summary["nfe"], "n": n, "sample_s": secs, "img_per_s": n / secs}
        for f in feats:
            row[f.name] = f.fd(images)
        rows.append(row)
        log(f"  {stage} {spec}: NFE {row['nfe']}, " + ", ".join(f"{f.name} {row[f.name]:.3f}" for f in feats) + f" ({secs:.0f} s)")
    return rows


# ----- resumable time budgets ------------------------------------------------------------------


def trained_seconds(run_dir: Path) -> float:
    """Training wall time already spent in a run, from its ``metrics.jsonl`` (each row's mean
    ms/step times the steps it covers), so a resumed stage gets only what is left of its budget."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return 0.0
    rows: dict[int, dict] = {}
    for line in path.read_text(errors="replace").splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int) and isinstance(row.get("ms_per_step"), (int, float)):
            rows[row["step"]] = row  # a re-logged step (after a resume) replaces the earlier row
    total, prev = 0.0, 0
    for step in sorted(rows):
        covered = rows[step].get("steps", step - prev)
        total += float(rows[step]["ms_per_step"]) * max(int(covered), 0) / 1e3
        prev = step
    return total

