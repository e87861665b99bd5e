"""Shared pieces of the 8x8-digits benchmarks: the small UNet (one- or two-time), the training
config, and the Frechet distance in the features of a classifier trained on the digits (samples
clipped to [-1, 1] first, as a saved image would be), with its data floor (real vs real)."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from rectflow.data.image_sets import ImageDataset, ImageGaussian, load_digits_images
from rectflow.engine.trainer import TrainConfig, Trainer
from rectflow.images.classifier_features import train_classifier_features
from rectflow.images.quality import extract_features, feature_statistics, frechet_distance
from rectflow.models.unet import UNetAverageVelocity, UNetVelocity

SHAPE = (1, 8, 8)


def make_unet(channels: int, *, average: bool = False) -> UNetVelocity:
    """The digits UNet of benchmarks/perflow.py (multipliers 1-2, one block per level, attention only
    in the middle block); ``average``: its two-time variant u(x, s, t) for MeanFlow / shortcut."""
    cls = UNetAverageVelocity if average else UNetVelocity
    return cls(in_channels=1, image_size=8, channels=channels, channel_mult=(1, 2), num_res_blocks=1,
               attention_resolutions=(), dropout=0.0, head_channels=16)


def train_config(steps: int, batch: int, lr: float, seed: int, ema: float = 0.999) -> TrainConfig:
    """Adam with a short warmup and cosine decay, EMA, grad clip 1, on one CPU process."""
    return TrainConfig(steps=steps, batch_size=batch, lr=lr, lr_schedule="cosine", warmup_steps=min(100, steps // 10),
                       ema_decay=ema, device="cpu", progress=False, ckpt_every=10**9, log_every=max(steps // 4, 1),
                       seed=seed, grad_clip=1.0, workers=0)


def fit(model: nn.Module, objective, cfg: TrainConfig) -> nn.Module:
    """Train in memory and return ``model`` holding the EMA weights (or the raw ones without EMA), in eval mode."""
    tr = Trainer(model, objective, cfg).fit(resume=False)
    if tr.ema is not None:
        model.load_state_dict(tr.ema.model.state_dict())
    return model.eval()


class DigitsFD:
    """FD to ``n`` real digits (drawn with replacement) in classifier features.

    ``data``: the training set (an :class:`ImageDataset`, values in [-1, 1]); ``source``: N(0, I) on
    (1, 8, 8); ``accuracy``: the classifier's held-out accuracy; ``floor``: the FD of another ``n``
    real digits (the finite-sample floor of the metric).
    """

    def __init__(self, n: int, *, classifier_seed: int = 0, ref_seed: int = 123, floor_seed: int = 7) -> None:
        digits = load_digits_images()
        self.data, self.source = ImageDataset(digits), ImageGaussian(SHAPE)
        self.net, report = train_classifier_features(digits, seed=classifier_seed)
        self.accuracy = report.test_accuracy
        self._ref = self._stats(self.data.sample(n, generator=torch.Generator().manual_seed(ref_seed)))
        self.floor = self(self.data.sample(n, generator=torch.Generator().manual_seed(floor_seed)))

    def _stats(self, x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        return feature_statistics(extract_features(self.net, x.clamp(-1, 1), device="cpu"))

    def __call__(self, x: torch.Tensor) -> float:
        return frechet_distance(*self._stats(x), *self._ref)
