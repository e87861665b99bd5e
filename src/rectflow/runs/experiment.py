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

import copy
import functools
import json
import sys
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from torch import nn

from rectflow.data import ObjectDistribution, absolute_spec, as_distribution, make_distribution, point_file_path
from rectflow.diffusion.specs import parse_spec
from rectflow.engine.checkpoint import check_model_config, check_run_record, latest_checkpoint, list_checkpoints, load_weights, read_checkpoint
from rectflow.engine.hardware import hardware_info, resolve_device, resolve_precision
from rectflow.engine.io import load_json, make_dirs, save_json
from rectflow.engine.trainer import Trainer
from rectflow.errors import CheckpointError, ConfigError, DataError
from rectflow.flow.couplings import IndependentCoupling, MinibatchOTCoupling
from rectflow.flow.losses import FlowMatchingObjective
from rectflow.flow.time_sampling import make_time_sampler
from rectflow.images.conditional import ConditionalFlowMatchingObjective, LabelledCoupling
from rectflow.images.generate import SampleGridCallback
from rectflow.models import DiTVelocity, MLPVelocity, UNetVelocity
from rectflow.models.mlp import DEFAULT_TIME_SCALE
from rectflow.reflow.distill import DistillationObjective, make_distill_loss
from rectflow.reflow.pairs import PairCoupling
from rectflow.runs.config import ExperimentConfig, config_from_dict, config_to_dict
from rectflow.runs.machine import machine_info
from rectflow.runs.rundir import open_job, semantic_config

__all__ = ['Run', 'build_distributions', 'build_model', 'build_objective', 'model_config', 'train_run', 'load_run', 'sample_shape', 'split_target', 'holds_out',
           'DEFAULT_HOLDOUT', 'DEFAULT_SAMPLING_STEPS', 'sampling_steps', 'one_step_warning', 'object_spec', 'is_object_spec', 'network', 'run_objects']

DEFAULT_HOLDOUT = 0.1
"""Fraction of a file target's rows a new run holds out for evaluation (``eval.holdout`` unset)."""


DEFAULT_SAMPLING_STEPS = 100
"""Euler steps a flow is sampled (and plotted) with when none are asked for."""


def sampling_steps(cfg: ExperimentConfig) -> int:
    """Euler steps a run is sampled with by default: the one step a distilled run (a one-step map,
    reflow.distill) was trained for, :data:`DEFAULT_SAMPLING_STEPS` for a flow."""
    return 1 if cfg.reflow.distill else DEFAULT_SAMPLING_STEPS


def one_step_warning(cfg: ExperimentConfig, solvers: Iterable[str]) -> str | None:
    """For a one-step map asked to be sampled with solver specs (``"euler:4"``, ``"dopri5"``) of
    more than one Euler step: the one-line warning; else None."""
    more = [s for s in solvers if cfg.reflow.distill and parse_spec(s) != ("euler", 1)]
    if not more:
        return None
    return (f"this run is a one-step map (distilled: trained on v(x, 0) only), so {', '.join(more)} integrates it at times it never saw; "
            "it was trained for one Euler step (euler:1)")


def holds_out(cfg: ExperimentConfig) -> bool:
    """Whether the run holds rows of its target out of training: a .npy/.csv target with
    ``eval.holdout`` > 0 (other targets are compared with fresh draws)."""
    return point_file_path(cfg.target) is not None and bool(cfg.eval.holdout)


def object_spec(obj: Any) -> dict[str, str]:
    """How a run records a distribution given as a Python object: ``{"name": "object", "type":
    "module.Class"}`` (by type only: such a run needs the object again to be resumed or loaded)."""
    return {"name": "object", "type": _qualified(obj.distribution if isinstance(obj, ObjectDistribution) else obj)}


def is_object_spec(spec: Any) -> bool:
    """Whether a recorded distribution was a Python object (:func:`object_spec`)."""
    return isinstance(spec, dict) and spec.get("name") == "object"


def _qualified(obj: Any) -> str:
    return f"{type(obj).__module__}.{type(obj).__qualname__}"


def _distribution(spec: Any, given: Any, role: str) -> Any:
    """The ``role`` distribution: the object ``given``, else the one ``spec`` describes."""
    if given is not None:
        return as_distribution(given, role)
    if is_object_spec(spec):
        raise DataError(_missing_object(role, spec))
    return make_distribution(spec)


