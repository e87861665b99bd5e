"""A description of the machine a run or benchmark used (quoted next to every timing)."""

from __future__ import annotations

import os
import platform
from typing import Any

import torch

from rectflow.engine.hardware import hardware_info
from rectflow.version import __version__


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _usable_cores() -> int | None:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count()


def _loadavg() -> list[float] | None:
    try:
        return list(os.getloadavg())
    except (OSError, AttributeError):
        return None


def _version_of(module: str) -> str | None:
    try:
        return __import__(module).__version__
    except Exception:  # noqa: BLE001 - an optional library that is missing or broken is just not listed
        return None


def machine_info() -> dict[str, Any]:
    """CPU model, logical and usable cores, load average, torch threads, GPU (if any), Python /
    torch / numpy / POT / rectflow versions."""
    info: dict[str, Any] = {
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "usable_cores": _usable_cores(),
        "loadavg_1_5_15": _loadavg(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": _version_of("numpy"),
        "pot": _version_of("ot"),
        "rectflow": __version__,
        "cuda": torch.cuda.is_available(),
        **{k: v for k, v in hardware_info("cpu").items() if k != "device"},  # the CPU's ISA and whether bf16 is native on it
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpu_count"] = torch.cuda.device_count()
    return info


def describe(info: dict[str, Any] | None = None) -> str:
    """One line: 'CPU model (N cores, ISA, bf16 native|emulated), GPU, torch x'."""
    info = info or machine_info()
    gpu = f", {info['gpu']}" if info.get("gpu") else ", no GPU"
    isa = f", {info['cpu_capability']}, bf16 {'native' if info.get('bf16_native') else 'emulated'}" if info.get("cpu_capability") else ""
    return f"{info.get('cpu')} ({info.get('cpu_count')} cores{isa}){gpu}, torch {info.get('torch')}"
