"""Shared parts of the CIFAR-10 benchmarks (``cifar10.py`` on a GPU, ``cifar10_cpu.py`` on a CPU):
the FD feature classifier (trained once, cached), sampling + FD rows for any velocity model, and
the time budget of a resumable training stage.

The Frechet distance here is measured in the penultimate features of a small CIFAR-10 classifier
trained by the benchmark itself, because no pretrained Inception weights can be fetched.  Its values
are comparable within one results file only (same classifier, same reference statistics).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from rectflow.data.image_sets import ImageArray, to_unit_range
from rectflow.diffusion.specs import parse_spec
from rectflow.images.generate import sample_images, save_image_grid
from rectflow.images.quality import extract_features, feature_statistics, frechet_distance

# ----- the FD feature network: a small classifier trained here -------------------------------


class SmallClassifier(nn.Module):
    """A VGG-style CIFAR-10 classifier; ``forward`` returns the 4w-d penultimate features of images
    in [-1, 1] (the FD feature map), ``logits`` the class scores.  Any input size >= 4x4."""

    def __init__(self, width: int = 64) -> None:
        super().__init__()

        def block(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))

        w = width
        self.width = width
        self.features = nn.Sequential(
            block(3, w), block(w, w), nn.MaxPool2d(2),
            block(w, 2 * w), block(2 * w, 2 * w), nn.MaxPool2d(2),
            block(2 * w, 4 * w), block(4 * w, 4 * w), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.head = nn.Linear(4 * w, 10)

    def forward(self, x: Tensor) -> Tensor:
        return self.features(x)

    def logits(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


def _augment(x: Tensor, g: torch.Generator, pad: int) -> Tensor:
    """Random crops (reflect-pad ``pad``) and horizontal flips of a batch (N, C, H, W), on its device."""
    n, _, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad), mode="reflect")
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=g, device=g.device).to(x.device)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=g, device=g.device).to(x.device)
    rows = (dy[:, None] + torch.arange(h, device=x.device)[None, :])[:, None, :, None].expand(n, x.shape[1], h, w + 2 * pad)
    x = padded.gather(2, rows)
    cols = (dx[:, None] + torch.arange(w, device=x.device)[None, :])[:, None, None, :].expand(n, x.shape[1], h, w)
    x = x.gather(3, cols)
    flip = (torch.rand(n, generator=g, device=g.device) < 0.5).to(x.device)
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


def accuracy(net: SmallClassifier, data: ImageArray, device: torch.device) -> float:
    net.eval()
    correct = 0
    with torch.no_grad():
        for xb, yb in zip(data.images.split(1000), data.labels.split(1000)):
            correct += int((net.logits(to_unit_range(xb.to(device))).argmax(1) == yb.to(device)).sum())
    return correct / len(data.labels)


def train_classifier(train: ImageArray, test: ImageArray, seconds: float, device: torch.device, batch: int, width: int = 64,
                     cache: Path | None = None) -> tuple[SmallClassifier, dict]:
    """Train the classifier for ``seconds`` (AdamW, label smoothing, crops and flips), or load it from
    ``cache`` (a safetensors file + .json written by an earlier call with the same settings)."""
    key = {"width": width, "seconds": seconds, "batch": batch, "size": list(train.images.shape[-2:]), "n_train": len(train.images)}
    net = SmallClassifier(width).to(device)
    if cache is not None and cache.is_file() and cache.with_suffix(".json").is_file():
        info = json.loads(cache.with_suffix(".json").read_text())
        if info.get("key") == key:
            net.load_state_dict(load_file(str(cache), device=str(device)))
            net.eval()
            return net, {**info["info"], "cached": True}
    torch.manual_seed(0)
    net = SmallClassifier(width).to(device)
    cuda = device.type == "cuda"
    if cuda:
        net = net.to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=5e-4, **({"fused": True} if cuda else {}))
    xs, ys = train.images.to(device), train.labels.to(device)
    g = torch.Generator().manual_seed(0)
    pad = max(1, train.images.shape[-1] // 8)
    t0, steps = time.perf_counter(), 0
    net.train()
    while time.perf_counter() - t0 < seconds:
        idx = torch.randint(len(xs), (batch,), generator=g).to(device)
        x = _augment(to_unit_range(xs[idx]), g, pad)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            loss = F.cross_entropy(net.logits(x), ys[idx], label_smoothing=0.1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        steps += 1
    info = {"steps": steps, "seconds": time.perf_counter() - t0, "test_accuracy": accuracy(net, test, device), "width": width, "feature_dim": 4 * width}
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().contiguous().cpu() for k, v in net.state_dict().items()}, str(cache))
        cache.with_suffix(".json").write_text(json.dumps({"key": key, "info": info}, indent=1))
    net.eval()
    return net, {**info, "cached": False}


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


def np_json(v: Any) -> Any:
    """numpy scalars -> Python numbers (for json.dumps)."""
    if isinstance(v, dict):
        return {k: np_json(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [np_json(x) for x in v]
    if isinstance(v, np.generic):
        return v.item()
    return v
