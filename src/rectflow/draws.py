"""Seeded draws made where their generator lives, then moved to where they are used.

A draw's numbers depend on the device it is made on, so every seeded draw of the library is made on its generator's
device and then moved: a CPU generator gives the same batch to a CPU and a CUDA run, and a resumed run redraws exactly.
Without a generator a draw is made on ``draw_on`` (None: torch's default device), from that device's global stream.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = ["draw_device", "rand", "randn", "randint"]


def draw_device(generator: torch.Generator | None, draw_on: Any = None) -> Any:
    """Where a draw from ``generator`` is made: its device, else ``draw_on``."""
    return generator.device if generator is not None else draw_on


def rand(*shape: int | Sequence[int], generator: torch.Generator | None = None, device: Any = None, dtype: torch.dtype | None = None, draw_on: Any = None) -> Tensor:
    """U[0, 1) of ``shape`` (sizes, or one tuple / torch.Size, as torch.rand takes them), drawn on the generator's device (else ``draw_on``), on ``device`` (None: where it was drawn)."""
    x = torch.rand(*shape, generator=generator, device=draw_device(generator, draw_on), dtype=dtype)
    return x if device is None else x.to(device)


def randn(*shape: int | Sequence[int], generator: torch.Generator | None = None, device: Any = None, dtype: torch.dtype | None = None, draw_on: Any = None) -> Tensor:
    """N(0, 1) of ``shape`` (as torch.randn takes it), drawn on the generator's device (else ``draw_on``), on ``device`` (None: where it was drawn)."""
    x = torch.randn(*shape, generator=generator, device=draw_device(generator, draw_on), dtype=dtype)
    return x if device is None else x.to(device)


def randint(high: int, n: int, *, low: int = 0, generator: torch.Generator | None = None, device: Any = None, draw_on: Any = None) -> Tensor:
    """(n,) int64 uniform on {low, ..., high - 1}, drawn on the generator's device (else ``draw_on``), on ``device``."""
    x = torch.randint(low, high, (n,), generator=generator, device=draw_device(generator, draw_on))
    return x if device is None else x.to(device)