def _missing_object(role: str, spec: dict[str, Any]) -> str:
    return (f"this run's {role} is a Python object ({spec.get('type')}), recorded by its type only; pass it again as {role}= "
            "(train_run, load_run, train_reflow, train_distill)")


def split_target(cfg: ExperimentConfig, target: Any = None) -> tuple[Any, Any | None]:
    """The target's training part and its held-out part: for a file target with ``eval.holdout``
    > 0, the rows split by ``eval.seed`` (:meth:`~rectflow.data.PointCloud.split`); else the whole
    target (the object ``target`` when given) and None."""
    dist = _distribution(cfg.target, target, "target")
    if target is None and holds_out(cfg):
        return dist.split(cfg.eval.holdout, cfg.eval.seed)
    return dist, None


def build_distributions(cfg: ExperimentConfig, *, source: Any = None, target: Any = None) -> tuple[Any, Any]:
    """Source pi0 and target pi1 samplers as training sees them (a file target without its
    held-out rows, :func:`split_target`); their dimensions must agree.  ``source`` / ``target``:
    objects with ``sample(n, generator=, device=)`` used instead of the config's (:func:`object_spec`)."""
    source, target = _distribution(cfg.source, source, "source"), split_target(cfg, target)[0]
    if source.dim != target.dim:
        raise DataError(f"source has dimension {source.dim} but target has dimension {target.dim}; they must match")
    if sample_shape(source) != sample_shape(target):
        raise DataError(f"source samples have shape {list(sample_shape(source))} but target samples {list(sample_shape(target))}; they must match")
    return source, target


def sample_shape(sampler: Any) -> tuple[int, ...]:
    """Shape of one sample: ``sampler.shape`` (images) or (dim,)."""
    return tuple(getattr(sampler, "shape", None) or (sampler.dim,))


_MLP_KEYS = ("kind", "width", "depth", "time_dim", "activation")
LEGACY_TIME_SCALE = 1000.0
"""``model.time_scale`` of every MLP run recorded before it was a config key (the time features'
fixed top frequency then).  :func:`model_config` records the key only when it differs, so the
checkpoints of those runs keep matching, and :func:`load_run` reads a record without it as this."""


_IMAGE_MODEL_KEYS = {
    "unet": ("kind", "channels", "channel_mult", "num_res_blocks", "attention_resolutions", "dropout", "head_channels", "scale_shift", "num_classes"),
    "dit": ("kind", "width", "depth", "head_channels", "patch_size", "num_classes"),
}


def model_config(cfg: ExperimentConfig, dim: int, shape: tuple[int, ...] | None = None, model: nn.Module | None = None) -> dict[str, Any]:
    """The architecture description stored in checkpoints (and compared on load): the keys of
    ``cfg.model`` that the model kind uses, plus ``dim`` (and ``shape`` (C, H, W) for unet/dit).
    For a user's network ``model`` (model.kind custom): its class, its ``config`` attribute (a dict
    of JSON values, the constructor's arguments) when it has one, ``dim`` and ``shape``."""
    if model is not None:
        config = getattr(model, "config", None)
        try:
            config = json.loads(json.dumps(config)) if config is not None else None  # as the checkpoint will hold it
        except (TypeError, ValueError):
            config = "not JSON"
        if config is not None and not isinstance(config, dict):
            raise ConfigError(f"{_qualified(model)}.config must be a dict of JSON values (the constructor's arguments), got {getattr(model, 'config')!r}")
        return {"kind": "custom", "class": _qualified(model), "config": config, "dim": dim, "shape": list(shape or (dim,))}
    if cfg.model.kind == "custom":
        raise ConfigError(_missing_network(None))
    m = asdict(cfg.model)
    if m["kind"] in _IMAGE_MODEL_KEYS:
        if shape is None or len(shape) != 3 or shape[1] != shape[2]:
            raise DataError(f"model.kind {m['kind']!r} needs square images (C, H, W), but the data have shape {list(shape or (dim,))}")
        return {**{k: m[k] for k in _IMAGE_MODEL_KEYS[m["kind"]]}, "dim": dim, "shape": list(shape)}
    ts = DEFAULT_TIME_SCALE if m["time_scale"] is None else m["time_scale"]
    scale = {} if ts == LEGACY_TIME_SCALE else {"time_scale": ts}
    return {**{k: m[k] for k in _MLP_KEYS}, **scale, "dim": dim}


