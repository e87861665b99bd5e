"""Image-quality metrics: Frechet distance (FD) in the feature space of any network, FID (FD with
the Inception-v3 features of TF-FID, read from a LOCAL TorchScript file), and k-NN precision/recall.

    FD = ||mu_1 - mu_2||^2 + tr(S_1 + S_2 - 2 (S_1^{1/2} S_2 S_1^{1/2})^{1/2})

(mu, S: mean and covariance of the features of each image set; Heusel et al. 2017).  The matrix
square root uses symmetric eigendecompositions in float64, so the result is real and
non-negative by construction.

Feature networks: any ``nn.Module`` mapping images (N, C, H, W) in [-1, 1] to (N, D) (or more
dims, flattened), or a TorchScript file of such a module.  FID uses the TorchScript Inception of
StyleGAN2-ADA / clean-fid, ``inception-2015-12-05.pt``: nothing is downloaded; without the file,
:func:`inception_network` raises a :class:`~rectflow.errors.ConfigError` saying how to get it.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch
from torch import Tensor, nn

from rectflow.engine.hardware import default_device
from rectflow.engine.io import atomic_path
from rectflow.errors import CheckpointError, ConfigError, DataError

__all__ = [
    "INCEPTION_FILENAME",
    "INCEPTION_URL",
    "InceptionFeatures",
    "inception_network",
    "load_feature_network",
    "extract_features",
    "feature_statistics",
    "frechet_distance",
    "fd",
    "fid",
    "precision_recall",
    "save_statistics",
    "load_statistics",
]

INCEPTION_FILENAME = "inception-2015-12-05.pt"
INCEPTION_URL = "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt"
_INCEPTION_ENV = "RECTFLOW_INCEPTION"


def load_feature_network(net: nn.Module | str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """An ``nn.Module`` is used as is (moved to ``device``, eval mode); a path is loaded with
    ``torch.jit.load`` (TorchScript only, never pickle)."""
    if isinstance(net, nn.Module):
        return net.to(device).eval()
    p = Path(net)
    if not p.is_file():
        raise ConfigError(f"{p}: feature network file not found (give a TorchScript .pt file or an nn.Module)")
    try:
        with warnings.catch_warnings():  # TorchScript is deprecated in recent PyTorch, but it is the Inception's format
            warnings.simplefilter("ignore", DeprecationWarning)
            return torch.jit.load(str(p), map_location=device).eval()
    except (RuntimeError, ValueError, OSError) as e:
        raise CheckpointError(f"{p}: not a readable TorchScript file ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None


class InceptionFeatures(nn.Module):
    """The 2048-d pool features of TF-FID's Inception-v3 (TorchScript ``inception-2015-12-05.pt``).

    Images (N, C, H, W) in [-1, 1] are quantised to uint8 as a saved PNG would be, grey images
    repeated to 3 channels, and passed with ``return_features=True`` (the network resizes to
    299x299 itself, as in StyleGAN2-ADA's metrics).
    """
    def __init__(self, scripted: nn.Module) -> None:
        super().__init__()
        self.net = scripted

    def forward(self, x: Tensor) -> Tensor:
        u8 = ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        if u8.shape[1] == 1:
            u8 = u8.expand(-1, 3, -1, -1)
        elif u8.shape[1] != 3:
            raise DataError(f"FID: Inception takes 1- or 3-channel images, got {u8.shape[1]} channels")
        return self.net(u8, return_features=True)


def inception_network(path: str | Path | None = None, device: str | torch.device = "cpu") -> InceptionFeatures:
    """Load the FID Inception from ``path`` (default: ``$RECTFLOW_INCEPTION``, else
    ``./inception-2015-12-05.pt``); a missing file raises ConfigError naming where to get it."""
    p = Path(path or os.environ.get(_INCEPTION_ENV) or INCEPTION_FILENAME)
    if not p.is_file():
        raise ConfigError(
            f"{p}: FID needs the Inception-v3 TorchScript file {INCEPTION_FILENAME} on local disk (nothing is downloaded); "
            f"fetch it on a connected machine from {INCEPTION_URL} (StyleGAN2-ADA / clean-fid use the same file), "
            f"copy it here and pass its path (or set {_INCEPTION_ENV}); or use fd() with your own feature network"
        )
    return InceptionFeatures(load_feature_network(p, device))


ImageSource = Tensor | Iterable[Tensor] | Callable[[int, int], Tensor]


def _batches(images: ImageSource, batch_size: int, n: int | None) -> Iterable[Tensor]:
    if isinstance(images, Tensor):
        if images.dim() != 4 or images.shape[0] == 0:
            raise DataError(f"expected a non-empty image batch (N, C, H, W), got shape {tuple(images.shape)}")
        yield from images.split(batch_size)
    elif callable(images):
        if n is None:
            raise ConfigError("features of a sampling function need n (the number of images)")
        for start in range(0, n, batch_size):
            yield images(start, min(batch_size, n - start))
    else:
        yield from images


@torch.no_grad()
def extract_features(
    net: nn.Module | str | Path,
    images: ImageSource,
    *,
    batch_size: int = 250,
    device: str | torch.device | None = None,
    n: int | None = None,
) -> Tensor:
    """Features (N, D) float64 on the CPU of images in [-1, 1]: a tensor (N, C, H, W), an iterable of
    batches, or a function ``(start, count) -> batch`` (generate on the fly; needs ``n``)."""
    dev = torch.device(device) if device is not None else default_device()
    f = load_feature_network(net, dev)
    out = []
    for batch in _batches(images, batch_size, n):
        if not torch.isfinite(batch).all():
            raise DataError("images contain NaN or inf")
        out.append(f(batch.to(dev)).flatten(1).cpu().double())
    if not out:
        raise DataError("no images to compute features of")
    return torch.cat(out)


def feature_statistics(features: Tensor | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean (D,) and unbiased covariance (D, D) of features (N, D), float64."""
    f = np.asarray(features.numpy() if isinstance(features, Tensor) else features, dtype=np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise DataError(f"feature statistics need at least 2 feature vectors (N, D), got shape {f.shape}")
    if not np.isfinite(f).all():
        raise DataError("features contain NaN or inf")
    return f.mean(axis=0), np.cov(f, rowvar=False).reshape(f.shape[1], f.shape[1])


def _psd_sqrt(m: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((m + m.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """FD between N(mu1, sigma1) and N(mu2, sigma2) (the 2-Wasserstein distance squared):
    ||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr((S1^{1/2} S2 S1^{1/2})^{1/2})."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.shape[0], mu1.shape[0]):
        raise DataError(f"frechet_distance: shapes disagree (mu {mu1.shape} vs {mu2.shape}, sigma {s1.shape} vs {s2.shape})")
    r1 = _psd_sqrt(s1)
    cross = np.sqrt(np.clip(np.linalg.eigvalsh(r1 @ s2 @ r1), 0, None)).sum()  # tr((S1^1/2 S2 S1^1/2)^1/2)
    d = float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * cross)
    return max(d, 0.0)


def fd(
    x: ImageSource,
    y: ImageSource | tuple[np.ndarray, np.ndarray],
    net: nn.Module | str | Path,
    *,
    batch_size: int = 250,
    device: str | torch.device | None = None,
    n: int | None = None,
) -> float:
    """Frechet distance between image sets x and y in the features of ``net``; y may also be
    precomputed statistics (mu, sigma) (see :func:`save_statistics`)."""
    fx = extract_features(net, x, batch_size=batch_size, device=device, n=n)
    mx, sx = feature_statistics(fx)
    if isinstance(y, tuple) and len(y) == 2 and isinstance(y[0], np.ndarray):
        my, sy = y
    else:
        my, sy = feature_statistics(extract_features(net, y, batch_size=batch_size, device=device, n=n))
    return frechet_distance(mx, sx, my, sy)


def fid(
    x: ImageSource,
    y: ImageSource | tuple[np.ndarray, np.ndarray],
    inception: str | Path | None = None,
    *,
    batch_size: int = 250,
    device: str | torch.device | None = None,
    n: int | None = None,
) -> float:
    """FID: :func:`fd` with the local Inception TorchScript file (see :func:`inception_network`)."""
    dev = device if device is not None else default_device()
    return fd(x, y, inception_network(inception, dev), batch_size=batch_size, device=dev, n=n)


def _kth_nn_radius(f: Tensor, k: int, chunk: int = 1024) -> Tensor:
    """Distance of each row of f (N, D) to its k-th nearest other row."""
    out = []
    for i in range(0, f.shape[0], chunk):
        d = torch.cdist(f[i : i + chunk], f)
        out.append(d.kthvalue(k + 1, dim=1).values)  # +1: the point itself at distance 0
    return torch.cat(out)


def _covered(query: Tensor, ref: Tensor, radii: Tensor, chunk: int = 1024) -> Tensor:
    """For each query row: is it inside some ball (ref_j, radii_j)?"""
    out = []
    for i in range(0, query.shape[0], chunk):
        d = torch.cdist(query[i : i + chunk], ref)
        out.append((d <= radii[None, :]).any(dim=1))
    return torch.cat(out)


def precision_recall(real: Tensor, fake: Tensor, k: int = 3) -> tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al. 2019) of features real (N, D), fake (M, D):
    precision = share of fake samples inside the k-NN balls of the real ones; recall = share of real
    samples inside the k-NN balls of the fake ones."""
    r, f = torch.as_tensor(real).double(), torch.as_tensor(fake).double()
    if r.dim() != 2 or f.dim() != 2 or r.shape[1] != f.shape[1]:
        raise DataError(f"precision_recall: expected features (N, D) and (M, D), got {tuple(r.shape)} and {tuple(f.shape)}")
    if min(r.shape[0], f.shape[0]) <= k:
        raise DataError(f"precision_recall: need more than k = {k} samples on each side, got {r.shape[0]} and {f.shape[0]}")
    precision = float(_covered(f, r, _kth_nn_radius(r, k)).double().mean())
    recall = float(_covered(r, f, _kth_nn_radius(f, k)).double().mean())
    return precision, recall


def save_statistics(path: str | Path, mu: np.ndarray, sigma: np.ndarray, **meta: Any) -> Path:
    """Write reference statistics (mu, sigma) to an .npz file atomically (reuse them in :func:`fd`)."""
    path = Path(path)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            np.savez(fh, mu=np.asarray(mu, np.float64), sigma=np.asarray(sigma, np.float64), meta=np.array(json.dumps(meta)))
    return path


def load_statistics(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) from :func:`save_statistics`."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{p}: no such statistics file")
    try:
        with np.load(p, allow_pickle=False) as z:
            return z["mu"], z["sigma"]
    except Exception as e:
        raise DataError(f"{p}: not a statistics file ({type(e).__name__}: {e})") from None
