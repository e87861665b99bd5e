"""Machine facts of the benchmark scripts: the machine line (from rectflow.runs.machine), the CPU's ISA, load metering.
(Their options and result files: ``_bench``.)"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from rectflow.runs.machine import machine_info  # noqa: F401 - re-exported for the scripts


def machine_line(m: dict[str, Any]) -> str:
    load = m.get("loadavg_1_5_15")
    load_s = f", load average at start {load[0]:.2f}" if load else ""
    return (
        f"Machine: {m['cpu']}, {m['usable_cores']} usable of {m.get('cpu_count', m.get('logical_cores'))} logical cores{load_s}; "
        f"{isa_note(m)}; torch {m['torch']}, numpy {m['numpy']}, POT {m['pot']}, Python {m['python']}."
    )


def isa_note(m: dict[str, Any]) -> str:
    """'CPU capability AVX512 (AMX), bf16 native' from a machine_info dict (what decides the fast precision on a CPU)."""
    extra = ", ".join(n for n, k in (("AMX", "amx_bf16"), ("AVX512-BF16", "avx512_bf16")) if m.get(k))
    cap = m.get("cpu_capability", "unknown")
    return f"CPU capability {cap}{f' ({extra})' if extra else ''}, bf16 {'native' if m.get('bf16_native') else 'emulated'}"


class LoadMeter:
    """CPU used by *other* processes while a measurement runs, in cores (0 = machine to ourselves).

    Linux only (reads /proc/stat); elsewhere ``foreign_cores`` is None.  Our own CPU time counts
    this process and its reaped children (e.g. DataLoader workers, joined when a run ends).
    """

    def __init__(self) -> None:
        self._hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        self.foreign_cores: float | None = None

    @staticmethod
    def _busy_jiffies() -> int | None:
        try:
            f = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
        except OSError:
            return None
        v = [int(x) for x in f]
        return sum(v[:8]) - v[3] - v[4]  # minus idle and iowait

    @staticmethod
    def _own_cpu() -> float:
        import resource

        s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime

    def __enter__(self) -> "LoadMeter":
        import time

        self._b0, self._o0, self._t0 = self._busy_jiffies(), self._own_cpu(), time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        import time

        b1, o1, t1 = self._busy_jiffies(), self._own_cpu(), time.perf_counter()
        if self._b0 is None or b1 is None or t1 <= self._t0:
            return
        self.foreign_cores = max(0.0, ((b1 - self._b0) / self._hz - (o1 - self._o0)) / (t1 - self._t0))


def wait_quiet(max_wait_s: float, threshold_cores: float = 0.3, window_s: float = 1.0) -> float | None:
    """Sleep (up to ``max_wait_s``) until other processes use less than ``threshold_cores``;
    returns the last measured foreign load."""
    import time

    deadline = time.monotonic() + max_wait_s
    while True:
        with LoadMeter() as m:
            time.sleep(window_s)
        if m.foreign_cores is None or m.foreign_cores < threshold_cores or time.monotonic() >= deadline:
            return m.foreign_cores
