"""Quality vs NFE: sample a model with several solvers and compare with held-out target samples."""

from __future__ import annotations

import time
from typing import Any, Iterable

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from rectflow.data import point_file_path
from rectflow.data.image_sets import to_uint8
from rectflow.diffusion.specs import parse_spec, sample, spec_label
from rectflow.engine.io import atomic_path, save_json
from rectflow.errors import ConfigError, check_int
from rectflow.flow.likelihood import bits_per_dim, dequantize, log_likelihood
from rectflow.flow.metrics import energy_distance, wasserstein2
from rectflow.flow.solvers import METHODS
from rectflow.runs.experiment import Run

__all__ = ["evaluate_nll", "evaluate_solvers", "format_table", "heldout_samples", "evaluation_reference", "format_reference", "evaluate_run", "evaluation_record", "save_evaluation"]


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
        method, steps = parse_spec(spec)
        t = time.perf_counter()
        res = sample(model, x0, spec, rtol=rtol, atol=atol)
        row: dict[str, Any] = {"solver": spec_label(method, steps), "nfe": res.nfe, "sample_s": time.perf_counter() - t}
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


def _sample_count(run: Run, n: int | None) -> int:
    n = run.config.eval.n_samples if n is None else n
    check_int(n, "number of held-out samples (--n)", 2, note=" (a distance between one-point sets means nothing)")
    return n


def _rows(cloud: Any, n: int, g: torch.Generator) -> Tensor:
    """n distinct rows of a point cloud (all of them when it has fewer), in a seeded random order."""
    return cloud.points[torch.randperm(cloud.points.shape[0], generator=g)[:n]]


def _draws(run: Run, n: int | None, seed: int | None, floor: bool) -> tuple[Tensor, Tensor, Tensor | None]:
    """Source points, reference target points and (``floor``) a second target sample independent
    of the reference and of the same size (file targets: training rows)."""
    n = _sample_count(run, n)
    g = torch.Generator().manual_seed(run.config.eval.seed if seed is None else seed)
    if run.heldout is not None:  # a file target: its held-out rows, each at most once
        n = min(n, run.heldout.points.shape[0])
        x0 = run.source.sample(n, generator=g)
        x1 = _rows(run.heldout, n, g)
        return x0, x1, _rows(run.target, n, g) if floor else None
    x0 = run.source.sample(n, generator=g)
    x1 = run.target.sample(n, generator=g)
    return x0, x1, run.target.sample(n, generator=g) if floor else None


def heldout_samples(run: Run, n: int | None = None, seed: int | None = None) -> tuple[Tensor, Tensor]:
    """Source and reference target samples for evaluation, from streams disjoint from training's
    (seed ``eval.seed``).  A registered target: ``n`` fresh draws.  A file target: its held-out rows
    (``eval.holdout``), each at most once, so at most that many points on each side."""
    x0, x1, _ = _draws(run, n, seed, floor=False)
    return x0, x1


def _spec_label(spec: Any) -> str:
    return str(spec.get("path", spec.get("name", spec))) if isinstance(spec, dict) else str(spec)


def _against(run: Run, n: int, seed: int) -> str:
    """What :func:`heldout_samples` compares with, in words."""
    cfg = run.config
    if run.heldout is not None:
        return (f"held-out rows of {point_file_path(cfg.target)}: {n:,} of the {run.heldout.points.shape[0]:,} rows never trained on "
                f"(eval.holdout {cfg.eval.holdout}, seed {seed})")
    if point_file_path(cfg.target) is not None:
        return f"{n:,} rows drawn with replacement from the training file {point_file_path(cfg.target)} (not held out: eval.holdout is {cfg.eval.holdout or 0})"
    if isinstance(cfg.target, dict) and cfg.target.get("name") in ("images", "digits"):
        return f"{n:,} draws of the training images {_spec_label(cfg.target)} (not held out)"
    return f"fresh draws of {_spec_label(cfg.target)} ({n:,} points, seed {seed})"


def evaluation_reference(run: Run, n: int | None = None, seed: int | None = None) -> dict[str, Any]:
    """What evaluation measures against: ``against`` (in words), ``n_samples`` (points per side)
    and the finite-sample floor ``floor_w2`` / ``floor_energy``: the distances between the reference
    points and an independent sample of the same distribution and size (a fresh draw; for a file
    target, training rows), which is what a perfect model scores."""
    seed = run.config.eval.seed if seed is None else seed
    _, x1, x1b = _draws(run, n, seed, floor=True)
    return {"against": _against(run, x1.shape[0], seed), "n_samples": x1.shape[0], "floor_w2": wasserstein2(x1b, x1), "floor_energy": energy_distance(x1b, x1)}


