"""Runs: build everything an :class:`ExperimentConfig` describes, train it into a run directory,
load it back, sample and evaluate it.

A run directory holds::

    config.json                 the resolved experiment config
    checkpoints/step_*.safetensors
    metrics.jsonl               training log (one row per log interval)
    eval.json, eval.md          quality-vs-NFE table (after `rectflow eval`)
    plots/*.png                 loss curve, samples vs data, trajectories
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor, nn

from .config import ExperimentConfig, config_from_dict, config_to_dict
from .couplings import IndependentCoupling, MinibatchOTCoupling
from .data import make_distribution
from .errors import CheckpointError, ConfigError, DataError
from .evaluation import evaluate_solvers, format_table
from .io import load_json, load_tensors, save_json
from .losses import FlowMatchingObjective
from .models import MLPVelocity
from .time_sampling import make_time_sampler
from .training import Trainer, resolve_device

__all__ = [
    "Run",
    "build_distributions",
    "build_model",
    "build_objective",
    "model_config",
    "train_run",
    "load_run",
    "evaluate_run",
    "heldout_samples",
    "plot_run",
]

# Keys that may change between a run and its resumption (they do not change the result).
_RESUMABLE_KEYS = {"steps", "progress", "log_every", "ckpt_every", "keep_checkpoints", "workers", "device"}


def build_distributions(cfg: ExperimentConfig) -> tuple[Any, Any]:
    """Source pi0 and target pi1 samplers; their dimensions must agree."""
    source, target = make_distribution(cfg.source), make_distribution(cfg.target)
    if source.dim != target.dim:
        raise DataError(f"source has dimension {source.dim} but target has dimension {target.dim}; they must match")
    return source, target


def model_config(cfg: ExperimentConfig, dim: int) -> dict[str, Any]:
    """The architecture description stored in checkpoints (and compared on load)."""
    return {**asdict(cfg.model), "dim": dim}


def build_model(mcfg: dict[str, Any]) -> nn.Module:
    """Instantiate the velocity network from :func:`model_config` output."""
    if mcfg.get("kind") != "mlp":
        raise ConfigError(f"model.kind: {mcfg.get('kind')!r} is not one of ['mlp']")
    return MLPVelocity(mcfg["dim"], width=mcfg["width"], depth=mcfg["depth"], time_dim=mcfg["time_dim"], activation=mcfg["activation"])


def build_objective(cfg: ExperimentConfig, source: Any, target: Any) -> FlowMatchingObjective:
    """Coupling + time sampling + straight path: the 1-RF objective of SPEC section 2."""
    if cfg.coupling.kind == "ot":
        coupling = MinibatchOTCoupling(source, target, method=cfg.coupling.method, reg=cfg.coupling.reg)
    else:
        coupling = IndependentCoupling(source, target)
    return FlowMatchingObjective(coupling, time_sampler=make_time_sampler(cfg.time.kind, **cfg.time.params()))


def _semantic(cfg_dict: dict[str, Any]) -> dict[str, Any]:
    d = {k: v for k, v in cfg_dict.items() if k != "eval"}
    d["train"] = {k: v for k, v in d["train"].items() if k not in _RESUMABLE_KEYS}
    return d


def train_run(
    cfg: ExperimentConfig,
    run_dir: str | Path,
    *,
    resume: bool = True,
    callbacks: list[Callable[[Trainer, int], None]] | None = None,
) -> Trainer:
    """Train (or resume) the run in ``run_dir``.

    A directory that already holds a run with a different config is refused (only the
    step budget and logging settings may change on resumption) so nothing is overwritten.
    """
    run_dir = Path(run_dir)
    source, target = build_distributions(cfg)
    new = config_to_dict(cfg)
    cfg_path = run_dir / "config.json"
    if cfg_path.exists():
        old = load_json(cfg_path)
        if _semantic(old) != _semantic(new):
            diff = sorted(_diff_keys(_semantic(old), _semantic(new)))
            raise ConfigError(f"{run_dir} holds a run with another config (differs in {', '.join(diff)}); use a new run directory")
        if not resume and (run_dir / "checkpoints").exists() and any((run_dir / "checkpoints").iterdir()):
            raise ConfigError(f"{run_dir} already holds checkpoints; resume it or choose a new run directory")
    run_dir.mkdir(parents=True, exist_ok=True)
    save_json(cfg_path, new)
    mcfg = model_config(cfg, source.dim)
    torch.manual_seed(cfg.train.seed)  # parameter initialisation
    model = build_model(mcfg)
    trainer = Trainer(model, build_objective(cfg, source, target), cfg.train, run_dir, model_config=mcfg, callbacks=callbacks)
    return trainer.fit(resume=resume)


def _diff_keys(a: Any, b: Any, prefix: str = "") -> set[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out: set[str] = set()
        for k in set(a) | set(b):
            out |= _diff_keys(a.get(k), b.get(k), f"{prefix}.{k}" if prefix else k)
        return out
    return set() if a == b else {prefix}


@dataclass
class Run:
    """A trained run loaded from disk: its config, distributions and (EMA) model."""

    path: Path
    config: ExperimentConfig
    model: nn.Module
    source: Any
    target: Any
    step: int

    @property
    def dim(self) -> int:
        return self.source.dim


def _latest_checkpoint(run_dir: Path) -> Path:
    ckpts = sorted((run_dir / "checkpoints").glob("step_*.safetensors")) if (run_dir / "checkpoints").is_dir() else []
    if not ckpts:
        raise CheckpointError(f"{run_dir}: no checkpoints found (train the run first)")
    return ckpts[-1]


def load_run(run_dir: str | Path, *, checkpoint: str | Path | None = None, ema: bool = True, device: str = "cpu") -> Run:
    """Load a run directory's config and newest (or given) checkpoint; the EMA weights by default."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise CheckpointError(f"{run_dir}: no such run directory")
    cfg = config_from_dict(load_json(run_dir / "config.json"))
    source, target = build_distributions(cfg)
    path = Path(checkpoint) if checkpoint is not None else _latest_checkpoint(run_dir)
    tensors, meta = load_tensors(path)
    mcfg = model_config(cfg, source.dim)
    if meta.get("model_config") != mcfg:
        raise CheckpointError(f"{path}: checkpoint model config {meta.get('model_config')} does not match the run's {mcfg}")
    prefix = "ema." if ema and any(k.startswith("ema.") for k in tensors) else "model."
    model = build_model(mcfg)
    try:
        model.load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
    except RuntimeError as e:
        raise CheckpointError(f"{path}: weights do not fit the model ({str(e).splitlines()[0]})") from None
    model = model.to(resolve_device(device)).eval()
    return Run(run_dir, cfg, model, source, target, int(meta.get("step", 0)))


