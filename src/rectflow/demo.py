"""The end-to-end demo: 1-RF on the seed's two tasks (Gaussian -> circle, Gaussian -> moons),
a W2-vs-NFE table, and the three plots per task."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .config import config_from_dict
from .evaluation import format_table
from .experiment import evaluate_run, load_run, plot_run, train_run

__all__ = ["DEMO_TASKS", "run_demo"]

DEMO_TASKS = {"circle": ("gaussian", "circle"), "moons": ("gaussian", "moons")}


def run_demo(out: str | Path = "runs/demo", *, steps: int = 3000, n_eval: int = 2000, progress: bool = True, echo=print) -> dict[str, list[dict[str, Any]]]:
    """Train, evaluate and plot each demo task into ``out/<task>``; returns the tables."""
    out = Path(out)
    tables = {}
    for name, (source, target) in DEMO_TASKS.items():
        cfg = config_from_dict(
            {
                "source": source,
                "target": target,
                "train": {"steps": steps, "batch_size": 256, "lr": 1e-3, "warmup_steps": 100, "log_every": 100, "ckpt_every": 1000, "progress": progress},
                "eval": {"n_samples": n_eval},
            }
        )
        echo(f"== 1-RF {source} -> {target}: {steps} steps, run dir {out / name}")
        train_run(cfg, out / name)
        run = load_run(out / name)
        rows = evaluate_run(run)
        plot_run(run)
        echo(format_table(rows, ["solver", "nfe", "w2", "energy"]))
        echo(f"plots: {out / name / 'plots'}\n")
        tables[name] = rows
    return tables
