"""The PeRFlow weight delta in low-rank (LoRA) form, written so that diffusers' stock
``pipe.load_lora_weights(folder)`` (via peft) loads it (theory §5.3: plug the acceleration into
another model derived from the same teacher).

For every ``nn.Linear`` and ``nn.Conv2d`` (groups 1) of the UNet, the weight change
``D = W_student - W_teacher`` is factored by a truncated SVD at rank r: with ``D`` reshaped to
(out, in * kh * kw) and ``D = U S V^T``,

    lora_B = U_r sqrt(S_r)      (out, r)               conv: (out, r, 1, 1)
    lora_A = sqrt(S_r) V_r^T    (r, in)                conv: (r, in, kh, kw)

so ``B @ A`` is the best rank-r approximation of ``D`` in the Frobenius norm (Eckart-Young), exact
at full rank min(out, in kh kw).  For a convolution, a kh x kw convolution with A (same stride,
padding and dilation as the layer) followed by a 1 x 1 convolution with B applies exactly the
kernel ``B . A``, which is how peft runs a conv LoRA.  Bias changes are left out by default (a
standard LoRA, which ``pipe.fuse_lora()`` can merge); ``bias=True`` stores them as ``lora_B.bias``
(peft's ``lora_bias``): exact, but peft then gives every module a bias term and cannot fuse layers
that have none (SD's attention projections).  Other parameters (normalisation scales and shifts,
embeddings, grouped convolutions) have no LoRA form; :class:`LoraReport` lists them and the share of
the delta they hold, and the full delta (:mod:`rectflow.perflow.delta`) remains the exact form.

File format (diffusers 0.42 / peft): ``pytorch_lora_weights.safetensors`` with keys
``unet.<module path>.lora_A.weight``, ``unet.<module path>.lora_B.weight`` (and ``.lora_B.bias``),
no alphas (so alpha = rank per module and the scale is 1: ``W + B A``).  diffusers reads each
module's rank from its ``lora_B`` shape.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from rectflow.engine.io import load_tensors, save_tensors
from rectflow.errors import CheckpointError, ConfigError, check_int

__all__ = ["LORA_WEIGHT_NAME", "LoraReport", "apply_lora", "load_lora", "lora_factors", "lora_state_dict", "lora_to_delta", "save_lora"]

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # the file name diffusers' load_lora_weights looks for
_FORMAT = "rectflow.perflow.lora"


@dataclass
class LoraReport:
    """What a LoRA export kept and lost.

    Attributes:
        rank: the requested rank (None: full rank everywhere).
        ranks: module path -> rank used (min(requested, the weight's full rank)).
        weight_error: module path -> ||D - B A||_F / ||D||_F of its weight delta (0 at full rank).
        uncovered: parameter name -> ||delta||_F of changed parameters with no LoRA form.
        delta_norm: ||delta||_F over all changed parameters; ``residual_norm`` of what the LoRA misses
            (truncation and uncovered parameters together).
        n_params: numbers stored in the LoRA.
    """

    rank: int | None
    ranks: dict[str, int] = field(default_factory=dict)
    weight_error: dict[str, float] = field(default_factory=dict)
    uncovered: dict[str, float] = field(default_factory=dict)
    delta_norm: float = 0.0
    residual_norm: float = 0.0
    n_params: int = 0

    @property
    def relative_error(self) -> float:
        """||delta - LoRA||_F / ||delta||_F over the whole model (0: the LoRA is the delta)."""
        return self.residual_norm / self.delta_norm if self.delta_norm > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"rank": self.rank, "relative_error": self.relative_error, "delta_norm": self.delta_norm, "n_params": self.n_params,
                "modules": len(self.ranks), "uncovered": self.uncovered}


def lora_factors(delta: Tensor, rank: int | None = None) -> tuple[Tensor, Tensor]:
    """(A, B) with B A the best rank-``rank`` approximation of a Linear (out, in) or Conv2d
    (out, in, kh, kw) weight delta; shapes A (r, in[, kh, kw]), B (out, r[, 1, 1]), float32.
    ``rank`` None or above the full rank: full rank (exact)."""
    if delta.dim() not in (2, 4):
        raise ConfigError(f"lora_factors: expected a Linear (2-D) or Conv2d (4-D) weight delta, got shape {tuple(delta.shape)}")
    if rank is not None:
        check_int(rank, "lora rank", note=" (or None for full rank)")
    out = delta.shape[0]
    mat = delta.detach().to(torch.float64).reshape(out, -1)
    u, s, vh = torch.linalg.svd(mat, full_matrices=False)
    r = s.numel() if rank is None else min(rank, s.numel())
    root = s[:r].sqrt()
    b = (u[:, :r] * root).float()
    a = (root[:, None] * vh[:r]).float()
    if delta.dim() == 4:
        return a.reshape(r, *delta.shape[1:]).contiguous(), b.reshape(out, r, 1, 1).contiguous()
    return a.contiguous(), b.contiguous()


def _lora_modules(model: nn.Module) -> dict[str, nn.Module]:
    return {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear) or (isinstance(m, nn.Conv2d) and m.groups == 1)}


def lora_state_dict(student: nn.Module, teacher: nn.Module, rank: int | None = None, *, bias: bool = False,
                    prefix: str = "unet", min_norm: float = 0.0) -> tuple[dict[str, Tensor], LoraReport]:
    """The LoRA of ``student - teacher`` (same architecture) in diffusers' peft key format.

    Args:
        student, teacher: the two networks (e.g. ``student.net.unet`` and the teacher's ``unet``).
        rank: the rank of every module (None: full rank, exact for Linear / Conv weights).
        bias: store bias changes as ``lora_B.bias`` (every LoRA module then carries one, zeros where
            the layer has none or nothing changed, since peft gives them all one; ``fuse_lora`` then
            fails on layers without a bias).  False: bias changes are reported as uncovered.
        prefix: the component's key prefix (``"unet"`` for ``load_lora_weights``).
        min_norm: modules whose weight and bias changes have a Frobenius norm <= this are skipped.
    Returns:
        (state dict, :class:`LoraReport`).
    """
    s_params, t_params = dict(student.named_parameters()), dict(teacher.named_parameters())
    if s_params.keys() != t_params.keys():
        raise ConfigError("perflow.lora: student and teacher have different parameter names")
    deltas = {}
    for name, p in s_params.items():
        if p.shape != t_params[name].shape:
            raise ConfigError(f"perflow.lora: shape mismatch for {name}: {tuple(p.shape)} vs {tuple(t_params[name].shape)}")
        deltas[name] = (p.detach().double().cpu() - t_params[name].detach().double().cpu())
    modules = _lora_modules(teacher)
    chosen = {}
    for name, m in modules.items():
        dw = deltas[f"{name}.weight"]
        db = deltas.get(f"{name}.bias") if m.bias is not None else None
        norm = math.sqrt(float(dw.square().sum()) + (float(db.square().sum()) if db is not None else 0.0))
        if norm > min_norm:
            chosen[name] = (dw, db)
    with_bias = bool(bias)
    report = LoraReport(rank)
    covered, sd = set(), {}
    total, residual = 0.0, 0.0
    for name, (dw, db) in chosen.items():
        a, b = lora_factors(dw, rank)
        approx = (b.double().reshape(b.shape[0], -1) @ a.double().reshape(a.shape[0], -1)).reshape(dw.shape)
        err = float((dw - approx).square().sum())
        residual += err
        report.ranks[name] = a.shape[0]
        report.weight_error[name] = math.sqrt(err / float(dw.square().sum())) if bool(dw.any()) else 0.0
        sd[f"{prefix}.{name}.lora_A.weight"], sd[f"{prefix}.{name}.lora_B.weight"] = a, b
        covered.add(f"{name}.weight")
        if with_bias:
            sd[f"{prefix}.{name}.lora_B.bias"] = (db if db is not None else torch.zeros(dw.shape[0], dtype=torch.float64)).float()
            if db is not None:
                covered.add(f"{name}.bias")
    loraable = {f"{m}.weight" for m in modules} | ({f"{m}.bias" for m in modules} if with_bias else set())
    for name, d in deltas.items():
        sq = float(d.square().sum())
        total += sq
        if name not in covered and sq > 0:
            residual += sq  # a module below min_norm is a truncation; anything else has no LoRA form
            if name not in loraable:
                report.uncovered[name] = math.sqrt(sq)
    report.delta_norm, report.residual_norm = math.sqrt(total), math.sqrt(residual)
    report.n_params = sum(v.numel() for v in sd.values())
    return sd, report


def save_lora(folder: str | Path, student: nn.Module, teacher: nn.Module, rank: int | None = None, *, bias: bool = False,
              boundaries: Tensor | None = None, metadata: dict[str, Any] | None = None, prefix: str = "unet") -> LoraReport:
    """Write ``folder/pytorch_lora_weights.safetensors`` (atomic) for ``pipe.load_lora_weights(folder)``;
    the window boundaries and the report go into the file's metadata.  ``prefix``: the component the
    pipeline loads it into, "unet" or (SD3) "transformer".  Returns the :class:`LoraReport`."""
    sd, report = lora_state_dict(student, teacher, rank, bias=bias, prefix=prefix)
    if not sd:
        raise ConfigError("perflow.save_lora: the student's Linear/Conv weights equal the teacher's; there is no delta to store")
    meta = {**(metadata or {}), "format": _FORMAT, "prefix": prefix, "report": report.to_dict()}
    if boundaries is not None:
        meta["windows"] = [float(v) for v in boundaries]
    save_tensors(Path(folder) / LORA_WEIGHT_NAME, sd, meta)
    return report


def load_lora(path: str | Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """(state dict, metadata) of a LoRA file, or of ``folder/pytorch_lora_weights.safetensors``."""
    p = Path(path)
    return load_tensors(p / LORA_WEIGHT_NAME if p.is_dir() else p)


def lora_to_delta(state: dict[str, Tensor], *, prefix: str = "unet") -> dict[str, Tensor]:
    """The dense weight delta of a LoRA state dict: parameter name -> B A (and the bias), float32."""
    out = {}
    heads = sorted({k[: -len(".lora_A.weight")] for k in state if k.endswith(".lora_A.weight")})
    for head in heads:
        a, b = state[f"{head}.lora_A.weight"], state.get(f"{head}.lora_B.weight")
        if b is None:
            raise CheckpointError(f"LoRA state: {head}.lora_A.weight has no lora_B.weight")
        name = head[len(prefix) + 1:] if prefix and head.startswith(prefix + ".") else head
        w = (b.double().reshape(b.shape[0], -1) @ a.double().reshape(a.shape[0], -1))
        out[f"{name}.weight"] = w.reshape(b.shape[0], *a.shape[1:]).float()
        if f"{head}.lora_B.bias" in state:
            out[f"{name}.bias"] = state[f"{head}.lora_B.bias"].float()
    return out


def apply_lora(model: nn.Module, lora: dict[str, Tensor] | str | Path, scale: float = 1.0, *, prefix: str | None = None) -> nn.Module:
    """In place: merge a LoRA (state dict, file or folder) into ``model``: W <- W + scale B A (and
    b <- b + scale bias).  A bias for a layer without one is refused (peft would add the term).
    ``prefix``: the keys' component prefix (default: a file's recorded one, else "unet").
    Every name and shape is checked before the first weight changes, so a LoRA of another
    architecture leaves the model as it was (the error names the file)."""
    source, recorded = "perflow.apply_lora", "unet"
    if isinstance(lora, (str, Path)):
        p = Path(lora)
        source = str(p / LORA_WEIGHT_NAME if p.is_dir() else p)
        lora, meta = load_lora(p)
        recorded = str(meta.get("prefix", "unet"))
    prefix = recorded if prefix is None else prefix
    params = dict(model.named_parameters())
    deltas = {}
    try:
        dense = lora_to_delta(lora, prefix=prefix)
    except CheckpointError as e:
        raise CheckpointError(f"{source}: {e}") from None
    for name, d in dense.items():
        if name not in params and name.endswith(".bias") and not bool(d.any()):
            continue  # peft gives every module a LoRA bias; zeros where the layer has none
        if name not in params:
            raise ConfigError(f"{source}: the model has no parameter {name!r} (a LoRA of another architecture?)")
        if params[name].shape != d.shape:
            raise ConfigError(f"{source}: shape mismatch for {name}: {tuple(params[name].shape)} in the model, {tuple(d.shape)} in the LoRA")
        deltas[name] = d
    with torch.no_grad():
        for name, d in deltas.items():
            params[name].add_(d.to(params[name].device, params[name].dtype), alpha=scale)
    return model
