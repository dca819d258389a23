"""Rounding weights to their storage as an OBS sweep fixes them, column by column (GPTQ, Frantar et al. 2023).

Shared by SparseGPT (``storage`` other than the model dtype: joint pruning + quantization) and GQSA / GPTQ
(`gqsa`). Objective of the sweep: each column's rounding error is spread over the columns not yet fixed by the
OBS update, so ``‖X(W − Ŵ)ᵀ‖`` is minimized greedily. This file only says *how a column is rounded*:

* float storages (bf16, fp16, 14-bit bf16): each value to its nearest representable one.
* int8 / int4 (`packing.fit_params`): one scale (+ int4 zero point) per row and group of ``g`` consecutive input
  columns (``g = 0``: the whole row), fitted before the rounding sweep (`fit`) from the weights a first,
  rounding-free sweep produced (`sparsegpt.joint_sweep`); fixed during the sweep (GPTQ's ``static_groups``).

Same as GPTQ's reference (IST-DASLab/gptq ``quant.py``): asymmetric min/max range that includes 0, integer zero
point, round to nearest, parameters per row and group. Different: the parameters are fitted on the pruned (first
sweep's) weights, not on the weights as the sweep reaches each group (measured better, `sparsegpt`); scales are
rounded to fp16 (what is stored); int8 is symmetric (absmax/127).
"""
from __future__ import annotations

import torch

from ..config import CoefStorage, Storage
from ..packing import QParams, dequantize_codes, fit_params, groups_per_row, quantize_codes, round_values


class ColumnQuantizer:
    """Rounds the columns of an ``(out, in)`` weight to ``store`` as they are fixed; keeps the parameters."""

    def __init__(self, store: Storage, dtype: torch.dtype, out_f: int, in_f: int):
        self.store, self.dtype, self.out_f, self.in_f = store, dtype, out_f, in_f
        self.g = store.group or in_f
        self.per_row = groups_per_row(in_f, store.group)
        self.scale = torch.ones(out_f, self.per_row, dtype=torch.float16)  # (out, groups per row)
        self.zero = torch.zeros(out_f, self.per_row, dtype=torch.int64)
        self.rows = torch.arange(out_f)

    @classmethod
    def of(cls, store: Storage, dtype: torch.dtype, out_f: int, in_f: int) -> "ColumnQuantizer | None":
        """None when the values are stored in the model dtype (nothing to round in the sweep)."""
        return None if store.kind is CoefStorage.DTYPE else cls(store, dtype, out_f, in_f)

    def fit(self, W: torch.Tensor, keep: torch.Tensor) -> None:
        """Every group's parameters, round-to-nearest from the kept entries (``keep`` bool) of ``W`` ``(out, in)``."""
        if not self.store.kind.quantized:
            return
        pos = keep.nonzero()  # (n, 2)
        groups = pos[:, 0] * self.per_row + torch.div(pos[:, 1], self.g, rounding_mode="floor")
        p = fit_params(W[keep], groups, self.out_f * self.per_row, self.store.kind)
        self.rows = torch.arange(self.out_f, device=W.device)
        self.scale = p.scale.view(self.out_f, self.per_row)
        if p.zero is not None:
            self.zero = p.zero.view(self.out_f, self.per_row)

    def round(self, col: int, w: torch.Tensor) -> torch.Tensor:
        """Column ``col`` ``(out,)`` as it will read back."""
        if not self.store.kind.quantized:
            return round_values(w, self.store.kind, self.dtype).to(w)
        j = col // self.g
        p = QParams(self.scale[:, j], self.zero[:, j])
        codes = quantize_codes(w, self.rows, p, self.store.kind)
        return dequantize_codes(codes, self.rows, p, self.store.kind).to(w)

    def params(self, blocks: torch.Tensor | None = None) -> QParams | None:
        """The parameters in stored order (row-major over rows × groups; ``blocks`` bool ``(out, in/g)``: only
        the kept 1×g blocks'). None for float storages."""
        if not self.store.kind.quantized:
            return None
        sel = (lambda t: t.reshape(-1)) if blocks is None else (lambda t: t[blocks.to(t.device)])
        return QParams(sel(self.scale), sel(self.zero) if self.store.kind is CoefStorage.INT4 else None)
