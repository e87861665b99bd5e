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
_RESUMABLE_KEYS = {"steps", "progress", "log_every", "ckpt_every", "keep_checkpoints", "workers", "device", "sample_every"}


def build_distributions(cfg: ExperimentConfig) -> tuple[Any, Any]:
    """Source pi0 and target pi1 samplers; their dimensions must agree."""
    source, target = make_distribution(cfg.source), make_distribution(cfg.target)
    if source.dim != target.dim:
        raise DataError(f"source has dimension {source.dim} but target has dimension {target.dim}; they must match")
    if _shape(source) != _shape(target):
        raise DataError(f"source samples have shape {list(_shape(source))} but target samples {list(_shape(target))}; they must match")
    return source, target


def _shape(sampler: Any) -> tuple[int, ...]:
    """Shape of one sample: ``sampler.shape`` (images) or (dim,)."""
    return tuple(getattr(sampler, "shape", None) or (sampler.dim,))


_MLP_KEYS = ("kind", "width", "depth", "time_dim", "activation")
_IMAGE_MODEL_KEYS = {
    "unet": ("kind", "channels", "channel_mult", "num_res_blocks", "attention_resolutions", "dropout", "head_channels", "scale_shift", "num_classes"),
    "dit": ("kind", "width", "depth", "head_channels", "patch_size", "num_classes"),
}


def model_config(cfg: ExperimentConfig, dim: int, shape: tuple[int, ...] | None = None) -> dict[str, Any]:
    """The architecture description stored in checkpoints (and compared on load): the keys of
    ``cfg.model`` that the model kind uses, plus ``dim`` (and ``shape`` (C, H, W) for unet/dit)."""
    m = asdict(cfg.model)
    if m["kind"] in _IMAGE_MODEL_KEYS:
        if shape is None or len(shape) != 3 or shape[1] != shape[2]:
            raise DataError(f"model.kind {m['kind']!r} needs square images (C, H, W), but the data have shape {list(shape or (dim,))}")
        return {**{k: m[k] for k in _IMAGE_MODEL_KEYS[m["kind"]]}, "dim": dim, "shape": list(shape)}
    return {**{k: m[k] for k in _MLP_KEYS}, "dim": dim}


