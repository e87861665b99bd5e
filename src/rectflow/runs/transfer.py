"""Your own source samples as a run's inputs: domain transfer of a folder of pictures (or an array of points) through a
flow whose source distribution is a data set (theory §1.3: pi0 is any distribution; §4.1: reflow makes the map one step).

:func:`load_transfer_inputs` reads them and checks them against the run's source: the image shape (channels, height,
width) of an image run, the dimension of a vector run.  ``rectflow sample RUN --from PATH`` maps them and writes each
output beside its input; from Python, ``sample_images(model, source, n, out, x0=inputs.x)`` or
``solve(model, inputs.x, ...)`` does the same.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from rectflow.data.image_sets import load_images, to_unit_range
from rectflow.data.toy2d import PointCloud
from rectflow.errors import DataError

__all__ = ["TransferInputs", "load_transfer_inputs"]


@dataclass
class TransferInputs:
    """Source samples to map: ``x`` (N, C, H, W) in [-1, 1] or (N, d); ``names`` one per row (the input files', or
    the row numbers of an array)."""

    x: Tensor
    names: list[str]


def _float_images(p: Path, shape: tuple[int, ...]) -> TransferInputs | None:
    """Float images of a .npy / .npz (N, C, H, W) in [-1, 1], exactly as stored; None for anything that is not a float array
    (image files and uint8 arrays take the image loader's path)."""
    if p.suffix not in (".npy", ".npz") or not p.is_file():
        return None
    try:
        if p.suffix == ".npz":
            with np.load(p, allow_pickle=False) as z:
                key = next((k for k in ("images", "x") if k in z.files), None)
                if key is None:
                    return None
                arr = np.asarray(z[key])
        else:
            arr = np.asarray(np.load(p, allow_pickle=False))
    except (ValueError, OSError) as e:
        raise DataError(f"{p}: cannot read ({type(e).__name__}: {e})") from None
    if arr.dtype.kind != "f":
        return None
    if arr.ndim != 4 or tuple(arr.shape[1:]) != shape:
        raise DataError(f"{p}: float images must be (N, {', '.join(map(str, shape))}) like the run's source, got {arr.shape}")
    if not np.isfinite(arr).all() or arr.min() < -1 or arr.max() > 1:
        raise DataError(f"{p}: float images must be finite and in the source's range [-1, 1], got [{arr.min():.3g}, {arr.max():.3g}]")
    return TransferInputs(torch.from_numpy(arr.astype(np.float32)), [f"{i:05d}" for i in range(arr.shape[0])])


def load_transfer_inputs(path: str | Path, source: Any) -> TransferInputs:
    """The samples in ``path`` for a run whose source is ``source``.

    Image runs (``source.shape`` = (C, H, W)): an image folder, a .zip of one, or .npz / .npy images: uint8 (scaled to
    [-1, 1]), or floats already in the source's range [-1, 1], shaped (N, C, H, W) like the run's source and used exactly
    (not rounded to 8 bits).  Every image must have the run's shape.  Vector runs: a .npy or .csv of (N, d)
    finite points with the run's d.  Anything else is a DataError naming the file.
    """
    p = Path(path)
    if not p.exists():
        raise DataError(f"{p}: no such file or folder")
    shape = tuple(getattr(source, "shape", None) or ())
    if len(shape) == 3:
        floats = _float_images(p, shape)
        if floats is not None:
            return floats
        data = load_images(p)
        got = tuple(data.images.shape[1:])
        if got != shape:
            raise DataError(f"{p}: the images are {'x'.join(map(str, got))} (C x H x W), this run maps {'x'.join(map(str, shape))}; "
                            "convert or resize them first (rectflow.data.image_sets.resize_images)")
        names = data.names or [f"{i:05d}" for i in range(data.images.shape[0])]
        return TransferInputs(to_unit_range(data.images), names)
    dim = int(getattr(source, "dim", 0))
    if p.is_dir() or p.suffix not in (".npy", ".csv"):
        raise DataError(f"{p}: a vector run maps points from a .npy or .csv file of shape (N, {dim})")
    cloud = PointCloud.from_file(p)
    if cloud.dim != dim:
        raise DataError(f"{p}: the points have {cloud.dim} dimensions, this run maps {dim}")
    return TransferInputs(cloud.points, [str(i) for i in range(len(cloud))])