def _missing_network(mcfg: dict[str, Any] | None) -> str:
    cls = (mcfg or {}).get("class", "a user's class")
    return (f"this run's network is a Python nn.Module ({cls}), recorded by its class and config only; pass it as model=: the class "
            "(rebuilt with the recorded config), a constructor (lambda: MyNet(...)) or an instance")


def network(model: Any, config: dict[str, Any] | None = None) -> nn.Module:
    """A user's network from what was passed as ``model=``: an ``nn.Module`` itself; its class,
    called with the recorded ``config`` as keyword arguments (none: no arguments); or a
    constructor called with no arguments."""
    if isinstance(model, nn.Module):
        return model
    if isinstance(model, type) and issubclass(model, nn.Module):
        net = model(**(config or {}))
    elif callable(model):
        net = model()
    else:
        net = model
    if not isinstance(net, nn.Module):
        raise ConfigError(f"model= must be an nn.Module, its class or a constructor returning one; got {net!r}")
    return net


def build_model(mcfg: dict[str, Any]) -> nn.Module:
    """Instantiate the velocity network from :func:`model_config` output (not a user's network,
    model.kind custom, which is passed as ``model=``)."""
    if mcfg.get("kind") == "custom":
        raise ConfigError(_missing_network(mcfg))
    if mcfg.get("kind") in ("unet", "dit"):
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
    return MLPVelocity(mcfg["dim"], width=mcfg["width"], depth=mcfg["depth"], time_dim=mcfg["time_dim"], activation=mcfg["activation"],
                       time_scale=mcfg.get("time_scale", LEGACY_TIME_SCALE))


def build_objective(cfg: ExperimentConfig, source: Any, target: Any) -> Any:
    """Coupling + time sampling + straight path: the 1-RF objective of theory §2.2-2.4; on the pairs
    of a k-RF (coupling.kind = pairs) the (k+1)-RF's, and with reflow.distill the one-step
    distillation objective of theory §4.  With model.num_classes > 0: the class-conditional
    objective with label dropout (:mod:`rectflow.images.conditional`)."""
    if cfg.model.num_classes > 0:
        return _conditional_objective(cfg, source, target)
    if cfg.coupling.kind == "ot":
        coupling = MinibatchOTCoupling(source, target, method=cfg.coupling.method, reg=cfg.coupling.reg)
    elif cfg.coupling.kind == "pairs":
        coupling = PairCoupling(cfg.coupling.pairs, shape=sample_shape(source))
    else:
        coupling = IndependentCoupling(source, target)
    if cfg.reflow.distill:
        return DistillationObjective(coupling, make_distill_loss(cfg.reflow.distill_loss, c=cfg.reflow.huber_c))
    return FlowMatchingObjective(coupling, time_sampler=make_time_sampler(cfg.time.kind, **cfg.time.params()))


def _conditional_objective(cfg: ExperimentConfig, source: Any, target: Any) -> Any:
    if cfg.coupling.kind != "independent" or cfg.reflow.distill:
        raise ConfigError("class-conditional training (model.num_classes > 0) supports coupling.kind=independent without distillation only")
    coupling = LabelledCoupling(source, target)
    if coupling.num_classes != cfg.model.num_classes:
        raise ConfigError(f"config key 'model.num_classes' is {cfg.model.num_classes} but the target has {coupling.num_classes} classes; they must match")
    return ConditionalFlowMatchingObjective(coupling, cfg.guidance.p_uncond, time_sampler=make_time_sampler(cfg.time.kind, **cfg.time.params()))


