"""``rectflow tune``: which speed settings win for this config's model and batch on this machine, measured.

Every candidate (precision fp32 / bf16, channels-last memory format for image models, ``torch.compile`` when asked,
1 thread or all the usable cores) trains the config's own model on its own objective through the real
:class:`~rectflow.engine.trainer.Trainer` (the same data path, optimizer and EMA as ``rectflow train``).  Candidates run
in alternating rounds of a few steps each until the time budget is spent, after warm-up steps that are not timed
(compilation included), and each is scored by its best round's median step time: alternation spreads a busy
neighbour over all of them, best-of keeps the one round it left alone.

The table is the evidence behind ``precision: auto`` on a given CPU, and the overrides that win can be written to a
YAML file for ``rectflow train --config``.
"""

from __future__ import annotations

import copy
import statistics
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import yaml

from rectflow.engine.hardware import cpu_capability, native_bf16, resolve_device, usable_cores
from rectflow.engine.io import atomic_path
from rectflow.engine.trainer import Trainer
from rectflow.errors import ConfigError
from rectflow.runs.config import ExperimentConfig
from rectflow.runs.experiment import build_distributions, build_model, build_objective, model_config, sample_shape

__all__ = ["Candidate", "tune", "render_table", "write_overrides"]


@dataclass(frozen=True)
class Candidate:
    """One set of speed settings."""

    precision: str = "fp32"
    channels_last: bool = False
    compile: bool = False
    threads: int = 1

    @property
    def label(self) -> str:
        parts = [self.precision] + (["channels-last"] if self.channels_last else []) + (["compile"] if self.compile else [])
        return " + ".join(parts) + f", {self.threads} thread{'s' if self.threads > 1 else ''}"

    def overrides(self) -> dict[str, Any]:
        return {"precision": self.precision, "channels_last": self.channels_last, "compile": self.compile, "threads": self.threads}


def candidates(image: bool, *, compile: bool, threads: list[int]) -> list[Candidate]:
    """Every combination of precision, channels-last (image models only), compile (when asked) and thread count."""
    out = []
    for th in threads:
        for prec in ("fp32", "bf16"):
            for cl in ((False, True) if image else (False,)):
                for comp in ((False, True) if compile else (False,)):
                    out.append(Candidate(prec, cl, comp, th))
    return out


def _round(cfg: ExperimentConfig, model: torch.nn.Module, objective: Any, cand: Candidate, steps: int, warmup: int) -> float:
    """Median seconds per step of ``steps`` timed steps after ``warmup`` untimed ones, through the Trainer."""
    stamps: list[float] = []
    train = replace(cfg.train, steps=warmup + steps, precision=cand.precision, channels_last=cand.channels_last, compile=cand.compile,
                    threads=cand.threads, progress=False, log_every=10**9, ckpt_every=10**9, workers=0, sample_every=0)
    trainer = Trainer(copy.deepcopy(model), objective, train, None, callbacks=[lambda tr, step: stamps.append(time.perf_counter())])
    t0 = time.perf_counter()
    trainer.fit(resume=False)
    times = [b - a for a, b in zip([t0, *stamps[:-1]], stamps)][warmup:]
    return statistics.median(times)


def tune(cfg: ExperimentConfig, *, seconds: float = 60.0, steps: int = 4, warmup: int = 2, compile: bool = False,
         threads: list[int] | None = None, log: Any = None) -> dict[str, Any]:
    """Time the candidates for ``cfg``'s model and batch; returns the rows (best of the rounds, seconds per step and
    samples per second), the winner and the machine facts.  ``seconds`` bounds the whole run after the first round."""
    if seconds <= 0 or steps < 1 or warmup < 0:
        raise ConfigError(f"tune: seconds must be > 0, steps >= 1 and warmup >= 0, got {seconds}, {steps}, {warmup}")
    device = resolve_device(cfg.train.device)
    source, target = build_distributions(cfg)
    shape = sample_shape(source)
    torch.manual_seed(cfg.train.seed)
    model = build_model(model_config(cfg, source.dim, shape))
    objective = build_objective(cfg, source, target)
    cores = usable_cores()
    threads = threads or sorted({1, cores})
    cands = candidates(len(shape) == 3, compile=compile, threads=threads)
    best: dict[Candidate, float] = {}
    t_start, rounds = time.perf_counter(), 0
    while rounds == 0 or time.perf_counter() - t_start < seconds:
        for cand in cands:
            s = _round(cfg, model, objective, cand, steps, warmup if rounds == 0 or cand.compile else 1)
            best[cand] = min(best.get(cand, float("inf")), s)
        rounds += 1
        if log:
            log(f"round {rounds}: " + ", ".join(f"{c.label} {1e3 * best[c]:.0f} ms" for c in cands))
    base = best[Candidate("fp32", False, False, max(threads))]
    rows = [{**c.overrides(), "label": c.label, "s_per_step": best[c], "samples_per_s": cfg.train.batch_size / best[c], "speedup": base / best[c]}
            for c in cands]
    rows.sort(key=lambda r: r["s_per_step"])
    return {"rows": rows, "winner": rows[0], "rounds": rounds, "batch_size": cfg.train.batch_size, "device": str(device),
            "cpu_capability": cpu_capability(), "bf16_native": native_bf16(device), "cores": cores,
            "auto_precision": "bf16" if native_bf16(device) else "fp32"}


def render_table(result: dict[str, Any]) -> str:
    """The measurements as a markdown table, fastest first, with the speed-up over fp32 eager on all threads."""
    lines = [f"{result['device']} ({result['cpu_capability']}, bf16 {'native' if result['bf16_native'] else 'emulated'}, {result['cores']} cores), "
             f"batch {result['batch_size']}, best of {result['rounds']} alternating rounds", "",
             "| settings | ms / step | samples / s | vs fp32 |", "|---|---:|---:|---:|"]
    lines += [f"| {r['label']} | {1e3 * r['s_per_step']:.1f} | {r['samples_per_s']:.0f} | {r['speedup']:.2f}x |" for r in result["rows"]]
    return "\n".join(lines)


def write_overrides(path: str | Path, result: dict[str, Any]) -> Path:
    """The winner's settings as a YAML config fragment (``train:`` section) for ``rectflow train --config``."""
    w = result["winner"]
    body = {"train": {k: w[k] for k in ("precision", "channels_last", "compile", "threads")}}
    text = (f"# rectflow tune: fastest on {result['device']} ({result['cpu_capability']}), batch {result['batch_size']}: "
            f"{1e3 * w['s_per_step']:.1f} ms/step, {w['speedup']:.2f}x fp32\n") + yaml.safe_dump(body, sort_keys=False)
    with atomic_path(Path(path)) as tmp:
        Path(tmp).write_text(text)
    return Path(path)
