"""Parent -> child runs: the one way a reflow or distillation stage is made from a run.

A child run is an ordinary run directory whose ``config.json`` records its lineage in the
``reflow`` section (stage, parent run, initial checkpoint) and its coupling: ``pairs`` (the
parent's flow coupling (Z0, Flow_k(Z0)), kept in a pair store) or ``independent``.  Making one is
always the same steps (:func:`train_child`): the child's config from the parent's (:func:`child_config`),
then :func:`~rectflow.runs.experiment.train_run`, which guards the directory, has the pairs made
(generated or reused, :class:`PairOptions`) and trains.
"""

from __future__ import annotations

import copy
from dataclasses import replace
from pathlib import Path
from typing import Any, Sequence

from torch import nn

from rectflow.engine.hardware import resolve_device
from rectflow.engine.io import sha256_file
from rectflow.errors import ConfigError
from rectflow.reflow.pairs import PairOptions, PairStore, generate_pairs, state_dict_sha256
from rectflow.runs.config import ExperimentConfig, apply_overrides, config_from_dict, config_to_dict
from rectflow.runs.experiment import Run, load_run, network, run_objects, train_run

__all__ = [
    "pairs_dir",
    "as_run",
    "run_checksum",
    "stage_label",
    "default_pairs_dir",
    "generate_run_pairs",
    "init_checkpoint",
    "child_config",
    "child_objects",
    "train_child",
    "progress_overrides",
]


def as_run(run: Run | str | Path, device: str = "cpu", *, source: Any = None, target: Any = None, model: Any = None) -> Run:
    """A loaded run: ``run`` itself, or the run directory it names loaded on ``device`` (with the
    Python objects it was made of, :func:`~rectflow.runs.experiment.load_run`)."""
    return run if isinstance(run, Run) else load_run(run, device=device, source=source, target=target, model=model)


def run_checksum(run: Run) -> str:
    """sha256 of the checkpoint file a loaded run came from (of its weights when it has none)."""
    return state_dict_sha256(run.model) if run.checkpoint is None else sha256_file(run.checkpoint)


def stage_label(cfg: ExperimentConfig) -> str:
    """Human label of a run's place in the chain: ``1-RF``, ``2-RF``, ``2-RF+distill``, ``distill (independent)``."""
    r = cfg.reflow
    if r.distill:
        return f"{r.stage}-RF+distill" if r.stage >= 1 else f"distill ({cfg.coupling.kind})"
    return f"{r.stage}-RF"


def default_pairs_dir(run_dir: str | Path, n: int, solver: str = "dopri5", seed: int = 0) -> Path:
    """``RUN/pairs/<solver>-n<N>-seed<S>``: where the pairs of a run's flow are kept by default."""
    return Path(run_dir) / "pairs" / f"{solver.replace(':', '')}-n{n}-seed{seed}"


def generate_run_pairs(
    run: Run | str | Path,
    n: int,
    out: str | Path | None = None,
    *,
    options: PairOptions = PairOptions(),
    progress: bool | None = True,
) -> PairStore:
    """n pairs of a run's (EMA) flow generated with ``options``, in ``out`` (default
    :func:`default_pairs_dir`); resumes or reuses a store of the same settings.

    ``run``: a run directory or a loaded :class:`~rectflow.runs.experiment.Run`; the model checksum
    is the sha256 of its checkpoint file, so pairs of an older checkpoint are never reused.
    """
    o = options
    dev = resolve_device(o.device)
    run = as_run(run, str(dev))
    if run.config.reflow.distill:
        raise ConfigError(f"{run.path} is a distillation run (a one-step map, not a flow); generate pairs from a k-RF run")
    if run.config.model.num_classes > 0:
        raise ConfigError(f"{run.path} is class-conditional; reflow pairs of conditional flows are not supported yet")
    out = Path(out) if out is not None else default_pairs_dir(run.path, n, o.solver, o.seed)
    return generate_pairs(
        run.model.to(dev),
        run.source,
        out,
        n,
        replace(o, rtol=run.config.eval.rtol if o.rtol is None else o.rtol, atol=run.config.eval.atol if o.atol is None else o.atol, device=str(dev)),
        model_sha256=run_checksum(run),
        source_spec=run.config.source,
        provenance={"run": str(Path(run.path).resolve()), "step": run.step, "stage": run.config.reflow.stage, "checkpoint": Path(run.checkpoint).name if run.checkpoint else None},
        progress=progress,
    )