def train_run(
    cfg: ExperimentConfig,
    run_dir: str | Path,
    *,
    resume: bool = True,
    callbacks: list[Callable[[Trainer, int], None]] | None = None,
    prepare: Callable[[], Any] | None = None,
    source: Any = None,
    target: Any = None,
    model: nn.Module | None = None,
) -> Trainer:
    """Train (or resume) the run in ``run_dir``.

    A directory that already holds a run with a different config is refused (only the
    step budget and logging settings may change on resumption) so nothing is overwritten.
    ``prepare`` runs after that check and before the objective is built: a child run generates
    its parent's pairs there (:func:`rectflow.runs.lineage.train_child`).

    ``source`` / ``target``: any objects with ``sample(n, generator=, device=)`` instead of the
    config's distributions; ``model``: any ``nn.Module`` v(x, t) -> (B, ...) instead of the
    config's network.  The run records them by type (and the network's ``config`` attribute, see
    :func:`model_config`), so resuming or loading it needs them again (``load_run(..., model=)``).
    """
    run_dir = Path(run_dir)
    if model is not None and not isinstance(model, nn.Module):
        raise ConfigError(f"model= must be an nn.Module (the network to train), got {model!r}")
    _require_objects(run_dir, source, target, model)
    requested = cfg.train.precision
    cfg = _as_recorded(_with_objects(cfg, source, target, model), run_dir)
    source, target = build_distributions(cfg, source=source, target=target)
    new = config_to_dict(cfg)
    with open_job(run_dir, "config.json", new, normalise=_resolved_record, temporaries=("checkpoints", "plots")) as resumed:
        if resumed and not resume and list_checkpoints(run_dir):
            raise ConfigError(f"{run_dir} already holds checkpoints; resume it or choose a new run directory")
        mcfg = model_config(cfg, source.dim, sample_shape(source), model)
        torch.manual_seed(cfg.train.seed)  # parameter initialisation
        model = model if model is not None else build_model(mcfg)
        if cfg.reflow.init and not list_checkpoints(run_dir):  # theory §4.1: initialise the (k+1)-RF from the k-RF
            try:
                load_weights(model, read_checkpoint(cfg.reflow.init, model_config=mcfg))
            except CheckpointError as e:
                raise CheckpointError(f"cannot initialise from the parent run: {e}") from None
        if prepare is not None:  # after every check that needs no pairs: a refusal costs no pair generation
            prepare()
        objective = build_objective(cfg, source, target)  # before writing: a bad pair store leaves nothing behind
        if resume and list_checkpoints(run_dir):  # a run whose config.json is gone: its checkpoint decides, before anything is written
            check_run_record(read_checkpoint(latest_checkpoint(run_dir), model_config=mcfg), _record(new))
        make_dirs(run_dir)
        save_json(run_dir / "config.json", new)
        trainer = Trainer(model, objective, cfg.train, run_dir, model_config=mcfg, run_record=_record(new), callbacks=callbacks)
        hw = {**hardware_info(trainer.device), "precision": trainer.precision, "threads": trainer.threads, "precision_requested": requested}
        save_json(run_dir / "machine.json", {**machine_info(), **hw})
        if cfg.train.progress:
            print(f"precision {trainer.precision} ({'auto: ' if requested == 'auto' else ''}{hw['cpu_capability'] if trainer.device.type == 'cpu' else trainer.device}, "
                  f"bf16 native: {hw['bf16_native']}), {trainer.threads} thread(s)", file=sys.stderr)
        if cfg.train.sample_every > 0 and len(sample_shape(source)) == 3:
            labels = torch.arange(64) % cfg.model.num_classes if cfg.model.num_classes > 0 else None
            callbacks = [*(callbacks or []), SampleGridCallback(source, cfg.train.sample_every, labels=labels, guidance=cfg.guidance.scale)]
        trainer.callbacks = callbacks or []
        return trainer.fit(resume=resume)


def _with_objects(cfg: ExperimentConfig, source: Any, target: Any, model: nn.Module | None) -> ExperimentConfig:
    """``cfg`` recording the objects given to :func:`train_run` in place of its own."""
    changes: dict[str, Any] = {}
    if source is not None:
        changes["source"] = object_spec(source)
    if target is not None:
        changes["target"] = object_spec(target)
    if model is not None:
        changes["model"] = replace(cfg.model, kind="custom")
    return replace(cfg, **changes)


