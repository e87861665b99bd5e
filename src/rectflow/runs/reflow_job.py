"""k-rectified flow as a job (theory §4): draw Z0 ~ pi0, simulate the k-RF accurately to get
Z1 = Flow_k(Z0), store the pairs, and train the (k+1)-RF with the same loss on that coupling,
from scratch or initialised from the k-RF's weights.  Repeat for 3-RF, ...

Every stage is an ordinary run directory (so ``rectflow eval`` / ``sample`` work on it) made by
:func:`rectflow.runs.lineage.train_child`.  The pairs of a run live in
``RUN/pairs/<solver>-n<N>-seed<S>`` by default.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Sequence

from rectflow.errors import ConfigError
from rectflow.reflow.pairs import PairOptions
from rectflow.runs.experiment import Run, run_objects
from rectflow.runs.lineage import as_run, child_config, init_checkpoint, pairs_dir, progress_overrides, train_child

__all__ = ["default_reflow_dir", "train_reflow", "reflow_chain"]


def _chain_base(run_dir: Path) -> str:
    return re.sub(r"-\d+rf$", "", run_dir.name)


def default_reflow_dir(run_dir: str | Path, stage: int) -> Path:
    """Sibling run directory of the ``stage``-RF: ``runs/moons`` -> ``runs/moons-2rf``, ``runs/moons-3rf``."""
    run_dir = Path(run_dir)
    return run_dir.parent / f"{_chain_base(run_dir)}-{stage}rf"


def train_reflow(
    run: Run | str | Path,
    out: str | Path | None = None,
    *,
    n_pairs: int | None = None,
    pairs: str | Path | None = None,
    options: PairOptions = PairOptions(),
    init: str = "previous",
    steps: int | None = None,
    overrides: Sequence[str] = (),
    progress: bool | None = True,
    source: Any = None,
    target: Any = None,
    model: Any = None,
) -> Path:
    """Train the (k+1)-RF on pairs of the k-RF ``run`` (theory §4.1); returns its run directory.

    Args:
        run: the k-RF run directory (or loaded Run).
        out: the new run directory (default :func:`default_reflow_dir`); an existing run of the
            same config is resumed, one of another config is refused.
        n_pairs: pairs of the k-RF to generate (or reuse) with ``options`` (:class:`PairOptions`:
            solver, tolerances, seed, shard size, device).
        pairs: an existing pair-store directory to train on instead (no generation).
        init: ``"previous"`` (start from the k-RF's EMA weights) or ``"scratch"``.
        steps: training steps (default: the parent's); ``overrides``: ``key=value`` config edits.
        source, target, model: for a run made of Python objects
            (:func:`~rectflow.runs.experiment.train_run`): the objects to load it with, and
            ``model`` also builds the new stage's network (:func:`~rectflow.runs.lineage.child_objects`).
    """
    parent = as_run(run, source=source, target=target, model=model)
    if parent.config.reflow.distill:
        raise ConfigError(f"{parent.path} is a distillation run (a one-step map); reflow needs a k-RF flow")
    k = parent.config.reflow.stage
    cfg = child_config(  # first: a bad override or init fails before any pair is generated
        parent,
        coupling={"kind": "pairs", "pairs": str(pairs_dir(parent, n_pairs, pairs, options).resolve())},
        stage=k + 1,
        init=init_checkpoint(parent, init),
        steps=steps,
        overrides=[*progress_overrides(progress), *overrides],
    )
    out = out if out is not None else default_reflow_dir(parent.path, k + 1)
    return train_child(cfg, out, parent, n_pairs=None if pairs is not None else n_pairs, options=options, progress=progress, model=model)


def reflow_chain(run: Run | str | Path, stages: int = 1, *, prefix: str | Path | None = None, **kwargs) -> list[Path]:
    """k-RF -> (k+1)-RF -> ... -> (k+stages)-RF in one call; returns the new run directories.

    Stage j goes to ``<prefix>-<k+j>rf`` (default prefix: the run's directory without a
    ``-<n>rf`` suffix); ``kwargs`` are passed to :func:`train_reflow` for every stage.
    """
    if not isinstance(stages, int) or stages < 1:
        raise ConfigError(f"stages must be an integer >= 1, got {stages!r}")
    current = as_run(run, **{k: kwargs[k] for k in ("source", "target", "model") if k in kwargs})
    k = current.config.reflow.stage
    base = Path(prefix) if prefix is not None else current.path.parent / _chain_base(Path(current.path))
    outs = []
    for j in range(1, stages + 1):
        out = base.parent / f"{base.name}-{k + j}rf"
        train_reflow(current, out, **kwargs)
        outs.append(out)
        current = as_run(out, **run_objects(current))
    return outs
