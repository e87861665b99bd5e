"""Quality vs NFE: sample a model with several solvers and compare with held-out target samples."""

from __future__ import annotations

import time
from typing import Any, Iterable

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from rectflow.engine.io import atomic_path, save_json
from rectflow.errors import ConfigError
from rectflow.flow.metrics import energy_distance, wasserstein2
from rectflow.flow.sampling import parse_solver_spec, sample_model, solver_label
from rectflow.runs.experiment import Run

__all__ = ["evaluate_solvers", "format_table", "heldout_samples", "evaluate_run", "save_evaluation"]


def evaluate_solvers(
    model: nn.Module,
    x0: Tensor,
    x1_ref: Tensor,
    solvers: Iterable[str],
    *,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    metrics: tuple[str, ...] = ("w2", "energy"),
    progress: bool | None = None,
) -> list[dict[str, Any]]:
    """One row per solver spec ("euler:4", "dopri5", ...): NFE, W2 and energy distance between
    the model's samples from ``x0`` and the reference target samples ``x1_ref``.
    ``progress``: a bar over solvers (None: only on a terminal; False: never)."""

    rows = []
    specs = list(solvers)
    for spec in tqdm(specs, desc="eval", unit="solver", disable=progress is False or None, leave=False):
        method, steps = parse_solver_spec(spec)
        t = time.perf_counter()
        res = sample_model(model, x0, method=method, steps=steps, rtol=rtol, atol=atol)
        row: dict[str, Any] = {"solver": solver_label(method, steps), "nfe": res.nfe, "sample_s": time.perf_counter() - t}
        if "w2" in metrics:
            row["w2"] = wasserstein2(res.x, x1_ref)
        if "energy" in metrics:
            row["energy"] = energy_distance(res.x, x1_ref)
        rows.append(row)
    return rows


def format_table(rows: list[dict[str, Any]], columns: list[str] | None = None, floatfmt: str = ".4f") -> str:
    """A GitHub-markdown table of ``rows`` (dicts), columns in order of first appearance."""
    if not rows:
        return "(no rows)"
    cols = columns or list(dict.fromkeys(k for r in rows for k in r))

    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return format(v, floatfmt)
        return "" if v is None else str(v)

    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def heldout_samples(run: Run, n: int | None = None, seed: int | None = None) -> tuple[Tensor, Tensor]:
    """Held-out source and target samples for evaluation (streams disjoint from training's)."""
    n = run.config.eval.n_samples if n is None else n
    if isinstance(n, bool) or not isinstance(n, int) or n < 2:
        raise ConfigError(f"number of held-out samples (--n) must be an integer >= 2 (a distance between one-point sets means nothing), got {n!r}")
    seed = run.config.eval.seed if seed is None else seed
    g = torch.Generator().manual_seed(seed)
    x0 = run.source.sample(n, generator=g)
    x1 = run.target.sample(n, generator=g)
    return x0, x1


def evaluate_run(run: Run, *, n: int | None = None, solvers: list[str] | None = None, write: bool = True) -> list[dict[str, Any]]:
    """W2 / energy distance vs NFE for each solver; ``write``: also :func:`save_evaluation`."""
    x0, x1 = heldout_samples(run, n)
    dev = next(run.model.parameters()).device
    rows = evaluate_solvers(run.model, x0.to(dev), x1, solvers or run.config.eval.solvers, rtol=run.config.eval.rtol, atol=run.config.eval.atol)
    if write:
        save_evaluation(run, rows, x0.shape[0])
    return rows


def save_evaluation(run: Run, rows: list[dict[str, Any]], n_samples: int) -> None:
    """Write the rows of :func:`evaluate_run` (from ``n_samples`` held-out points per side) into the
    run as eval.json and eval.md; OutputError naming the file when the run cannot be written."""
    save_json(run.path / "eval.json", {"step": run.step, "n_samples": n_samples, "rows": rows})
    with atomic_path(run.path / "eval.md") as tmp:
        tmp.write_text(format_table(rows, ["solver", "nfe", "w2", "energy"]) + "\n")
