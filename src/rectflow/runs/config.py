"""Experiment configuration: nested dataclasses, strict YAML/JSON loading and key=value overrides.

Unknown keys and wrongly typed values raise :class:`ConfigError` naming the offending key
and what is allowed, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import types
import typing
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import yaml

from rectflow.diffusion.specs import parse_spec
from rectflow.engine.trainer import TrainConfig
from rectflow.errors import ConfigError

__all__ = [
    "check_int_range",
    "read_config_file",
    "ModelConfig",
    "CouplingConfig",
    "TimeConfig",
    "EvalConfig",
    "ReflowConfig",
    "GuidanceConfig",
    "ExperimentConfig",
    "load_config",
    "config_from_dict",
    "apply_overrides",
    "config_to_dict",
]


@dataclass
class ModelConfig:
    kind: str = "mlp"  # mlp | unet | dit (unet/dit: images, see rectflow.models) | custom (an nn.Module passed as model= to train_run / load_run)
    width: int = 256  # mlp: hidden units; dit: token width
    depth: int = 3  # mlp: hidden layers; dit: transformer blocks
    time_dim: int = 64  # mlp: time-embedding size
    time_scale: float | None = None  # mlp: top angular frequency of the time features; None: 10 for a new run, as recorded for an existing one (1000 before this key)
    activation: str = "silu"  # mlp
    channels: int = 128  # unet: base channels
    channel_mult: list[int] = field(default_factory=lambda: [1, 2, 2, 2])  # unet: per-level multipliers
    num_res_blocks: int = 2  # unet: residual blocks per level
    attention_resolutions: list[int] = field(default_factory=lambda: [16])  # unet: resolutions with attention
    dropout: float = 0.1  # unet
    head_channels: int = 64  # unet: channels per attention head; dit: width / heads
    scale_shift: bool = False  # unet: embedding as GroupNorm scale/shift (ADM) instead of added (DDPM)
    patch_size: int = 2  # dit
    num_classes: int = 0  # unet/dit: > 0 = class-conditional on the target's labels (see guidance)


@dataclass
class CouplingConfig:
    kind: str = "independent"  # independent | ot | pairs
    method: str = "exact"  # for ot: exact | sinkhorn
    reg: float = 0.05  # sinkhorn regulariser, relative to the mean cost
    pairs: str | None = None  # for pairs: directory of a pair store (rectflow.reflow.pairs), theory §4.1


@dataclass
class TimeConfig:
    kind: str = "uniform"  # uniform | logit_normal | u_shaped
    eps: float = 0.0  # uniform: t ~ U[eps, 1 - eps]
    mean: float = 0.0  # logit_normal
    std: float = 1.0  # logit_normal
    a: float = 4.0  # u_shaped: density ~ cosh(a (t - 1/2))

    def params(self) -> dict[str, float]:
        return {"uniform": {"eps": self.eps}, "logit_normal": {"mean": self.mean, "std": self.std}, "u_shaped": {"a": self.a}}.get(self.kind, {})


@dataclass
class EvalConfig:
    n_samples: int = 5000  # held-out points on each side
    seed: int = 12345  # held-out draws; for a file target also which rows are held out
    holdout: float | None = None  # file (.npy/.csv) targets: fraction of rows never trained on; None: 0.1 for a new run, as recorded for an existing one
    solvers: list[str] = field(default_factory=lambda: ["euler:1", "euler:2", "euler:4", "euler:8", "euler:100", "dopri5"])
    rtol: float = 1e-5
    atol: float = 1e-5


@dataclass
class ReflowConfig:
    """Where a run sits in the reflow chain (theory §4.1-4.2); the defaults describe a plain 1-RF.

    ``stage``: for a flow, k of this k-RF (1: trained on an independent/OT coupling; k + 1: on
    pairs of a k-RF, i.e. coupling.kind = pairs).  For a distillation run, k of the k-RF whose
    pairs it learns (0: no teacher, the base coupling).
    """

    stage: int = 1
    parent: str | None = None  # run directory of the flow that generated the pairs (provenance)
    init: str | None = None  # checkpoint whose (EMA) weights initialise the model (e.g. the k-RF's)
    distill: bool = False  # one-step distillation: regress at t = 0 only
    distill_loss: str = "l2"  # l2 | pseudo_huber
    huber_c: float = 0.0  # pseudo-Huber scale c; 0 = 0.00054 sqrt(d)


@dataclass
class GuidanceConfig:
    """Class conditioning (model.num_classes > 0): label dropout in training, guidance in sampling."""

    p_uncond: float = 0.1  # probability of replacing a label by the null label while training
    scale: float = 1.0  # default classifier-free guidance scale w for sampling (1 = plain conditional)


@dataclass
class ExperimentConfig:
    """Everything that defines a run: the two distributions, the model and how it is trained."""

    source: Any = "gaussian"  # a name, a .npy/.csv path, or {name: ..., params...}
    target: Any = "moons"
    model: ModelConfig = field(default_factory=ModelConfig)
    coupling: CouplingConfig = field(default_factory=CouplingConfig)
    time: TimeConfig = field(default_factory=TimeConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    reflow: ReflowConfig = field(default_factory=ReflowConfig)
    guidance: GuidanceConfig = field(default_factory=GuidanceConfig)


INT_LIMIT_BITS, SEED_LIMIT_BITS = 31, 64  # counts and sizes below 2^31; seeds below 2^64 (torch takes 64-bit seeds)


def check_int_range(value: int, name: str) -> int:
    """``value`` when it is in range for ``name`` (a seed: |value| < 2^64; anything else: < 2^31), else one ConfigError
    naming it: a huge integer would otherwise surface later as an OverflowError or a TypeError traceback."""
    bits = SEED_LIMIT_BITS if name.rsplit(".", 1)[-1].lstrip("-").replace("-", "_").endswith("seed") else INT_LIMIT_BITS
    if abs(value) >= 2**bits:
        raise ConfigError(f"{name}: {value} is out of range (its magnitude must be below 2^{bits})")
    return value


def _check_type(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        errors = []
        for arm in typing.get_args(tp):
            if arm is type(None):
                if value is None:
                    return None
                continue
            try:
                return _check_type(value, arm, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"config key {key!r}: {value!r} is not a {tp}")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key {key!r}: expected a list, got {value!r}")
        args = typing.get_args(tp)
        elem = args[0] if args else Any
        items = [_check_type(v, elem, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"config key {key!r}: expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not (isinstance(value, int) or (isinstance(value, float) and value.is_integer())):
            raise ConfigError(f"config key {key!r}: expected an integer, got {value!r}")
        check_int_range(int(value), key)
        return int(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"config key {key!r}: expected true or false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"config key {key!r}: expected a string, got {value!r}")
        return value
    return value


def _from_dict(cls: type, data: Any, prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"config section {prefix or '<root>'!r} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        full = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            close = difflib.get_close_matches(str(key), sorted(names), n=1)
            hint = f"did you mean {(prefix + '.' if prefix else '') + close[0]!r}?" if close else f"allowed keys here: {sorted(names)}"
            raise ConfigError(f"unknown config key {full!r}; {hint}")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _from_dict(tp, value, full)
        else:
            kwargs[key] = _check_type(value, tp, full)
    return cls(**kwargs)


def config_from_dict(data: dict[str, Any]) -> ExperimentConfig:
    """Build and validate an :class:`ExperimentConfig` from nested dicts (YAML/JSON content)."""
    cfg = _from_dict(ExperimentConfig, data or {}, "")
    validate(cfg)
    return cfg


def config_to_dict(cfg: ExperimentConfig) -> dict[str, Any]:
    """Plain nested dict (tuples become lists) that :func:`config_from_dict` reads back."""
    def plain(v: Any) -> Any:
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        return v

    return plain(asdict(cfg))


def load_config(path: str | Path | Sequence[str | Path] | None, overrides: list[str] | None = None,
                defaults: dict[str, Any] | None = None) -> ExperimentConfig:
    """Read a YAML (or JSON) config file, or several (each later file's keys win, section by section: e.g. a recipe and
    the ``train:`` fragment ``rectflow tune --write`` made), apply ``key.sub=value`` overrides, validate.
    ``defaults``: config sections under the files' (a recipe, :mod:`rectflow.runs.recipes`):
    a key a file or an override sets wins."""
    paths = [] if path is None else [path] if isinstance(path, (str, Path)) else list(path)
    data: dict[str, Any] = {}
    for one in paths:  # a later file's source / target replaces the earlier spec whole (its parameters belong to its distribution)
        top = read_config_file(Path(one))
        data = _merged({k: v for k, v in data.items() if k not in _WHOLE or k not in top}, top)
    data = apply_overrides(_merged(defaults or {}, data), overrides or [])
    return config_from_dict(data)


_WHOLE = ("source", "target")  # config keys whose value is one spec, replaced whole by a later file, never merged key by key


def read_config_file(p: Path) -> dict[str, Any]:
    """A YAML (or JSON) file's top-level mapping, read strictly (a key twice is an error); ConfigError naming the file."""
    if not p.is_file():
        raise ConfigError(f"{p}: config file not found")
    try:
        data = yaml.load(p.read_text(encoding="utf-8"), Loader=_StrictLoader) or {}
    except UnicodeDecodeError as e:
        raise ConfigError(f"{p}: not a UTF-8 text file (byte {e.start}: {e.reason})") from None
    except RecursionError:
        raise ConfigError(f"{p}: nested too deeply to be a config") from None
    except ConfigError as e:
        raise ConfigError(f"{p}: {e}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: top level must be a mapping of config sections")
    return data