def build_model(mcfg: dict[str, Any]) -> nn.Module:
    """Instantiate the velocity network from :func:`model_config` output."""
    if mcfg.get("kind") in ("unet", "dit"):
        from .models import DiTVelocity, UNetVelocity

        c, h, _ = mcfg["shape"]
        try:
            if mcfg["kind"] == "unet":
                return UNetVelocity(
                    c, h, channels=mcfg["channels"], channel_mult=mcfg["channel_mult"], num_res_blocks=mcfg["num_res_blocks"],
                    attention_resolutions=mcfg["attention_resolutions"], dropout=mcfg["dropout"], head_channels=mcfg["head_channels"],
                    num_classes=mcfg["num_classes"], scale_shift=mcfg["scale_shift"],
                )
            return DiTVelocity(c, h, patch_size=mcfg["patch_size"], hidden=mcfg["width"], depth=mcfg["depth"], heads=mcfg["width"] // mcfg["head_channels"], num_classes=mcfg["num_classes"])
        except ValueError as e:
            raise ConfigError(f"model: {e}") from None
    if mcfg.get("kind") != "mlp":
        raise ConfigError(f"model.kind: {mcfg.get('kind')!r} is not one of ['mlp', 'unet', 'dit']")
    return MLPVelocity(mcfg["dim"], width=mcfg["width"], depth=mcfg["depth"], time_dim=mcfg["time_dim"], activation=mcfg["activation"])


def build_objective(cfg: ExperimentConfig, source: Any, target: Any) -> Any:
    """Coupling + time sampling + straight path: the 1-RF objective of SPEC section 2; on the pairs
    of a k-RF (coupling.kind = pairs) the (k+1)-RF's, and with reflow.distill the one-step
    distillation objective of SPEC section 4.  With model.num_classes > 0: the class-conditional
    objective with label dropout (:mod:`rectflow.guidance`)."""
    if cfg.model.num_classes > 0:
        return _conditional_objective(cfg, source, target)
    if cfg.coupling.kind == "ot":
        coupling = MinibatchOTCoupling(source, target, method=cfg.coupling.method, reg=cfg.coupling.reg)
    elif cfg.coupling.kind == "pairs":
        from .pairs import PairCoupling

        coupling = PairCoupling(cfg.coupling.pairs, shape=_shape(source))
    else:
        coupling = IndependentCoupling(source, target)
    if cfg.reflow.distill:
        from .distill import DistillationObjective, make_distill_loss

        return DistillationObjective(coupling, make_distill_loss(cfg.reflow.distill_loss, c=cfg.reflow.huber_c))
    return FlowMatchingObjective(coupling, time_sampler=make_time_sampler(cfg.time.kind, **cfg.time.params()))


def _conditional_objective(cfg: ExperimentConfig, source: Any, target: Any) -> Any:
    from .guidance import ConditionalFlowMatchingObjective, LabelledCoupling

    if cfg.coupling.kind != "independent" or cfg.reflow.distill:
        raise ConfigError("class-conditional training (model.num_classes > 0) supports coupling.kind=independent without distillation only")
    coupling = LabelledCoupling(source, target)
    if coupling.num_classes != cfg.model.num_classes:
        raise ConfigError(f"config key 'model.num_classes' is {cfg.model.num_classes} but the target has {coupling.num_classes} classes; they must match")
    return ConditionalFlowMatchingObjective(coupling, cfg.guidance.p_uncond, time_sampler=make_time_sampler(cfg.time.kind, **cfg.time.params()))


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
    objective = build_objective(cfg, source, target)  # before writing: a bad pair store leaves nothing behind
    mcfg = model_config(cfg, source.dim, _shape(source))
    torch.manual_seed(cfg.train.seed)  # parameter initialisation
    model = build_model(mcfg)
    if cfg.reflow.init and not any((run_dir / "checkpoints").glob("step_*.safetensors")):
        from .reflow import load_init_weights

        load_init_weights(model, cfg.reflow.init, mcfg)  # SPEC 4: initialise the (k+1)-RF from the k-RF
    run_dir.mkdir(parents=True, exist_ok=True)
    save_json(cfg_path, new)
    from .machine import machine_info

    save_json(run_dir / "machine.json", machine_info())
    if cfg.train.sample_every > 0 and len(_shape(source)) == 3:
        from .image_sampling import SampleGridCallback

        labels = torch.arange(64) % cfg.model.num_classes if cfg.model.num_classes > 0 else None
        callbacks = [*(callbacks or []), SampleGridCallback(source, cfg.train.sample_every, labels=labels, guidance=cfg.guidance.scale)]
    trainer = Trainer(model, objective, cfg.train, run_dir, model_config=mcfg, callbacks=callbacks)
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
    checkpoint: Path | None = None  # the checkpoint file the weights came from

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
    mcfg = model_config(cfg, source.dim, _shape(source))
    if meta.get("model_config") != mcfg:
        raise CheckpointError(f"{path}: checkpoint model config {meta.get('model_config')} does not match the run's {mcfg}")
    prefix = "ema." if ema and any(k.startswith("ema.") for k in tensors) else "model."
    model = build_model(mcfg)
    try:
        model.load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
    except RuntimeError as e:
        raise CheckpointError(f"{path}: weights do not fit the model ({str(e).splitlines()[0]})") from None
    model = model.to(resolve_device(device)).eval()
    return Run(run_dir, cfg, model, source, target, int(meta.get("step", 0)), path)


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
    if len(_shape(run.source)) == 3:
        return _plot_image_run(run, out, steps)
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


def _plot_image_run(run: Run, out: Path, steps: int, n: int = 64) -> list[Path]:
    """Image runs: samples.png (generated), data.png (held-out targets), pairs.png (input -> output,
    for domain transfer from an image set) and the loss curve."""
    from .image_sampling import save_image_grid, save_pair_grid
    from .io import read_jsonl
    from .plots import plot_loss
    from .sampling import sample_model

    x0, x1 = heldout_samples(run, n)
    dev = next(run.model.parameters()).device
    if run.config.model.num_classes > 0:
        from .guidance import sample_guided

        y = torch.arange(n, device=dev) % run.config.model.num_classes
        res = sample_guided(run.model, x0.to(dev), y, run.config.guidance.scale, method="euler", steps=steps)
    else:
        res = sample_model(run.model, x0.to(dev), method="euler", steps=steps)
    scale = max(1, 64 // x1.shape[-1])
    paths = [save_image_grid(res.x, out / "samples.png", scale=scale), save_image_grid(x1, out / "data.png", scale=scale)]
    from .data.images import ImageDataset

    if isinstance(run.source, ImageDataset):  # domain transfer: show each input next to its output
        paths.append(save_pair_grid(x0[:32], res.x[:32].cpu(), out / "pairs.png", scale=scale))
    rows = read_jsonl(run.path / "metrics.jsonl")
    if rows:
        paths.append(plot_loss(rows, out / "loss.png", title=f"{_label(run.config.source)} -> {_label(run.config.target)}: loss"))
    return paths


def _label(spec: Any) -> str:
    return spec if isinstance(spec, str) else str(spec.get("name", spec)) if isinstance(spec, dict) else str(spec)
