"""What the hardware computes fast: the CPU's vector ISA, native bf16, and how many threads a process should take.

bf16 autocast is fast only where the device computes bf16 natively: CUDA devices with bf16 support, and CPUs whose
oneDNN reports native bf16 (AVX512-BF16 or AMX).  On an AVX2-only CPU it is emulated and many times slower than fp32
(16x measured on a 2-core EPYC, issue 29).  ``precision="auto"`` therefore means bf16 where it is native and fp32
elsewhere; ``rectflow tune`` measures what is fastest for one model on one machine.

Threads: OpenMP threads of processes that share the cores spin against each other, so two 2-thread processes on 2
cores are far more than twice as slow as one.  ``threads=None`` (auto) gives each rank of a ``torchrun`` job
``cores // local_world_size`` threads and leaves DataLoader workers a core.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

import torch

from rectflow.errors import ConfigError, check_int

__all__ = ["PRECISIONS", "default_device", "resolve_device", "cpu_capability", "native_bf16", "resolve_precision", "precision_note", "usable_cores", "resolve_threads", "torch_threads",
           "hardware_info"]

PRECISIONS = ("auto", "fp32", "bf16")


def default_device() -> torch.device:
    """The fastest device here: CUDA, else Apple's MPS, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def resolve_device(name: str) -> torch.device:
    """``auto`` -> :func:`default_device`; anything else is checked and passed to ``torch.device``."""
    if name == "auto":
        return default_device()
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError):
        raise ConfigError(f"device {name!r} is not a device: use auto, cpu, cuda, cuda:N or mps") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} requested but CUDA is not available")
    if dev.type == "mps" and not (getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()):
        raise ConfigError(f"device {name!r} requested but Apple's MPS is not available")
    return dev


def cpu_capability() -> str:
    """The CPU's vector ISA as PyTorch dispatches for it: ``AVX2``, ``AVX512``, ``DEFAULT`` ... (``ATEN_CPU_CAPABILITY`` lowers it)."""
    try:
        return str(torch.backends.cpu.get_cpu_capability())
    except Exception:  # noqa: BLE001 - an old torch without the query
        return "unknown"


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def native_bf16(device: torch.device | str = "cpu") -> bool:
    """Whether ``device`` computes bf16 natively (CUDA with bf16 support; a CPU whose oneDNN has AVX512-BF16 or AMX)."""
    device = torch.device(device)
    if device.type == "cuda":
        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    if device.type == "cpu":
        try:
            return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except (AttributeError, RuntimeError):
            return False
    if device.type == "mps":
        return True  # Apple silicon's GPU has bf16 since macOS 14; fp32 stays the safe default there (auto does not pick it)
    return False


def resolve_precision(precision: str, device: torch.device | str) -> str:
    """``auto`` -> ``bf16`` where :func:`native_bf16` (CUDA, or a CPU with native bf16), else ``fp32``; ``fp32`` / ``bf16`` as given."""
    if precision not in PRECISIONS:
        raise ConfigError(f"train.precision must be one of {list(PRECISIONS)}, got {precision!r}")
    device = torch.device(device)
    if precision != "auto":
        return precision
    return "bf16" if device.type in ("cpu", "cuda") and native_bf16(device) else "fp32"


def precision_note(precision: str, device: torch.device | str) -> str | None:
    """A one-line warning when ``precision`` is bf16 on a device that only emulates it, else None."""
    device = torch.device(device)
    if precision == "bf16" and device.type == "cpu" and not native_bf16(device):
        return (f"bf16 on this CPU ({cpu_capability()}, no AVX512-BF16 / AMX) is emulated and many times slower than fp32; "
                "use train.precision=auto or fp32")
    return None


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def resolve_threads(threads: int | None, *, workers: int = 0, local_world_size: int | None = None, cores: int | None = None) -> int:
    """Torch threads of one process: ``threads`` when given; else the usable cores shared by the ``local_world_size`` ranks on
    this machine (``LOCAL_WORLD_SIZE`` under torchrun), less one core for DataLoader workers when there are any; at least 1."""
    if threads is not None:
        check_int(threads, "train.threads", note=" or null (auto)")
        return threads
    cores = cores or usable_cores()
    ranks = local_world_size or int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    per = max(1, cores // max(1, ranks))
    if workers and per > 1:
        per -= 1
    return per


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run the block with ``n`` torch threads and restore the process's own count after it."""
    old = torch.get_num_threads()
    if n != old:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if torch.get_num_threads() != old:
            torch.set_num_threads(old)


def hardware_info(device: torch.device | str = "cpu") -> dict[str, Any]:
    """CPU capability, AMX / AVX512-BF16 flags and whether bf16 is native on ``device`` (for machine lines and machine.json)."""
    flags = _cpu_flags()
    return {"cpu_capability": cpu_capability(), "avx512_bf16": "avx512_bf16" in flags, "amx_bf16": "amx_bf16" in flags,
            "bf16_native": native_bf16(device), "device": str(torch.device(device))}
