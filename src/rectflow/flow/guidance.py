"""Classifier-free guidance of a conditional network: the one implementation in the library (theory §7.2, §5.5).

A conditional network is called as ``net(z, t, cond)`` with ``cond`` batch-first: class labels
(B,) int64, text embeddings (B, L, D), or a tuple / list / dict of such tensors.  The *null*
condition is what the network was trained to read as "no condition": :data:`NULL_LABEL` for
class labels, the empty prompt's embedding for text.  Guidance at scale w is

    out_w = out(z, t | null) + w (out(z, t | cond) - out(z, t | null)),

computed in ONE network call on the batch cat([z, z]) with cat([cond, null]) and split in two.
w = 1 is the plain conditional network (one call on B rows), w = 0 the unconditional one.  The
combination is applied to whatever the network outputs (eps, x0, v, velocity): callers that
convert outputs afterwards keep it in the network's own output space.

NFE rule: a guided evaluation (w not in {0, 1}) costs 2 network evaluations per sample even
though it is one batched call (:func:`guidance_nfe`).

Users: :class:`rectflow.images.conditional.GuidedVelocity` (class-conditional image flows) and
:class:`rectflow.perflow.guidance_modes.Guidance` (PeRFlow teachers and students).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from rectflow.draws import rand
from rectflow.errors import ConfigError, check_fraction
from rectflow.protocols import NULL_LABEL

__all__ = ["NULL_LABEL", "check_guidance_scale", "concat_conditions", "condition_batch", "drop_conditions", "guidance_nfe", "guided_call", "map_condition", "null_condition"]


def check_guidance_scale(scale: float) -> float:
    """``scale`` as a float; ConfigError when it is not a finite number."""
    try:
        w = float(scale)
    except (TypeError, ValueError):
        raise ConfigError(f"guidance scale must be a finite number, got {scale!r}") from None
    if not math.isfinite(w):
        raise ConfigError(f"guidance scale must be a finite number, got {scale}")
    return w


def guidance_nfe(scale: float) -> int:
    """Network evaluations per sample of one guided evaluation: 1 for w in {0, 1}, else 2."""
    return 1 if float(scale) in (0.0, 1.0) else 2


def condition_batch(cond: Any) -> int:
    """The batch size of a condition (a tensor, or a tuple / list / dict of tensors): its first tensor's first dimension."""
    if isinstance(cond, Tensor):
        return cond.shape[0]
    if isinstance(cond, dict):
        return condition_batch(next(iter(cond.values())))
    if isinstance(cond, (tuple, list)):
        return condition_batch(cond[0])
    raise ConfigError(f"a condition must be a tensor (or a tuple / list / dict of tensors), got {type(cond).__name__}")


def null_condition(cond: Any, null_cond: Any) -> Any:
    """The null condition with the structure and batch size of ``cond``.

    ``null_cond``: a number (integer labels only; e.g. NULL_LABEL) filled into every row; a tensor
    of one example's shape (e.g. (L, D)) or with a batch of 1 (1, L, D), broadcast over the batch;
    or a tensor of ``cond``'s full shape; for tuple / list / dict conditions the same structure.
    """
    if isinstance(cond, dict):
        if not isinstance(null_cond, dict) or set(null_cond) != set(cond):
            raise ConfigError(f"the null condition must be a dict with the condition's keys {sorted(cond)}")
        return {k: null_condition(v, null_cond[k]) for k, v in cond.items()}
    if isinstance(cond, (tuple, list)):
        if not isinstance(null_cond, (tuple, list)) or len(null_cond) != len(cond):
            raise ConfigError(f"the null condition must be a sequence of {len(cond)} parts like the condition")
        return type(cond)(null_condition(c, n) for c, n in zip(cond, null_cond))
    if not isinstance(cond, Tensor):
        raise ConfigError(f"a condition must be a tensor (or a tuple / list / dict of tensors), got {type(cond).__name__}")
    if isinstance(null_cond, Tensor) and null_cond.dim() > 0:
        n = null_cond.to(device=cond.device, dtype=cond.dtype)
        if n.shape == cond.shape[1:]:
            n = n.unsqueeze(0)
        if n.dim() == cond.dim() and n.shape[1:] == cond.shape[1:] and n.shape[0] in (1, cond.shape[0]):
            return n.expand(cond.shape)
        raise ConfigError(f"the null condition of shape {tuple(null_cond.shape)} does not fit conditions of shape {tuple(cond.shape)} "
                          f"(give one example's shape {tuple(cond.shape[1:])})")
    if isinstance(null_cond, bool) or not isinstance(null_cond, (int, float, Tensor)):
        raise ConfigError(f"the null condition must be a number or a tensor, got {type(null_cond).__name__}")
    if cond.is_floating_point():
        raise ConfigError("a number as the null condition fits integer labels only; for embeddings give the null embedding "
                          "(e.g. the empty prompt's) as a tensor")
    return torch.full_like(cond, int(null_cond))


