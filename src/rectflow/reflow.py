"""k-rectified flow (SPEC section 4): draw Z0 ~ pi0, simulate the k-RF accurately to get
Z1 = Flow_k(Z0), store the pairs, and train the (k+1)-RF with the same loss on that coupling,
from scratch or initialised from the k-RF's weights.  Repeat for 3-RF, ...

Every stage is an ordinary run directory (so ``rectflow eval`` / ``sample`` work on it) whose
``config.json`` records the lineage in its ``reflow`` section (stage, parent run, initial
checkpoint) and its coupling as ``coupling.kind: pairs`` with the pair store's directory.
The pairs of a run live in ``RUN/pairs/<solver>-n<N>-seed<S>`` by default.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from .config import ExperimentConfig, apply_overrides, config_from_dict, config_to_dict
from .errors import CheckpointError, ConfigError
from .io import load_tensors, sha256_file
from .pairs import PairStore, generate_pairs

__all__ = [
    "load_init_weights",
    "run_checksum",
    "stage_label",
    "default_pairs_dir",
    "default_reflow_dir",
    "generate_run_pairs",
    "child_config",
    "check_run_dir",
    "train_reflow",
    "reflow_chain",
]


def load_init_weights(model: nn.Module, checkpoint: str | Path, model_config: dict[str, Any], *, ema: bool = True) -> None:
    """Copy the (EMA) weights of a rectflow checkpoint into ``model``; the checkpoint's model config
    must equal ``model_config`` (else CheckpointError)."""
    path = Path(checkpoint)
    tensors, meta = load_tensors(path)
    if meta.get("model_config") != model_config:
        raise CheckpointError(f"{path}: cannot initialise from it: its model config {meta.get('model_config')} differs from this run's {model_config}")
    prefix = "ema." if ema and any(k.startswith("ema.") for k in tensors) else "model."
    try:
        model.load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
    except RuntimeError as e:
        raise CheckpointError(f"{path}: weights do not fit the model ({str(e).splitlines()[0]})") from None


def run_checksum(run: Any) -> str:
    """sha256 of the checkpoint file a loaded :class:`~rectflow.experiment.Run` came from."""
    if getattr(run, "checkpoint", None) is None:
        from .pairs import state_dict_sha256

        return state_dict_sha256(run.model)
    return sha256_file(run.checkpoint)


def stage_label(cfg: ExperimentConfig) -> str:
    """Human label of a run's place in the chain: ``1-RF``, ``2-RF``, ``2-RF+distill``, ``distill (independent)``."""
    r = cfg.reflow
    if r.distill:
        return f"{r.stage}-RF+distill" if r.stage >= 1 else f"distill ({cfg.coupling.kind})"
    return f"{r.stage}-RF"


def default_pairs_dir(run_dir: str | Path, n: int, solver: str = "dopri5", seed: int = 0) -> Path:
    """``RUN/pairs/<solver>-n<N>-seed<S>``: where the pairs of a run's flow are kept by default."""
    return Path(run_dir) / "pairs" / f"{solver.replace(':', '')}-n{n}-seed{seed}"


def _chain_base(run_dir: Path) -> str:
    return re.sub(r"-\d+rf$", "", run_dir.name)


def default_reflow_dir(run_dir: str | Path, stage: int) -> Path:
    """Sibling run directory of the ``stage``-RF: ``runs/moons`` -> ``runs/moons-2rf``, ``runs/moons-3rf``."""
    run_dir = Path(run_dir)
    return run_dir.parent / f"{_chain_base(run_dir)}-{stage}rf"


def _load(run: Any, device: str = "cpu") -> Any:
    from .experiment import Run, load_run

    return run if isinstance(run, Run) else load_run(run, device=device)


def generate_run_pairs(
    run: Any,
    n: int,
    out: str | Path | None = None,
    *,
    seed: int = 0,
    solver: str = "dopri5",
    rtol: float | None = None,
    atol: float | None = None,
    shard_size: int = 65536,
    device: str = "auto",
    progress: bool | None = True,
) -> PairStore:
    """Pairs (Z0 ~ pi0, Z1 = Flow_k(Z0)) of a run's (EMA) flow, in ``out`` (default
    :func:`default_pairs_dir`); resumes or reuses a store of the same settings.

    ``run``: a run directory or a loaded :class:`~rectflow.experiment.Run`; the model checksum
    is the sha256 of its checkpoint file, so pairs of an older checkpoint are never reused.
    """
    from .training import resolve_device

    dev = resolve_device(device)
    run = _load(run, str(dev))
    if run.config.reflow.distill:
        raise ConfigError(f"{run.path} is a distillation run (a one-step map, not a flow); generate pairs from a k-RF run")
    if getattr(run.config.model, "num_classes", 0) > 0:
        raise ConfigError(f"{run.path} is class-conditional; reflow pairs of conditional flows are not supported yet")
    out = Path(out) if out is not None else default_pairs_dir(run.path, n, solver, seed)
    model = run.model.to(dev)
    return generate_pairs(
        model,
        run.source,
        out,
        n,
        seed=seed,
        shard_size=shard_size,
        solver=solver,
        rtol=run.config.eval.rtol if rtol is None else rtol,
        atol=run.config.eval.atol if atol is None else atol,
        device=dev,
        model_sha256=run_checksum(run),
        source_spec=run.config.source,
        provenance={"run": str(Path(run.path).resolve()), "step": run.step, "stage": run.config.reflow.stage, "checkpoint": Path(run.checkpoint).name if run.checkpoint else None},
        progress=progress,
    )


