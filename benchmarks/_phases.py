"""Resumable phases of a long benchmark: each phase writes ``WORK/phases/NAME.json`` (atomically) when it finishes and is
skipped when the script runs again, so a killed benchmark resumes at its first unfinished phase (a training phase resumes
inside itself from its own checkpoints)."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any, Callable

from _bench import RESULTS, ROOT, bench_args, np_json
from rectflow.engine.io import save_json

__all__ = ["Phases", "log"]


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


class Phases:
    """``done(name)``: a finished phase's result or None; ``run(name, fn)``: that result, or ``fn()``'s, timed and stored."""

    def __init__(self, work: Path) -> None:
        self.folder = Path(work) / "phases"

    def done(self, name: str) -> dict | None:
        p = self.folder / f"{name}.json"
        return json.loads(p.read_text()) if p.is_file() else None

    def run(self, name: str, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        got = self.done(name)
        if got is None:
            log(f"phase {name}")
            t0 = time.perf_counter()
            got = np_json(fn())
            got["phase_seconds"] = time.perf_counter() - t0
            save_json(self.folder / f"{name}.json", got)
            log(f"phase {name} done: " + json.dumps({k: v for k, v in got.items() if not isinstance(v, (list, dict))}))
        return got

    def all(self) -> dict[str, dict[str, Any]]:
        """Every finished phase's result, by name."""
        return {p.stem: json.loads(p.read_text()) for p in sorted(self.folder.glob("*.json"))}


class PhasedBench:
    """The shell of a resumable benchmark: ``a`` its parsed arguments (``work``: where phases, runs and caches go),
    ``phase(name, fn)`` / ``done(name)`` (:class:`Phases`), a cache dict, and CIFAR-10 at ``a.size`` (``a.smoke``: the
    test ZIP's first images only)."""

    def __init__(self, a: Any) -> None:
        self.a, self.work = a, Path(a.work)
        self.work.mkdir(parents=True, exist_ok=True)
        self.phases = Phases(self.work)
        self._cache: dict[str, Any] = {}

    def done(self, name: str) -> dict | None:
        return self.phases.done(name)

    def phase(self, name: str, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        return self.phases.run(name, fn)

    def cifar(self, split: str, classes: list[str] | None = None, smoke_n: int = 600) -> Any:
        """CIFAR-10 ``split`` ("train" / "test") resized to ``a.size``, optionally only ``classes`` (cached)."""
        from rectflow.data.image_sets import ImageArray, load_images, resize_images

        key = f"cifar-{split}-{classes}"
        if key not in self._cache:
            zip_ = self.a.test_zip if split == "test" or self.a.smoke else self.a.train_zip
            d = resize_images(load_images(zip_, classes=classes), self.a.size)
            if self.a.smoke:
                d = ImageArray(d.images[:smoke_n], None if d.labels is None else d.labels[:smoke_n], d.class_names, d.source)
            self._cache[key] = d
        return self._cache[key]


def phased_args(description: str, name: str, report_only: str | None = None) -> argparse.ArgumentParser:
    """An ArgumentParser with the options every phased CIFAR-10 benchmark takes: those of :func:`_bench.bench_args`
    (``--out``, ``--name``, ``--threads`` (default 1) and, given its help text, ``--report-only``), ``--train-zip``,
    ``--test-zip``, ``--size``, ``--work`` (default ``benchmarks/results/tmp/NAME``) and ``--smoke``."""
    data = ROOT.parent / "shared" / "data" / "cifar10-jpeg"
    ap = bench_args(description, name, threads=1, threads_help="torch threads (1: leaves the other core of a 2-core machine free)",
                    report_only=report_only)
    ap.add_argument("--train-zip", type=Path, default=data / "train.zip")
    ap.add_argument("--test-zip", type=Path, default=data / "test.zip")
    ap.add_argument("--size", type=int, default=16, help="image side after downsampling")
    ap.add_argument("--work", type=Path, default=RESULTS / "tmp" / name, help="runs, caches and phase results (git-ignored)")
    ap.add_argument("--smoke", action="store_true", help="tiny everything: checks the script in minutes")
    return ap
