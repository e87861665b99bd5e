"""A description of the machine a run or benchmark used (quoted next to every timing)."""

from __future__ import annotations

import os
import platform
from typing import Any

import torch


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def machine_info() -> dict[str, Any]:
    """CPU model and count, torch threads, GPU (if any), Python / torch / rectflow versions."""
    from . import __version__

    info: dict[str, Any] = {
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "rectflow": __version__,
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpu_count"] = torch.cuda.device_count()
    return info


def describe(info: dict[str, Any] | None = None) -> str:
    """One line: 'CPU model (N cores), GPU, torch x'."""
    info = info or machine_info()
    gpu = f", {info['gpu']}" if info.get("gpu") else ", no GPU"
    return f"{info.get('cpu')} ({info.get('cpu_count')} cores){gpu}, torch {info.get('torch')}"