def format_reference(reference: dict[str, Any]) -> str:
    """One line for under a table: what it was measured against and the finite-sample floor."""
    return (f"measured against {reference['against']}; finite-sample floor W2 {reference['floor_w2']:.4f}, "
            f"energy {reference['floor_energy']:.4f} (an independent sample of the same size against the same points)")


def evaluate_run(run: Run, *, n: int | None = None, solvers: list[str] | None = None, write: bool = True) -> list[dict[str, Any]]:
    """W2 / energy distance vs NFE for each solver; ``write``: also :func:`save_evaluation`."""
    x0, x1 = heldout_samples(run, n)
    dev = next(run.model.parameters()).device
    rows = evaluate_solvers(run.model, x0.to(dev), x1, solvers or run.config.eval.solvers, rtol=run.config.eval.rtol, atol=run.config.eval.atol)
    if write:
        save_evaluation(run, rows, x0.shape[0], evaluation_reference(run, n))
    return rows


def evaluate_nll(run: Run, *, n: int | None = None, estimator: str | None = None, probes: int = 1, solver: str = "dopri5",
                 rtol: float = 1e-5, atol: float = 1e-5, seed: int = 0) -> dict[str, Any]:
    """Negative log-likelihood of the held-out target points under the run's flow (theory §3.4).

    ``estimator``: ``"exact"`` or ``"hutchinson"`` (default: exact up to 16 dimensions).  Images are
    dequantized 8-bit data (uniform noise inside each pixel's bin, seeded) and also get bits per
    dimension.  Returns the mean NLL in nats, its standard error, NFE and the settings.
    Raises ConfigError for a source without a known density (only a Gaussian source has one).
    """
    if run.config.reflow.distill:
        raise ConfigError(f"{run.path} is a distillation run (a one-step map, not an invertible flow): it has no likelihood")
    method, steps = parse_spec(solver)
    if method not in METHODS:  # checked before any data is drawn
        raise ConfigError(f"the likelihood integrates the flow ODE with a flow solver {list(METHODS)}, not {solver!r}")
    _, x1 = heldout_samples(run, n)
    d = x1[0].numel()
    estimator = estimator or ("exact" if d <= 16 else "hutchinson")
    dev = next(run.model.parameters()).device
    images = x1.dim() == 4
    g = torch.Generator().manual_seed(seed)
    data = dequantize(to_uint8(x1), generator=g) if images else x1
    res = log_likelihood(run.model, data.to(dev), run.source, method=method, steps=steps, rtol=rtol, atol=atol,
                         estimator=estimator, probes=probes, generator=g)
    nll = -res.log_prob.double().cpu()
    out: dict[str, Any] = {"n": int(nll.numel()), "nll_nats": float(nll.mean()), "nll_se": float(nll.std() / nll.numel() ** 0.5) if nll.numel() > 1 else None,
                           "nfe": res.nfe, "estimator": estimator, "probes": probes if estimator == "hutchinson" else None, "solver": solver, "dim": d}
    if images:
        bpd = bits_per_dim(-nll, d)
        out.update(bits_per_dim=float(bpd.mean()), bits_per_dim_se=float(bpd.std() / bpd.numel() ** 0.5) if bpd.numel() > 1 else None)
    return out


def evaluation_record(run: Run, rows: list[dict[str, Any]], n_samples: int, reference: dict[str, Any] | None = None) -> dict[str, Any]:
    """The content of eval.json: step, points per side, ``reference`` (:func:`evaluation_reference`) and rows."""
    return {"step": run.step, "n_samples": n_samples, **({"reference": reference} if reference is not None else {}), "rows": rows}


def save_evaluation(run: Run, rows: list[dict[str, Any]], n_samples: int, reference: dict[str, Any] | None = None) -> None:
    """Write the rows of :func:`evaluate_run` (from ``n_samples`` held-out points per side; what they
    were measured against: ``reference``) into the run as eval.json and eval.md; OutputError naming
    the file when the run cannot be written."""
    save_json(run.path / "eval.json", evaluation_record(run, rows, n_samples, reference))
    with atomic_path(run.path / "eval.md") as tmp:
        tmp.write_text(format_table(rows, ["solver", "nfe", "w2", "energy"]) + "\n" + (f"\n{format_reference(reference)}\n" if reference is not None else ""))
