"""Small classifiers trained on a labelled image set, used as the feature network of an FD.

FID needs Inception features, which only make sense for natural images of 299 x 299 and need a
local weight file.  For small labelled data sets (8x8 digits, MNIST-like sets) the usual stand-in
is the penultimate layer of a classifier trained on the same data: "FD in classifier features".
:func:`train_classifier_features` trains one in seconds on a CPU, deterministically from a seed,
and returns a :class:`ClassifierFeatures` module that maps images (N, C, H, W) in [-1, 1] to
features (N, D); pass it as ``net`` to :func:`rectflow.images.quality.fd`.

    feats = train_classifier_features(load_digits_images(), seed=0)
    fd_value = fd(samples, real_images, feats)

For CIFAR-10 (3-channel images, 10 classes) :func:`train_cifar_classifier` trains the wider
:class:`CifarClassifier` (a VGG-style network with crops and flips) for a wall-time budget and
caches it beside a JSON key of its settings; :func:`load_cifar_classifier` reads such a cache.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import Tensor, nn

from rectflow.data.image_sets import ImageArray, to_unit_range
from rectflow.engine.io import atomic_path, load_json, load_tensors
from rectflow.errors import CheckpointError, ConfigError, DataError

__all__ = ["ClassifierFeatures", "ClassifierReport", "train_classifier_features",
           "CifarClassifier", "classifier_accuracy", "train_cifar_classifier", "load_cifar_classifier"]


class ClassifierFeatures(nn.Module):
    """Two conv blocks + a hidden layer: ``forward`` gives the (N, feature_dim) hidden activations,
    ``logits`` the class scores on top of them.  Input: images (N, C, H, W) in [-1, 1], H, W >= 4."""

    def __init__(self, in_channels: int, image_size: int, num_classes: int, *, width: int = 32, feature_dim: int = 128) -> None:
        super().__init__()
        if image_size < 4:
            raise ConfigError(f"classifier features need images of at least 4x4, got {image_size}")
        self.conv = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1), nn.GELU(),
            nn.Conv2d(width, 2 * width, 3, padding=1, stride=2), nn.GELU(),
            nn.AdaptiveAvgPool2d(2), nn.Flatten(),
        )
        self.hidden = nn.Sequential(nn.Linear(8 * width, feature_dim), nn.GELU())
        self.head = nn.Linear(feature_dim, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.hidden(self.conv(x))

    def logits(self, x: Tensor) -> Tensor:
        return self.head(self.forward(x))


@dataclass
class ClassifierReport:
    """Held-out accuracy of the trained classifier (a sanity check of the feature space)."""

    train_size: int
    test_size: int
    test_accuracy: float


def train_classifier_features(
    data: ImageArray,
    *,
    steps: int = 600,
    batch_size: int = 128,
    lr: float = 2e-3,
    test_fraction: float = 0.2,
    noise_std: float = 0.1,
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> tuple[ClassifierFeatures, ClassifierReport]:
    """Train :class:`ClassifierFeatures` on ``data`` (labelled) with AdamW and cross-entropy.

    A random ``test_fraction`` is held out to report accuracy.  Small Gaussian noise on the inputs
    (``noise_std``, in [-1, 1] units) keeps the features smooth around the data, so generated images
    a little off the data manifold get nearby features rather than arbitrary ones.  Deterministic
    given ``seed``.  Returns the network in eval mode and its report.
    """
    if data.labels is None or data.num_classes < 2:
        raise DataError(f"{data.source}: classifier features need labelled images with at least 2 classes")
    n = data.images.shape[0]
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n, generator=g)
    n_test = int(round(n * test_fraction))
    if n - n_test < batch_size // 4 or (test_fraction > 0 and n_test == 0):
        raise DataError(f"{data.source}: {n} images are too few to train and test a classifier")
    x = to_unit_range(data.images).to(device)
    y = data.labels.to(device)
    tr, te = perm[n_test:].to(device), perm[:n_test].to(device)
    torch.manual_seed(seed)  # initial weights
    net = ClassifierFeatures(x.shape[1], x.shape[-1], data.num_classes).to(device)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    net.train()
    for _ in range(steps):
        i = tr[torch.randint(0, tr.numel(), (batch_size,), generator=g).to(device)]
        xb = x[i] + noise_std * torch.randn(x[i].shape, generator=g).to(device)
        loss = F.cross_entropy(net.logits(xb), y[i])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    net.eval()
    with torch.no_grad():
        acc = float((net.logits(x[te]).argmax(1) == y[te]).double().mean()) if n_test else float("nan")
    return net, ClassifierReport(int(tr.numel()), n_test, acc)


# ----- CIFAR-10: a VGG-style classifier trained for a time budget, cached -------------------------


class CifarClassifier(nn.Module):
    """A VGG-style 10-class classifier of RGB images: conv-BN-ReLU blocks of widths w, w / 2w, 2w / 4w, 4w with a 2x2 max
    pool after the first two pairs and a global average pool after the last.

    ``forward`` maps images (N, 3, H, W) in [-1, 1] (any H, W >= 4) to the (N, 4w) penultimate features (the FD feature
    map), ``logits`` to the (N, 10) class scores.  Its state dict holds ``features.*`` and ``head.*``."""

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
    """Random crops (reflect-pad ``pad``) and horizontal flips of a batch (N, C, H, W), on its device; draws from ``g``."""
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


def classifier_accuracy(net: CifarClassifier, data: ImageArray, device: str | torch.device) -> float:
    """Share of ``data``'s images (uint8 (N, 3, H, W), labelled) whose arg-max logit is their label; leaves ``net`` in eval
    mode.  Batches of 1000 on ``device``."""
    if data.labels is None:
        raise DataError(f"{data.source}: classifier accuracy needs labelled images")
    device = torch.device(device)
    net.eval()
    correct = 0
    with torch.no_grad():
        for xb, yb in zip(data.images.split(1000), data.labels.split(1000)):
            correct += int((net.logits(to_unit_range(xb.to(device))).argmax(1) == yb.to(device)).sum())
    return correct / len(data.labels)


def load_cifar_classifier(cache: str | Path, device: str | torch.device = "cpu") -> tuple[CifarClassifier, dict[str, Any]]:
    """The classifier cached by :func:`train_cifar_classifier` at ``cache`` (a safetensors file of its state dict beside a
    ``.json`` of ``{"key": settings, "info": training facts}``), in eval mode on ``device``, and that JSON.  A missing or
    corrupt file raises :class:`CheckpointError`."""
    cache, device = Path(cache), torch.device(device)
    meta = load_json(cache.with_suffix(".json"))
    if not isinstance(meta, dict) or not isinstance(meta.get("info"), dict) or "width" not in meta["info"]:
        raise CheckpointError(f"{cache.with_suffix('.json')}: not a classifier cache record (no info.width)")
    net = CifarClassifier(meta["info"]["width"]).to(device)
    tensors, _ = load_tensors(cache, device=device)
    net.load_state_dict(tensors)
    net.eval()
    return net, meta


def train_cifar_classifier(train: ImageArray, test: ImageArray, seconds: float, device: str | torch.device, batch: int,
                           width: int = 64, cache: str | Path | None = None) -> tuple[CifarClassifier, dict[str, Any]]:
    """Train :class:`CifarClassifier` on ``train`` (uint8 (N, 3, H, W), labels 0..9) for ``seconds`` of wall time, or load it
    from ``cache`` when an earlier call with the same settings wrote it there.

    AdamW (lr 2e-3, weight decay 5e-4), label smoothing 0.1, random crops (reflect padding of side / 8) and flips, batches of
    ``batch``; seeded (weights and batches from seed 0), so the run is reproducible up to the number of steps the budget
    allows.  On CUDA: channels-last, fused AdamW and bf16 autocast.  Returns the network in eval mode on ``device`` and
    ``{"steps", "seconds", "test_accuracy" (on ``test``), "width", "feature_dim", "cached"}``.

    The cache is ``cache`` (safetensors of the state dict) and ``cache.with_suffix(".json")`` (``{"key": settings, "info": ...}``;
    settings: width, seconds, batch, image size, number of training images); both are written atomically.  A cache of other
    settings, or one that cannot be read, is trained over."""
    if train.labels is None:
        raise DataError(f"{train.source}: the classifier needs labelled images")
    device = torch.device(device)
    cache = None if cache is None else Path(cache)
    key = {"width": width, "seconds": seconds, "batch": batch, "size": list(train.images.shape[-2:]), "n_train": len(train.images)}
    net = CifarClassifier(width).to(device)  # before the cache check: a cached run draws the same global random numbers as before
    if cache is not None and cache.is_file() and cache.with_suffix(".json").is_file():
        try:
            meta = load_json(cache.with_suffix(".json"))
            if isinstance(meta, dict) and meta.get("key") == key:
                tensors, _ = load_tensors(cache, device=device)
                net.load_state_dict(tensors)
                net.eval()
                return net, {**meta["info"], "cached": True}
        except CheckpointError:
            pass  # an unreadable cache is trained over
    torch.manual_seed(0)
    net = CifarClassifier(width).to(device)
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
    info = {"steps": steps, "seconds": time.perf_counter() - t0, "test_accuracy": classifier_accuracy(net, test, device), "width": width,
            "feature_dim": 4 * width}
    if cache is not None:
        with atomic_path(cache) as tmp:  # the file format of save_file, as earlier caches have it
            save_file({k: v.detach().contiguous().cpu() for k, v in net.state_dict().items()}, str(tmp))
        with atomic_path(cache.with_suffix(".json")) as tmp:
            tmp.write_text(json.dumps({"key": key, "info": info}, indent=1))
    net.eval()
    return net, {**info, "cached": False}
