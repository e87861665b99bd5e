"""One-step distillation as a job: a child run of a k-RF that regresses the parent's coupling at
t = 0 (the maths is :mod:`rectflow.reflow.distill`; theory §4.2)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from rectflow.errors import ConfigError
from rectflow.reflow.distill import make_distill_loss
from rectflow.reflow.pairs import PairOptions
from rectflow.runs.experiment import Run
from rectflow.runs.lineage import as_run, child_config, init_checkpoint, pairs_dir, progress_overrides, train_child

__all__ = ['train_distill']


def train_distill(
    run: Run | str | Path,
    out: str | Path | None = None,
    *,
    n_pairs: int | None = None,
    coupling: str = "pairs",
    loss: str = "l2",
    huber_c: float = 0.0,
    init: str = "previous",
    steps: int | None = None,
    overrides: Sequence[str] = (),
    pairs: str | Path | None = None,
    options: PairOptions = PairOptions(),
    progress: bool | None = True,
    source: Any = None,
    target: Any = None,
    model: Any = None,
) -> Path:
    """Distill the flow of ``run`` (a k-RF run directory or loaded Run) into a one-step map; returns
    the new run directory (default ``RUN-distill``, or ``RUN-distill-independent``).

    ``coupling="pairs"``: learn the k-RF's coupling (Z0, Flow_k(Z0)) from ``n_pairs`` generated
    pairs (or the store ``pairs``): reflow + distillation.  ``coupling="independent"``: learn
    the random coupling of pi0 and pi1, which can only give E[X1 | X0] (the failure theory §4.2
    describes).  ``init``: ``"previous"`` starts from the run's weights, ``"scratch"`` from a
    fresh network.  ``loss``: ``l2`` or ``pseudo_huber`` (scale ``huber_c``).  The pair
    arguments are those of :func:`rectflow.runs.reflow_job.train_reflow` (:class:`~rectflow.reflow.pairs.PairOptions`),
    and so are ``source`` / ``target`` / ``model`` (a teacher made of Python objects).
    """
    teacher = as_run(run, source=source, target=target, model=model)
    if teacher.config.reflow.distill:
        raise ConfigError(f"{teacher.path} is already a distillation run; distill a k-RF flow")
    make_distill_loss(loss, c=huber_c)  # validate the name early
    if coupling == "pairs":
        section, stage, suffix = {"kind": "pairs", "pairs": str(pairs_dir(teacher, n_pairs, pairs, options).resolve())}, teacher.config.reflow.stage, "distill"
    elif coupling == "independent":
        section, stage, suffix = {"kind": "independent"}, 0, "distill-independent"
    else:
        raise ConfigError(f"distillation coupling must be 'pairs' (the flow's) or 'independent', got {coupling!r}")
    cfg = child_config(  # first: a bad override or init fails before any pair is generated
        teacher,
        coupling=section,
        stage=stage,
        init=init_checkpoint(teacher, init),
        distill=True,
        distill_loss=loss,
        huber_c=huber_c,
        steps=steps,
        overrides=[*progress_overrides(progress), *overrides],
    )
    out = Path(out) if out is not None else Path(teacher.path).parent / f"{Path(teacher.path).name}-{suffix}"
    return train_child(cfg, out, teacher, n_pairs=None if pairs is not None else n_pairs, options=options, progress=progress, model=model)
