"""The end-to-end demo: 1-RF on the seed's two tasks (Gaussian -> circle, Gaussian -> moons),
a W2-vs-NFE table and the three plots per task; then the reflow pipeline on the moons task
(1-RF -> pairs -> 2-RF -> distillation, theory §4) with one stage-by-stage table."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Sequence

from rectflow.engine.io import atomic_path, save_json
from rectflow.reflow.pairs import PairOptions, PairStore
from rectflow.runs.config import config_from_dict
from rectflow.runs.diagnose import diagnose_runs, format_stage_table
from rectflow.runs.distill_job import train_distill
from rectflow.runs.evaluation import evaluate_run, format_table
from rectflow.runs.experiment import load_run, train_run
from rectflow.runs.plots import plot_run
from rectflow.runs.reflow_job import train_reflow

__all__ = ["DEMO_TASKS", "run_demo", "run_pipeline", "task_config"]

DEMO_TASKS = {"circle": ("gaussian", "circle"), "moons": ("gaussian", "moons")}


def task_config(source: Any, target: Any, *, steps: int = 3000, n_eval: int = 2000, progress: bool = True) -> Any:
    """The demo's 1-RF config: 3x256 MLP, batch 256, Adam 1e-3 with 100 warmup steps, fp32 (the README's table must be what
    every machine prints; bf16 autocast, which ``precision: auto`` picks on CPUs with native bf16, rounds by the CPU)."""
    return config_from_dict(
        {
            "source": source,
            "target": target,
            "train": {"steps": steps, "batch_size": 256, "lr": 1e-3, "warmup_steps": 100, "log_every": 100, "ckpt_every": 1000, "progress": progress,
                      "precision": "fp32"},
            "eval": {"n_samples": n_eval},
        }
    )


def run_demo(
    out: str | Path = "runs/demo",
    *,
    steps: int = 3000,
    n_eval: int = 2000,
    progress: bool = True,
    pipeline: bool = True,
    n_pairs: int = 10_000,
    echo=print,
) -> dict[str, list[dict[str, Any]]]:
    """Train, evaluate and plot each demo task into ``out/<task>``; then (``pipeline``) reflow and
    distil the moons task (:func:`run_pipeline`, into ``out/moons-2rf``, ``out/moons-2rf-distill``
    and ``out/pipeline``).  Returns the tables (the pipeline's rows under ``"pipeline"``)."""
    out = Path(out)
    tables = {}
    for name, (source, target) in DEMO_TASKS.items():
        cfg = task_config(source, target, steps=steps, n_eval=n_eval, progress=progress)
        echo(f"== 1-RF {source} -> {target}: {steps} steps, run dir {out / name}")
        train_run(cfg, out / name)
        run = load_run(out / name)
        rows = evaluate_run(run)
        plot_run(run)
        echo(format_table(rows, ["solver", "nfe", "w2", "energy"]))
        echo(f"plots: {out / name / 'plots'}\n")
        tables[name] = rows
    if pipeline:
        res = run_pipeline(out, target="moons", base_run=out / "moons", steps=steps, n_pairs=n_pairs, n_eval=n_eval, progress=progress, echo=echo)
        tables["pipeline"] = res["rows"]
    return tables


def run_pipeline(
    out: str | Path = "runs/pipeline",
    *,
    source: Any = "gaussian",
    target: Any = "moons",
    steps: int = 3000,
    reflow_steps: int | None = None,
    distill_steps: int | None = None,
    stages: int = 1,
    n_pairs: int = 10_000,
    pair_solver: str = "dopri5",
    pair_tol: float = 1e-4,
    distill_overrides: Sequence[str] = ("train.lr=0.0001", "train.warmup_steps=0"),
    n_eval: int = 2000,
    base_run: str | Path | None = None,
    progress: bool = True,
    echo: Callable[[str], None] = print,
) -> dict[str, Any]:
    """1-RF -> pairs -> 2-RF (-> 3-RF ...) -> distillation on one 2-D task, and one table.

    Runs go to ``out/<target>`` (the 1-RF, or ``base_run`` when given), ``out/<target>-<k>rf``
    and ``out/<target>-<k>rf-distill``; the table to ``out/pipeline/table.md`` (and ``rows.json``),
    the quality-vs-NFE, per-stage trajectory and crossing plots to ``out/pipeline``; each stage
    without an evaluation of its step gets its row of the table as ``eval.json``.

    Args:
        steps: 1-RF training steps; ``reflow_steps`` (default ``steps``) per reflow and
            ``distill_steps`` (default ``steps // 2``) for distillation.
        stages: number of reflows (1: 2-RF; 2: 2-RF and 3-RF); the last one is distilled.
        n_pairs, pair_solver, pair_tol: the pairs generated from each k-RF (dopri5 rtol = atol = pair_tol).
        distill_overrides: config overrides of the distillation run (it starts from the k-RF's
            weights, so a smaller learning rate than training from scratch).
    Returns:
        {"rows": the table rows, "table": markdown, "runs": run directories, "dir": out/pipeline}.
    """
    out = Path(out)
    name = target if isinstance(target, str) else str(target.get("name", "target"))
    timings: dict[str, float] = {}
    t = time.perf_counter()
    if base_run is None:
        base_run = out / name
        echo(f"== 1-RF {source} -> {target}: {steps} steps, run dir {base_run}")
        train_run(task_config(source, target, steps=steps, n_eval=n_eval, progress=progress), base_run)
        timings["1-RF"] = time.perf_counter() - t  # only when trained here (a given base_run was trained before)
    runs = [Path(base_run)]
    pair_kw = {"options": PairOptions(solver=pair_solver, rtol=pair_tol, atol=pair_tol), "progress": progress}
    for k in range(2, stages + 2):
        t = time.perf_counter()
        echo(f"== {k}-RF: {n_pairs} pairs of the {k - 1}-RF ({pair_solver}), then {reflow_steps or steps} steps from its weights")
        runs.append(
            train_reflow(
                runs[-1], Path(base_run).parent / f"{name}-{k}rf", n_pairs=n_pairs, steps=reflow_steps or steps, **pair_kw
            )
        )
        timings[f"{k}-RF"] = time.perf_counter() - t
    t = time.perf_counter()
    k = stages + 1
    echo(f"== {k}-RF + distillation: {n_pairs} pairs of the {k}-RF, {distill_steps or steps // 2} steps at t = 0")
    runs.append(
        train_distill(
            runs[-1],
            Path(runs[-1]).parent / f"{Path(runs[-1]).name}-distill",
            n_pairs=n_pairs,
            steps=distill_steps or max(1, steps // 2),
            overrides=list(distill_overrides),
            **pair_kw,
        )
    )
    timings["distill"] = time.perf_counter() - t
    t = time.perf_counter()
    for run_dir in runs[1:]:  # samples and trajectories of each new run, in its plots/ (as `rectflow train` does)
        run = load_run(run_dir)
        plot_run(run)
    pdir = out / "pipeline"
    rows = diagnose_runs(runs, plots_dir=pdir, write_eval=True, echo=echo)  # eval.json for each stage that has none: `rectflow report` charts them
    timings["diagnostics"] = time.perf_counter() - t
    table = format_stage_table(rows)
    stats = {}
    for run_dir in runs[:-1]:
        for store_dir in sorted((run_dir / "pairs").glob("*")) if (run_dir / "pairs").is_dir() else []:
            st = PairStore(store_dir, verify=False).manifest.get("stats", {})
            stats[str(store_dir)] = st
    save_json(pdir / "rows.json", {"rows": rows, "runs": [str(r) for r in runs], "timings_s": timings, "pair_stores": stats})
    with atomic_path(pdir / "table.md") as tmp:
        tmp.write_text(table + "\n")
    echo(table)
    echo("times (s): " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items()))
    echo(f"table, rows and plots (quality_vs_nfe.png, stages.png, crossings_*.png): {pdir}\n")
    return {"rows": rows, "table": table, "runs": runs, "dir": pdir, "timings": timings}