def _require_objects(run_dir: Path, source: Any, target: Any, model: nn.Module | None) -> None:
    """A run in ``run_dir`` made of Python objects is resumed only with them (a clear error, not a
    config difference)."""
    old = load_json(run_dir / "config.json") if (run_dir / "config.json").is_file() else None
    if not isinstance(old, dict):
        return
    for role, given in (("source", source), ("target", target)):
        if given is None and is_object_spec(old.get(role)):
            raise DataError(_missing_object(role, old[role]))
    if model is None and isinstance(old.get("model"), dict) and old["model"].get("kind") == "custom":
        raise ConfigError(_missing_network(None))


def _as_recorded(cfg: ExperimentConfig, run_dir: Path) -> ExperimentConfig:
    """``cfg`` as the run records it: data paths absolute (the run can be used from any directory).
    A run in ``run_dir`` that recorded a path as typed (made before paths were recorded absolute)
    keeps it when it names the same file: its checkpoints record the path so."""
    new = replace(cfg, source=absolute_spec(cfg.source), target=absolute_spec(cfg.target))
    old = load_json(run_dir / "config.json") if (run_dir / "config.json").is_file() else None
    if not isinstance(old, dict):  # a new run (a damaged record is the guard's to report)
        if cfg.train.precision == "auto":  # resolved once, on the device the run starts on, and recorded: a resume computes the same
            new = replace(new, train=replace(new.train, precision=resolve_precision("auto", resolve_device(cfg.train.device))))
        if cfg.model.time_scale is None:
            new = replace(new, model=replace(new.model, time_scale=DEFAULT_TIME_SCALE))
        if cfg.eval.holdout is None and point_file_path(new.target) is not None:
            new = replace(new, eval=replace(new.eval, holdout=DEFAULT_HOLDOUT))
        return new
    keep = {k: old[k] for k in ("source", "target") if k in old and old[k] != getattr(new, k) and absolute_spec(old[k]) == getattr(new, k)}
    recorded_precision = old.get("train", {}).get("precision") if isinstance(old.get("train"), dict) else None
    if cfg.train.precision == "auto" and recorded_precision in ("fp32", "bf16"):  # auto resumes a run at the precision it started with
        keep["train"] = replace(new.train, precision=recorded_precision)
    if cfg.model.time_scale is None:  # unset: the scale the run recorded (1000 for an MLP run made before the key)
        recorded = _upgraded(old).get("model", {}).get("time_scale") if isinstance(old.get("model"), dict) else None
        keep["model"] = replace(new.model, time_scale=recorded if recorded is not None else DEFAULT_TIME_SCALE)
    if cfg.eval.holdout is None:  # unset: the split the run recorded (none for a run made before splits)
        recorded = old.get("eval", {}).get("holdout") if isinstance(old.get("eval"), dict) else None
        keep["eval"] = replace(new.eval, holdout=recorded)
    return replace(new, **keep)


def _record(cfg_dict: dict[str, Any]) -> dict[str, Any]:
    """What defines a run's result (stored in its checkpoints): :func:`semantic_config`, plus the
    held-out split of a file target (``eval.holdout`` and ``eval.seed`` choose the training rows)."""
    d = semantic_config(cfg_dict)
    model = d.get("model") if isinstance(d.get("model"), dict) else {}
    if "time_scale" in model and (model.get("kind", "mlp") != "mlp" or model["time_scale"] == LEGACY_TIME_SCALE):
        d["model"] = {k: v for k, v in model.items() if k != "time_scale"}  # only an MLP has it; 1000 as runs before the key recorded it
    ev = cfg_dict.get("eval") if isinstance(cfg_dict.get("eval"), dict) else {}
    if point_file_path(cfg_dict.get("target")) is not None and ev.get("holdout"):
        d["eval"] = {"holdout": ev["holdout"], "seed": ev.get("seed")}
    return d


def _resolved_record(cfg_dict: dict[str, Any]) -> dict[str, Any]:
    """What two runs are compared by: :func:`_record` with data paths resolved."""
    return _record({**cfg_dict, **{k: absolute_spec(cfg_dict[k]) for k in ("source", "target") if k in cfg_dict}})


