"""Keep-masks for pruning: a score matrix ``(out, in)`` + a target -> a boolean mask of kept weights.

Shared by magnitude, Wanda and SparseGPT. Objective: keep the highest-scoring weights while meeting the
target *exactly* (ties are broken by `torch.topk`, never by a threshold that could keep more):

* `Sparsity(s)`: each comparison group (a row, or the whole layer) keeps ``size - round(s·size)``.
* `Ratio(r)`:    the most values whose stored bytes (`formats.most_kept`: values in the spec's storage + the
                 1-bit mask, padded to a byte, + scales) are ≤ 1 - r of the dense bytes; per row, every row
                 keeps the same count. The budget is never exceeded.
* `Pattern(n, m)`: in every ``m`` consecutive inputs of every row exactly ``n`` are kept (N:M).
"""
from __future__ import annotations

import torch

from .. import formats
from ..config import Pattern, Ratio, Sparsity, Storage, Target
from ..errors import InputError


def kept_count(target: Ratio | Sparsity, out_f: int, in_f: int, dtype: torch.dtype,
               store: Storage = formats.MODEL_DTYPE, per_row: bool = False) -> int:
    """How many weights one comparison group (a row when ``per_row``, else the whole ``(out, in)`` layer) keeps."""
    size = in_f if per_row else out_f * in_f
    if isinstance(target, Sparsity):
        return size - round(target.value * size)
    kept = formats.most_kept(target.value, out_f, in_f, dtype, store, per_row)
    if kept is None:
        raise InputError(f"ratio {target.value} leaves no bytes for weight values beside the 1-bit mask "
                         f"of a {out_f}x{in_f} layer in {dtype} ({store} values)", "use a smaller --ratio")
    return kept


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


def keep_mask(score: torch.Tensor, target: Target, dtype: torch.dtype, per_row: bool,
              store: Storage = formats.MODEL_DTYPE) -> torch.Tensor:
    """Bool keep-mask ``(out, in)`` for ``score`` ``(out, in)``: higher score = more worth keeping.

    ``per_row``: unstructured targets are met in every output row (Wanda); else over the whole layer
    (the magnitude baseline). `Pattern` targets are always per row and per group of ``m`` inputs.
    """
    if isinstance(target, Pattern):
        return nm_mask(score, target)
    kept = kept_count(target, *score.shape, dtype, store, per_row)
    if per_row:
        return topk_mask(score, kept)
    return topk_mask(score.reshape(-1), kept).view_as(score)  # over the (out*in,) flat scores


def pattern_of(target: Target) -> Pattern | None:
    """The N:M pattern a `Pruned` result carries (None for unstructured targets)."""
    return target if isinstance(target, Pattern) else None