def child_config(
    parent: Any,
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
    """The config of a run derived from ``parent`` (a loaded Run): same distributions, model and
    training settings, with the given coupling section and lineage, then ``key=value`` overrides."""
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


def check_run_dir(cfg: ExperimentConfig, out: str | Path) -> None:
    """Refuse (ConfigError) early when ``out`` holds a run of another config, before pairs are made."""
    from .experiment import _diff_keys, _semantic
    from .io import load_json

    path = Path(out) / "config.json"
    if path.is_file():
        old, new = _semantic(load_json(path)), _semantic(config_to_dict(cfg))
        if old != new:
            raise ConfigError(f"{out} holds a run with another config (differs in {', '.join(sorted(_diff_keys(old, new)))}); use a new run directory")


def _init_checkpoint(run: Any, init: str) -> Path | None:
    if init == "previous":
        return Path(run.checkpoint)
    if init == "scratch":
        return None
    raise ConfigError(f"init must be 'previous' (start from the parent's weights) or 'scratch', got {init!r}")


def _progress_override(progress: bool | None) -> list[str]:
    return [] if progress is None else [f"train.progress={'true' if progress else 'false'}"]


def train_reflow(
    run: Any,
    out: str | Path | None = None,
    *,
    n_pairs: int,
    init: str = "previous",
    steps: int | None = None,
    overrides: Sequence[str] = (),
    pairs: str | Path | None = None,
    pair_seed: int = 0,
    solver: str = "dopri5",
    rtol: float | None = None,
    atol: float | None = None,
    shard_size: int = 65536,
    device: str = "auto",
    progress: bool | None = True,
) -> Path:
    """Train the (k+1)-RF on pairs of the k-RF ``run`` (SPEC section 4); returns its run directory.

    Args:
        run: the k-RF run directory (or loaded Run).
        out: the new run directory (default :func:`default_reflow_dir`); an existing run of the
            same config is resumed, one of another config is refused.
        n_pairs: pairs to generate (or reuse) with ``solver`` (dopri5: ``rtol``/``atol``, default
            the run's eval tolerances), ``pair_seed`` and ``shard_size``.
        init: ``"previous"`` (start from the k-RF's EMA weights) or ``"scratch"``.
        steps: training steps (default: the parent's); ``overrides``: ``key=value`` config edits.
        pairs: an existing pair-store directory to use instead of generating into the default one.
    """
    from .experiment import train_run

    parent = _load(run)
    if parent.config.reflow.distill:
        raise ConfigError(f"{parent.path} is a distillation run (a one-step map); reflow needs a k-RF flow")
    k = parent.config.reflow.stage
    store_dir = Path(pairs) if pairs is not None else default_pairs_dir(parent.path, n_pairs, solver, pair_seed)
    cfg = child_config(  # first: a bad override or init fails before any pair is generated
        parent,
        coupling={"kind": "pairs", "pairs": str(store_dir.resolve())},
        stage=k + 1,
        init=_init_checkpoint(parent, init),
        steps=steps,
        overrides=[*_progress_override(progress), *overrides],
    )
    out = Path(out) if out is not None else default_reflow_dir(parent.path, k + 1)
    check_run_dir(cfg, out)
    if pairs is not None:
        PairStore(store_dir)
    else:
        generate_run_pairs(parent, n_pairs, store_dir, seed=pair_seed, solver=solver, rtol=rtol, atol=atol, shard_size=shard_size, device=device, progress=progress)
    train_run(cfg, out)
    return out


def reflow_chain(
    run: Any,
    stages: int = 1,
    *,
    prefix: str | Path | None = None,
    **kwargs: Any,
) -> list[Path]:
    """k-RF -> (k+1)-RF -> ... -> (k+stages)-RF in one call; returns the new run directories.

    Stage j goes to ``<prefix>-<k+j>rf`` (default prefix: the run's directory without a
    ``-<n>rf`` suffix); ``kwargs`` are passed to :func:`train_reflow` for every stage.
    """
    if not isinstance(stages, int) or stages < 1:
        raise ConfigError(f"stages must be an integer >= 1, got {stages!r}")
    current = _load(run)
    k = current.config.reflow.stage
    base = Path(prefix) if prefix is not None else current.path.parent / _chain_base(Path(current.path))
    outs = []
    for j in range(1, stages + 1):
        out = base.parent / f"{base.name}-{k + j}rf"
        train_reflow(current, out, **kwargs)
        outs.append(out)
        current = _load(out)
    return outs
