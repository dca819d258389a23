"""Wanda: Pruning by Weights and activations (Sun, Liu, Bair, Kolter 2023, arXiv:2306.11695).

Objective: zero the weights of smallest score ``S_ij = |W_ij| · ‖X_j‖₂`` where ``‖X_j‖₂`` is the L2 norm
of input feature ``j`` over the calibration tokens; no weight update. Unstructured targets are met per
output row (the paper's comparison group); N:M per group of ``m`` inputs. The norms' scale (summed or
averaged over tokens) does not change the mask, so the summed `LinearStats.sq_norms` is used as is.
"""
from __future__ import annotations

import torch

from ..capture import LinearStats
from ..config import WandaSpec
from ..errors import InputError
from . import Pruned, register
from .masks import keep_mask, pattern_of


def wanda_score(W: torch.Tensor, sq_norms: torch.Tensor) -> torch.Tensor:
    """``|W_ij| · sqrt(sq_norms_j)`` for ``W`` ``(out, in)`` and ``sq_norms`` ``(in,)``; float32 ``(out, in)``."""
    norms = sq_norms.to(device=W.device, dtype=torch.float64).clamp_min(0).sqrt().float()  # (in,)
    return W.abs() * norms.unsqueeze(0)  # (out, in)


@register(WandaSpec)
def wanda(W: torch.Tensor, stats: LinearStats | None, spec: WandaSpec, dtype: torch.dtype) -> Pruned:
    """Prune ``W`` ``(out, in)`` by the Wanda score; needs the layer's calibration ``stats``."""
    if stats is None:
        raise InputError("method 'wanda' got no calibration statistics for this layer",
                         "run it with calibration data (--calib), or use --method magnitude")
    W = W.float()
    mask = keep_mask(wanda_score(W, stats.sq_norms), spec.target, dtype, per_row=True, store=spec.store)  # (out, in)
    return Pruned(W * mask, mask, pattern_of(spec.target), {"grouping": "row"}, spec.store)