def heldout_samples(run: Run, n: int | None = None, seed: int | None = None) -> tuple[Tensor, Tensor]:
    """Held-out source and target samples for evaluation (streams disjoint from training's)."""
    n = n or run.config.eval.n_samples
    seed = run.config.eval.seed if seed is None else seed
    g = torch.Generator().manual_seed(seed)
    x0 = run.source.sample(n, generator=g)
    x1 = run.target.sample(n, generator=g)
    return x0, x1


def evaluate_run(run: Run, *, n: int | None = None, solvers: list[str] | None = None, write: bool = True) -> list[dict[str, Any]]:
    """W2 / energy distance vs NFE for each solver; writes eval.json and eval.md into the run."""
    x0, x1 = heldout_samples(run, n)
    dev = next(run.model.parameters()).device
    rows = evaluate_solvers(run.model, x0.to(dev), x1, solvers or run.config.eval.solvers, rtol=run.config.eval.rtol, atol=run.config.eval.atol)
    if write:
        save_json(run.path / "eval.json", {"step": run.step, "n_samples": x0.shape[0], "rows": rows})
        from .io import atomic_path

        with atomic_path(run.path / "eval.md") as tmp:
            tmp.write_text(format_table(rows, ["solver", "nfe", "w2", "energy"]) + "\n")
    return rows


def plot_run(run: Run, *, n: int = 2000, steps: int = 100) -> list[Path]:
    """Write the run's loss curve, samples-vs-data scatter and trajectory plot into run/plots."""
    from .io import read_jsonl
    from .plots import plot_loss, plot_samples, plot_trajectories
    from .sampling import sample_model

    out = run.path / "plots"
    x0, x1 = heldout_samples(run, n)
    res = sample_model(run.model, x0, method="euler", steps=steps, return_trajectory=True)
    name = f"{_label(run.config.source)} -> {_label(run.config.target)}"
    paths = [
        plot_samples(res.x, x1, out / "samples.png", title=f"{name}: Euler {steps} steps"),
        plot_trajectories(res.trajectory[:: max(1, steps // 50)], out / "trajectories.png", res.times[:: max(1, steps // 50)], title=f"{name}: trajectories"),
    ]
    rows = read_jsonl(run.path / "metrics.jsonl")
    if rows:
        paths.append(plot_loss(rows, out / "loss.png", title=f"{name}: loss"))
    return paths


def _label(spec: Any) -> str:
    return spec if isinstance(spec, str) else str(spec.get("name", spec)) if isinstance(spec, dict) else str(spec)
