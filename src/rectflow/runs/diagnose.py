"""Straight-coupling diagnostics for any flow or coupling (theory §4).

* straightness S = int_0^1 E ||(Z1 - Z0) - v(Z_t, t)||^2 dt of a flow (0 = straight paths);
* transport cost E ||Z1 - Z0||^2 of a coupling, and its excess over the exact discrete optimal
  transport cost of the same two point sets (POT's EMD);
* crossing probability of a 2-D coupling: the fraction of random pairs of segments
  [Z0^i, Z1^i], [Z0^j, Z1^j] that intersect, by an exact segment-intersection test, together
  with the intersection points (the seed's figure plots them in red).

Reflow lowers all three; distillation cannot lower the crossing probability of its coupling.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from torch import Tensor

from rectflow.diffusion.specs import parse_spec, sample
from rectflow.engine.io import load_json
from rectflow.errors import CheckpointError, DataError
from rectflow.flow.metrics import wasserstein2
from rectflow.reflow.diagnostics import diagnose_coupling, straightness
from rectflow.runs.evaluation import evaluation_reference, format_table, heldout_samples, save_evaluation
from rectflow.runs.lineage import as_run, stage_label
from rectflow.runs.plots import plot_crossings, plot_quality_vs_nfe, plot_stages

__all__ = ['STAGE_SOLVERS', 'diagnose_runs', 'format_stage_table']


STAGE_SOLVERS = ("euler:1", "euler:2", "euler:4", "euler:8", "euler:100", "dopri5")
"""The solvers of the reflow stage table (theory §4.6): one to 100 Euler steps and dopri5."""


def _slug(label: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in label).strip("_").lower()


def diagnose_runs(
    runs: Sequence[Any],
    *,
    n: int | None = None,
    seed: int | None = None,
    solvers: Sequence[str] = STAGE_SOLVERS,
    coupling_solver: str = "dopri5",
    straightness_steps: int = 100,
    n_pairs: int = 10_000,
    include_independent: bool = True,
    exact_ot: bool = True,
    plots_dir: str | Path | None = None,
    write_eval: bool = False,
    echo: Callable[[str], None] | None = None,
) -> list[dict[str, Any]]:
    """One row per stage of a reflow chain, all on the same held-out points (those of the first run).

    Args:
        runs: run directories or loaded runs (1-RF, 2-RF, ..., distillation runs), same pi0 / pi1.
        n, seed: held-out points per side and their seed (default: the first run's eval settings).
        solvers: W2 columns (a distillation run is only evaluated with ``euler:1``).
        coupling_solver: the solver whose samples define each flow's coupling (Z0, Z1); reused
            from the W2 pass when it is one of ``solvers``.
        include_independent: a first row for the independent (random) coupling of pi0 and pi1.
        plots_dir: when given, writes ``quality_vs_nfe.png`` (with the finite-sample floor),
            ``stages.png`` (trajectories and crossings per stage) and ``crossings_<stage>.png`` there.
        write_eval: also give each run that has no ``eval.json`` for its current step one with its
            W2 row of this table (what ``rectflow report`` charts), measured against the same points.
    Returns:
        rows with ``stage``, ``run``, ``w2@<solver>`` and ``nfe@<solver>`` per solver,
        ``straightness``, ``transport_cost``, ``ot_cost``, ``transport_excess``, ``crossing``.
    """

    loaded = [as_run(r) for r in runs]
    if not loaded:
        raise ValueError("diagnose_runs: no runs given")
    for spec in (*solvers, coupling_solver):
        parse_spec(spec)
    first = loaded[0]
    for r in loaded[1:]:
        if r.dim != first.dim:
            raise DataError(f"{r.path} has dimension {r.dim} but {first.path} has dimension {first.dim}; compare runs of one task")
    x0, x1_ref = heldout_samples(first, n, seed)
    reference = evaluation_reference(first, n, seed) if plots_dir is not None or write_eval else None
    say = echo or (lambda s: None)
    measured: list[Stage] = []
    if include_independent:  # measure
        measured.append(Stage({"stage": "independent", "run": None, "straightness": None}, x1_ref))
    for run in loaded:
        say(f"diagnostics: {stage_label(run.config)} ({run.path})")
        measured.append(_measure_run(run, x0, x1_ref, solvers, coupling_solver, straightness_steps, trajectories=plots_dir is not None and first.dim == 2))
    panels = []
    for st in measured:  # the coupling each stage induces: cost, excess over OT, crossings
        diag = diagnose_coupling(x0, st.x1, n_pairs=n_pairs, seed=0, exact_ot=exact_ot)
        st.row.update(diag.as_row())
        if diag.crossings is not None:
            panels.append({"label": st.row["stage"], "x0": x0, "x1": st.x1, "points": diag.crossings.points, "crossing": diag.crossings.probability,
                           "trajectory": st.trajectory, "times": st.times})
    rows = [st.row for st in measured]
    if write_eval:  # write
        for run, row in zip(loaded, rows[1:] if include_independent else rows):
            if not _evaluated(run):
                save_evaluation(run, [{"solver": s, "nfe": row[f"nfe@{s}"], "w2": row[f"w2@{s}"]} for s in solvers if row[f"w2@{s}"] is not None],
                                x0.shape[0], reference)
    if plots_dir is not None:  # plot
        series = {st.row["stage"]: st.series for st in measured if st.series}
        _plot_diagnostics(Path(plots_dir), series, panels, reference["floor_w2"])
    return rows


@dataclass
class Stage:
    """One measured stage: its table row, the coupling's end points x1 (from the held-out x0), its (NFE, W2) points and,
    for 2-D plots, trajectories."""

    row: dict[str, Any]
    x1: Tensor
    series: list[tuple[int, float]] = field(default_factory=list)
    trajectory: Tensor | None = None
    times: Tensor | None = None


def _measure_run(run: Any, x0: Tensor, x1_ref: Tensor, solvers: Sequence[str], coupling_solver: str, straightness_steps: int, *,
                 trajectories: bool) -> Stage:
    """W2 to the reference per solver, the run's coupling (Z0, Flow(Z0)) and its straightness; a one-step map only at euler:1."""
    label, model = stage_label(run.config), run.model
    z0 = x0.to(next(model.parameters()).device)
    tol = {"rtol": run.config.eval.rtol, "atol": run.config.eval.atol}
    one_step = run.config.reflow.distill
    st = Stage({"stage": label, "run": str(run.path)}, x0)
    coupling_spec = "euler:1" if one_step else coupling_solver
    coupling_x1 = None
    for spec in solvers:
        if one_step and spec != "euler:1":
            st.row[f"w2@{spec}"], st.row[f"nfe@{spec}"] = None, None
            continue
        res = sample(model, z0, spec, **tol)
        st.row[f"w2@{spec}"], st.row[f"nfe@{spec}"] = wasserstein2(res.x.cpu(), x1_ref), res.nfe
        st.series.append((res.nfe, st.row[f"w2@{spec}"]))
        if spec == coupling_spec:
            coupling_x1 = res.x.cpu()
    st.x1 = coupling_x1 if coupling_x1 is not None else sample(model, z0, coupling_spec, **tol).x.cpu()
    st.row["straightness"] = None if one_step else straightness(model, z0, steps=straightness_steps).value
    if trajectories and not one_step:
        res = sample(model, z0[:300], "euler:100", trajectory=True)
        st.trajectory, st.times = res.trajectory[::2].cpu(), res.times[::2]
    return st


def _plot_diagnostics(out: Path, series: dict[str, list[tuple[int, float]]], panels: list[dict[str, Any]], floor: float) -> None:
    """quality_vs_nfe.png, stages.png and crossings_<stage>.png in ``out``."""
    if series:
        plot_quality_vs_nfe(series, out / "quality_vs_nfe.png", floor=floor)
    if panels:
        plot_stages(panels, out / "stages.png")
        for p in panels:
            plot_crossings(p["x0"], p["x1"], p["points"], out / f"crossings_{_slug(p['label'])}.png", title=f"{p['label']}: crossing p = {p['crossing']:.4f}")


def _evaluated(run: Any) -> bool:
    """Whether the run holds an eval.json of its current step (made by ``rectflow eval``: kept)."""
    try:
        ev = load_json(Path(run.path) / "eval.json")
    except CheckpointError:  # none, or unreadable: write one
        return False
    return isinstance(ev, dict) and ev.get("step") == run.step


def format_stage_table(rows: Sequence[dict[str, Any]], solvers: Sequence[str] = STAGE_SOLVERS) -> str:
    """The reflow table as GitHub markdown: stage | W2 per solver | S | cost | excess | crossing."""
    cols = ["stage", *[f"W2 {s}" for s in solvers], "S", "cost E|Z1-Z0|^2", "excess over OT", "crossing p"]

    def f(v: Any, fmt: str = ".4f") -> str:
        return "-" if v is None else format(v, fmt)

    table = []
    for r in rows:
        w2 = []
        for s in solvers:
            v, nfe = r.get(f"w2@{s}"), r.get(f"nfe@{s}")
            w2.append(f(v) + (f" ({nfe})" if s == "dopri5" and nfe is not None else ""))
        cells = [r["stage"], *w2, f(r.get("straightness"), ".2e"), f(r.get("transport_cost")), f(r.get("transport_excess")), f(r.get("crossing"))]
        table.append(dict(zip(cols, cells)))
    return format_table(table, cols)