class _Lazy:
    """A distribution built on first use: a loaded run's target, so commands that do not compare
    with the data (``sample``) never open it."""

    def __init__(self, build: Callable[[], Any]) -> None:
        self._build, self._value = build, None

    def _get(self) -> Any:
        if self._value is None:
            self._value = self._build()
        return self._value

    def __getattr__(self, name: str) -> Any:  # only for attributes this wrapper does not have
        if name.startswith("_"):  # also before __init__ ran (copy, pickle): no recursion
            raise AttributeError(name)
        return getattr(self._get(), name)

    def __reduce__(self) -> tuple[Any, ...]:  # pickled or copied (a spawned worker process) as the distribution itself
        return (_loaded, (self._get(),))

    def __repr__(self) -> str:
        return repr(self._value) if self._value is not None else "<not loaded yet>"


def _loaded(value: Any) -> Any:
    return value


@dataclass
class Run:
    """A trained run loaded from disk: its config, distributions and (EMA) model.  ``target`` is
    what training drew from; ``heldout`` the rows of a file target kept out of it (:func:`split_target`)."""
    path: Path
    config: ExperimentConfig
    model: nn.Module
    source: Any
    target: Any
    step: int
    checkpoint: Path | None = None  # the checkpoint file the weights came from
    heldout: Any = None  # the held-out rows of a file target (a PointCloud), when the run has them

    @property
    def dim(self) -> int:
        return self.source.dim


def load_run(
    run_dir: str | Path,
    *,
    checkpoint: str | Path | None = None,
    ema: bool = True,
    device: str = "cpu",
    source: Any = None,
    target: Any = None,
    model: Any = None,
) -> Run:
    """Load a run directory's config and newest (or given) checkpoint; the EMA weights by default.
    The target distribution is opened on first use (sampling a run never reads its data).

    A run trained on Python objects (:func:`train_run`'s ``source`` / ``target`` / ``model``) needs
    them again: the distributions as objects, the network as an ``nn.Module``, its class (rebuilt
    with the recorded ``config``) or a constructor (:func:`network`); the checkpoint is checked to
    be of that network (class, config and shapes)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise CheckpointError(f"{run_dir}: no such run directory")
    cfg = config_from_dict(_upgraded(load_json(run_dir / "config.json")))
    src = _distribution(cfg.source, source, "source")
    parts = functools.cache(lambda: split_target(cfg, target))  # the target only when used, split once
    tgt, heldout = _Lazy(lambda: parts()[0]), _Lazy(lambda: parts()[1]) if target is None and holds_out(cfg) else None
    path = checkpoint if checkpoint is not None else latest_checkpoint(run_dir)
    if cfg.model.kind == "custom":
        ckpt = read_checkpoint(path)
        if model is None:
            raise ConfigError(_missing_network(ckpt.model_config))
        net = network(model, (ckpt.model_config or {}).get("config"))
        check_model_config(ckpt, model_config(cfg, src.dim, sample_shape(src), net))
    else:
        if model is not None:
            raise ConfigError(f"this run's network is built from its config (model.kind {cfg.model.kind!r}); load it without model=")
        mcfg = model_config(cfg, src.dim, sample_shape(src))
        ckpt = read_checkpoint(path, model_config=mcfg)
        net = build_model(mcfg)
    net = load_weights(net, ckpt, ema=ema).to(resolve_device(device)).eval()
    return Run(run_dir, cfg, net, src, tgt, ckpt.step, ckpt.path, heldout)


def _upgraded(record: Any) -> Any:
    """A run's recorded config with the keys added since it was written set to what they meant
    then (an MLP's ``model.time_scale``: :data:`LEGACY_TIME_SCALE`)."""
    model = record.get("model") if isinstance(record, dict) else None
    if isinstance(model, dict) and model.get("kind", "mlp") == "mlp" and "time_scale" not in model:
        return {**record, "model": {**model, "time_scale": LEGACY_TIME_SCALE}}
    return record


def run_objects(run: Run) -> dict[str, Any]:
    """The Python objects a run was made of, as keyword arguments for :func:`load_run` /
    :func:`train_run` of a related run (its child): ``source`` / ``target`` (the objects) and
    ``model`` (a copy of its network), each only when the run has one."""
    out: dict[str, Any] = {role: getattr(run, role) for role in ("source", "target") if is_object_spec(getattr(run.config, role))}
    if run.config.model.kind == "custom":
        out["model"] = copy.deepcopy(run.model)
    return out