def map_condition(fn: Callable[..., Tensor], cond: Any, *others: Any) -> Any:
    """``fn`` applied to every tensor of a condition (a tensor, or a tuple / list / dict of tensors), given the
    tensors at the same place of ``others`` (conditions of the same structure) as further arguments;
    returns ``cond``'s structure.  E.g. ``map_condition(lambda c: c[idx], cond)`` takes rows of every part."""
    if isinstance(cond, dict):
        return {k: map_condition(fn, v, *(o[k] for o in others)) for k, v in cond.items()}
    if isinstance(cond, (tuple, list)):
        return type(cond)(map_condition(fn, *parts) for parts in zip(cond, *others))
    return fn(cond, *others)


def concat_conditions(a: Any, b: Any) -> Any:
    """Two conditions of one structure stacked along the batch (a first)."""
    return map_condition(lambda x, y: torch.cat([x, y]), a, b)


def _rows_where(mask: Tensor, null: Any, cond: Any) -> Any:
    return map_condition(lambda c, n: torch.where(mask.to(c.device).reshape(-1, *[1] * (c.dim() - 1)), n, c), cond, null)


def drop_conditions(cond: Any, null_cond: Any, p_uncond: float, generator: torch.Generator | None = None) -> Any:
    """Condition dropout: each example's condition replaced by the null one with probability
    ``p_uncond``; one uniform draw per example from ``generator`` (always made, so the stream does
    not depend on p).  Returns ``cond``'s structure, batch B."""
    p_uncond = check_fraction(p_uncond, "condition dropout p_uncond")
    b = condition_batch(cond)
    first = cond
    while not isinstance(first, Tensor):
        first = next(iter(first.values())) if isinstance(first, dict) else first[0]
    dropped = rand(b, generator=generator, device=first.device, draw_on=first.device) < p_uncond
    return _rows_where(dropped, null_condition(cond, null_cond), cond)


def guided_call(net: Callable[[Tensor, Tensor, Any], Tensor], z: Tensor, t: Tensor, cond: Any, null_cond: Any, scale: float) -> Tensor:
    """Classifier-free guided output of ``net(z, t, cond)`` at scale w (see the module docstring).

    z (B, ...), t (B,) (or a scalar time shared by all rows), ``cond`` batch B.  For w not in {0, 1}
    the network runs once on 2B rows; returns (B, ...) in the network's own output space.
    """
    w = float(scale)
    if w == 1.0:
        return net(z, t, cond)
    null = null_condition(cond, null_cond)
    if w == 0.0:
        return net(z, t, null)
    b = z.shape[0]
    tt = torch.cat([t, t]) if isinstance(t, Tensor) and t.dim() > 0 and t.shape[0] == b else t
    out_c, out_u = net(torch.cat([z, z]), tt, concat_conditions(cond, null)).chunk(2)
    return torch.lerp(out_u, out_c, w)  # out_u + w (out_c - out_u)
