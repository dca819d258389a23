"""Keep-masks for pruning: a score matrix ``(out, in)`` + a target -> a boolean mask of kept weights.

Shared by magnitude, Wanda and SparseGPT. Objective: keep the highest-scoring weights while meeting the
target *exactly* (ties are broken by `torch.topk`, never by a threshold that could keep more):

* `Sparsity(s)`: each comparison group (a row, or the whole layer) keeps ``size - round(s·size)``.
* `Ratio(r)`:    density ``d = formats.density_for_ratio(r, dtype)`` (values + 1-bit mask ≤ 1 - r
                 of the dense bytes); each group keeps ``floor(d·size)``, so the budget is never exceeded.
* `Pattern(n, m)`: in every ``m`` consecutive inputs of every row exactly ``n`` are kept (N:M).
"""
from __future__ import annotations

import math

import torch

from .. import formats
from ..config import Pattern, Ratio, Sparsity, Target
from ..errors import InputError


def kept_fraction(target: Ratio | Sparsity, dtype: torch.dtype) -> float:
    """Fraction of weights kept for an unstructured target (stored dtype matters for `Ratio`)."""
    if isinstance(target, Sparsity):
        return 1.0 - target.value
    try:
        return formats.density_for_ratio(target.value, dtype)
    except ValueError:
        raise InputError(f"ratio {target.value} leaves no bytes for weight values beside the 1-bit mask "
                         f"in {dtype}", f"use --ratio below {1 - 1 / torch.finfo(dtype).bits:.3f}") from None


def kept_count(target: Ratio | Sparsity, size: int, dtype: torch.dtype) -> int:
    """How many of ``size`` weights one comparison group keeps (see the module docstring)."""
    if isinstance(target, Sparsity):
        return size - round(target.value * size)
    return min(size, math.floor(kept_fraction(target, dtype) * size))


def check_pattern(shape: tuple[int, ...], pattern: Pattern) -> None:
    """Raise `InputError` unless the input width of a weight ``(out, in)`` is a multiple of ``m``."""
    in_features = shape[-1]
    if in_features % pattern.m == 0:
        return
    ms = [m for m in range(2, 17) if in_features % m == 0]
    hint = f"--pattern N:M with M in {ms}" if ms else "no N:M pattern fits this width"
    raise InputError(f"weight of shape {tuple(shape)}: in_features {in_features} is not divisible by "
                     f"M={pattern.m} of pattern {pattern}",
                     f"use {hint}, or --sparsity / --ratio for unstructured pruning")


def topk_mask(score: torch.Tensor, k: int) -> torch.Tensor:
    """Bool mask, same shape as ``score`` ``(..., size)``: True at the ``k`` largest of each last-dim row."""
    mask = torch.zeros_like(score, dtype=torch.bool)
    if k > 0:
        mask.scatter_(-1, score.topk(k, dim=-1).indices, True)
    return mask


def nm_mask(score: torch.Tensor, pattern: Pattern) -> torch.Tensor:
    """Keep the ``n`` highest scores in each group of ``m`` consecutive columns of ``score`` ``(out, in)``."""
    check_pattern(score.shape, pattern)
    out_f, in_f = score.shape
    groups = score.reshape(out_f, in_f // pattern.m, pattern.m)  # (out, in/m, m)
    return topk_mask(groups, pattern.n).reshape(out_f, in_f)  # (out, in)


def keep_mask(score: torch.Tensor, target: Target, dtype: torch.dtype, per_row: bool) -> torch.Tensor:
    """Bool keep-mask ``(out, in)`` for ``score`` ``(out, in)``: higher score = more worth keeping.

    ``per_row``: unstructured targets are met in every output row (Wanda); else over the whole layer
    (the magnitude baseline). `Pattern` targets are always per row and per group of ``m`` inputs.
    """
    if isinstance(target, Pattern):
        return nm_mask(score, target)
    if per_row:
        return topk_mask(score, kept_count(target, score.shape[1], dtype))
    flat = score.reshape(-1)  # (out*in,)
    return topk_mask(flat, kept_count(target, flat.numel(), dtype)).view_as(score)


def pattern_of(target: Target) -> Pattern | None:
    """The N:M pattern a `Pruned` result carries (None for unstructured targets)."""
    return target if isinstance(target, Pattern) else None