def _merged(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    """``top`` over ``base``, section by section (a section of ``top`` that is not a mapping replaces)."""
    out = copy.deepcopy(base)
    for key, value in top.items():
        out[key] = _merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else copy.deepcopy(value)
    return out


class _StrictLoader(yaml.SafeLoader):
    """YAML's safe loader, except that a key written twice in one mapping is an error (plain YAML
    keeps the last one silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if not isinstance(key, (str, int, float, bool)) and key is not None:
                raise ConfigError(f"key {key!r} (line {line}) is not a name: config keys are plain words")
            if key in seen:
                raise ConfigError(f"key {key!r} appears twice in one mapping (lines {seen[key]} and {line}); merge them")
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


def _non_finite_numbers(value: Any, key: str) -> list[str]:
    """Dotted keys under ``key`` whose value is a float NaN or inf (bools and ints are finite)."""
    if isinstance(value, dict):
        return [k for name, v in value.items() for k in _non_finite_numbers(v, f"{key}.{name}" if key else str(name))]
    if isinstance(value, (list, tuple)):
        return [k for i, v in enumerate(value) for k in _non_finite_numbers(v, f"{key}[{i}]")]
    return [key] if isinstance(value, float) and not math.isfinite(value) else []


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` strings (value parsed as YAML) to a nested dict, returning a copy."""
    out = copy.deepcopy(data)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key.subkey=value")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        node = out
        parts = key.strip().split(".")
        for part in parts[:-1]:
            if not isinstance(node.get(part, {}), dict):
                raise ConfigError(f"override {item!r}: {part!r} is not a section")
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return out


_CHOICES = {
    "model.kind": ("mlp", "unet", "dit", "custom"),
    "model.activation": ("silu", "gelu", "relu", "tanh"),
    "coupling.kind": ("independent", "ot", "pairs"),
    "coupling.method": ("exact", "sinkhorn"),
    "time.kind": ("uniform", "logit_normal", "u_shaped"),
    "reflow.distill_loss": ("l2", "pseudo_huber"),
}


def validate(cfg: ExperimentConfig) -> None:
    """Range and choice checks that need more than a type (raises ConfigError)."""
    bad = _non_finite_numbers(config_to_dict(cfg), "")
    if bad:
        raise ConfigError(f"config key {bad[0]!r}: must be a finite number, got {_lookup(config_to_dict(cfg), bad[0])}")
    for key, allowed in _CHOICES.items():
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if value not in allowed:
            raise ConfigError(f"config key {key!r}: {value!r} is not one of {list(allowed)}")
    m = cfg.model
    if m.width < 1 or m.depth < 1 or m.time_dim < 2 or m.time_dim % 2:
        raise ConfigError("model: width and depth must be >= 1 and time_dim an even number >= 2")
    if m.time_scale is not None and not m.time_scale > 0:
        raise ConfigError(f"config key 'model.time_scale': must be > 0, got {m.time_scale}")
    _validate_images(cfg)
    if cfg.eval.n_samples < 2:
        raise ConfigError(f"config key 'eval.n_samples': must be >= 2, got {cfg.eval.n_samples}")
    if cfg.eval.holdout is not None and not 0 <= cfg.eval.holdout < 1:
        raise ConfigError(f"config key 'eval.holdout': the fraction of a file target's rows held out must lie in [0, 1), got {cfg.eval.holdout}")
    if not cfg.eval.rtol > 0:
        raise ConfigError(f"config key 'eval.rtol': must be > 0, got {cfg.eval.rtol}")

    for spec in cfg.eval.solvers:
        parse_spec(spec)
    _validate_reflow(cfg)
    cfg.train.validate()


def _lookup(d: dict[str, Any], dotted: str) -> Any:
    for part in dotted.replace("[", ".").replace("]", "").split("."):
        d = d[int(part)] if isinstance(d, (list, tuple)) else d[part]
    return d


def _validate_reflow(cfg: ExperimentConfig) -> None:
    """coupling.pairs goes with coupling.kind = pairs, and the reflow stage matches the coupling."""
    c, r = cfg.coupling, cfg.reflow
    if c.kind == "pairs" and not c.pairs:
        raise ConfigError("config key 'coupling.pairs': set the pair-store directory when coupling.kind is 'pairs'")
    if c.kind != "pairs" and c.pairs is not None:
        raise ConfigError(f"config key 'coupling.pairs': only used with coupling.kind=pairs (coupling.kind is {c.kind!r})")
    if r.stage < 0 or (r.stage == 0 and not r.distill):
        raise ConfigError(f"config key 'reflow.stage': must be >= 1 for a flow (>= 0 for distillation), got {r.stage}")
    if not r.distill and (c.kind == "pairs") != (r.stage >= 2):
        raise ConfigError(
            f"config key 'reflow.stage': a flow trained on pairs of a k-RF is a (k+1)-RF (stage >= 2) and only such a flow "
            f"has stage >= 2; got stage {r.stage} with coupling.kind={c.kind!r}"
        )
    if not r.huber_c >= 0:
        raise ConfigError(f"config key 'reflow.huber_c': must be >= 0, got {r.huber_c}")
    if c.kind == "ot" and c.method == "sinkhorn" and not c.reg > 0:
        raise ConfigError(f"config key 'coupling.reg': the Sinkhorn regulariser must be > 0, got {c.reg}")


def _validate_images(cfg: ExperimentConfig) -> None:
    """Ranges of the image-model and guidance keys."""
    m, g = cfg.model, cfg.guidance
    if m.kind == "unet" and (m.channels < 1 or m.num_res_blocks < 1 or not m.channel_mult or min(m.channel_mult) < 1 or m.channels * min(m.channel_mult) % m.head_channels):
        raise ConfigError("model (unet): channels, num_res_blocks and channel_mult entries must be >= 1, and level widths divisible by head_channels")
    if m.kind == "dit" and (m.width % m.head_channels or m.width % 4 or m.patch_size < 1):
        raise ConfigError(f"model (dit): width {m.width} must be divisible by head_channels {m.head_channels} and by 4, patch_size >= 1")
    if not 0 <= m.dropout < 1:
        raise ConfigError(f"config key 'model.dropout': must lie in [0, 1), got {m.dropout}")
    if m.num_classes < 0:
        raise ConfigError(f"config key 'model.num_classes': must be >= 0 (0 = unconditional), got {m.num_classes}")
    if m.num_classes > 0 and m.kind == "mlp":
        raise ConfigError("config key 'model.num_classes': class conditioning needs model.kind unet or dit")
    if not 0 <= g.p_uncond <= 1:
        raise ConfigError(f"config key 'guidance.p_uncond': must lie in [0, 1], got {g.p_uncond}")
