"""A small classifier trained on a labelled image set, used as the feature network of an FD.

FID needs Inception features, which only make sense for natural images of 299 x 299 and need a
local weight file.  For small labelled data sets (8x8 digits, MNIST-like sets) the usual stand-in
is the penultimate layer of a classifier trained on the same data: "FD in classifier features".
:func:`train_classifier_features` trains one in seconds on a CPU, deterministically from a seed,
and returns a :class:`ClassifierFeatures` module that maps images (N, C, H, W) in [-1, 1] to
features (N, D); pass it as ``net`` to :func:`rectflow.images.quality.fd`.

    feats = train_classifier_features(load_digits_images(), seed=0)
    fd_value = fd(samples, real_images, feats)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rectflow.data.image_sets import ImageArray, to_unit_range
from rectflow.errors import ConfigError, DataError

__all__ = ["ClassifierFeatures", "ClassifierReport", "train_classifier_features"]


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
