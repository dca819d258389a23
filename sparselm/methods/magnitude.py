"""Magnitude pruning (the baseline of Han et al. 2015, as run in the Wanda repository).

Objective: zero the weights of smallest ``|W_ij|``. Data-free. Unstructured targets are met over the
whole layer (the Wanda repo's magnitude baseline compares all weights of a layer); N:M per group.
"""
from __future__ import annotations

import torch

from ..capture import LinearStats
from ..config import MagnitudeSpec
from . import Pruned, register
from .masks import keep_mask, pattern_of


@register(MagnitudeSpec)
def magnitude(W: torch.Tensor, stats: LinearStats | None, spec: MagnitudeSpec, dtype: torch.dtype) -> Pruned:
    """Keep the largest ``|W|`` of ``W`` ``(out, in)``; ``stats`` is ignored (may be None)."""
    W = W.float()
    mask = keep_mask(W.abs(), spec.target, dtype, per_row=False, store=spec.store)  # (out, in)
    return Pruned(W * mask, mask, pattern_of(spec.target), {"grouping": "layer"}, spec.store)