def pairs_dir(parent: Run, n_pairs: int | None, store: str | Path | None, options: PairOptions) -> Path:
    """The pair store a child trains on: ``store`` if given, else the default store of ``n_pairs``
    pairs of the parent's flow."""
    if store is not None:
        return Path(store)
    if n_pairs is None:
        raise ConfigError("training on the flow's coupling needs a number of pairs (n_pairs / --pairs N) or a pair store")
    return default_pairs_dir(parent.path, n_pairs, options.solver, options.seed)


def init_checkpoint(run: Run, init: str) -> Path | None:
    """The checkpoint a child starts from: ``"previous"`` (the parent's) or ``"scratch"`` (None)."""
    if init == "previous":
        return Path(run.checkpoint)
    if init == "scratch":
        return None
    raise ConfigError(f"init must be 'previous' (start from the parent's weights) or 'scratch', got {init!r}")


def child_config(
    parent: Run,
    *,
    coupling: dict[str, Any],
    stage: int,
    init: str | Path | None,
    distill: bool = False,
    distill_loss: str = "l2",
    huber_c: float = 0.0,
    steps: int | None = None,
    overrides: Sequence[str] = (),
) -> ExperimentConfig:
    """The config of a run derived from ``parent``: same distributions, model and training
    settings, with the given coupling section and lineage, then ``key=value`` overrides."""
    d = config_to_dict(parent.config)
    d["coupling"] = coupling
    d["reflow"] = {
        "stage": stage,
        "parent": str(Path(parent.path).resolve()),
        "init": str(Path(init).resolve()) if init is not None else None,
        "distill": distill,
        "distill_loss": distill_loss,
        "huber_c": huber_c,
    }
    if steps is not None:
        d["train"]["steps"] = steps
    if distill:
        d["eval"]["solvers"] = ["euler:1"]  # a one-step map: only N = 1 is meaningful
    return config_from_dict(apply_overrides(d, list(overrides)))


def child_objects(parent: Run, cfg: ExperimentConfig, model: Any = None) -> dict[str, Any]:
    """The Python objects the child ``cfg`` of ``parent`` trains with (keyword arguments of
    :func:`~rectflow.runs.experiment.train_run`): the parent's distributions, and for a user's
    network a fresh one, from ``model`` (an instance is copied; a class is rebuilt with the parent's
    network config, :func:`~rectflow.runs.experiment.network`) or, when the child starts from the
    parent's weights, a copy of the parent's."""
    objects = run_objects(parent)
    if model is None:
        if "model" in objects and cfg.reflow.init is None:
            raise ConfigError(f"init='scratch' with a user's network ({type(parent.model).__name__}) needs model= (its class or a constructor) to build a fresh one")
        return objects
    if "model" not in objects:
        raise ConfigError(f"{parent.path}'s network is built from its config (model.kind {parent.config.model.kind!r}); its children take no model=")
    objects["model"] = copy.deepcopy(model) if isinstance(model, nn.Module) else network(model, getattr(parent.model, "config", None))
    return objects


def train_child(cfg: ExperimentConfig, out: str | Path, parent: Run, *, n_pairs: int | None = None, options: PairOptions = PairOptions(),
                progress: bool | None = True, model: Any = None) -> Path:
    """Make (or resume) the child run ``out`` of ``parent`` from its config (:func:`child_config`),
    with the Python objects of :func:`child_objects` when the parent was made of some.

    :func:`~rectflow.runs.experiment.train_run` checks the directory first; then, when the coupling
    is the parent's pairs, the store ``cfg.coupling.pairs`` is opened (``n_pairs`` None) or
    generated with ``options`` (so a refused directory costs no pair generation); then it trains.
    Returns ``out``."""
    objects = child_objects(parent, cfg, model)  # first: a missing network fails before any pair is generated

    def prepare() -> None:
        if n_pairs is None:
            PairStore(cfg.coupling.pairs)
        else:
            generate_run_pairs(parent, n_pairs, cfg.coupling.pairs, options=options, progress=progress)

    train_run(cfg, out, prepare=prepare if cfg.coupling.kind == "pairs" else None, **objects)
    return Path(out)


def progress_overrides(progress: bool | None) -> list[str]:
    """The ``train.progress`` override for a child run (none: keep the parent's)."""
    return [] if progress is None else [f"train.progress={'true' if progress else 'false'}"]
