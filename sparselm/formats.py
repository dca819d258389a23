"""Stored size of each compressed format, from its shapes alone: one formula per format.

The bottom layer for sizes: `modules` (a built layer counts its own bytes), `methods` (sizing a
factorization to a byte budget before building anything) and `profile` (knapsack options) all call these,
so the bytes a method aims at, the bytes a profile promises and the bytes `io.save` writes are the same
number. Bias bytes are never included (they are the same for every option of a layer).

  * `sparse_bytes`      `SparseLinear`:     values in the model dtype + 1-bit mask over ``out·in``,
                                            or N:M: values ``(out, in·n/m)`` + ``ceil(log2 m)``-bit positions.
  * `lowrank_bytes`     `LowRankLinear`:    ``U`` ``(in, r)`` + ``V`` ``(r, out)`` in the model dtype.
  * `narrow_bytes`      a structurally pruned plain ``nn.Linear`` ``(out', in')`` in the model dtype, plus the
                                            bias structured pruning *added* (FLAP's compensation): unlike a
                                            model's own bias, it is storage the method spends.
  * `dict_bytes`        `SparseDictLinear`: ``D`` ``(in, k)`` in the model dtype (`dictionary_bytes`) + the
                                            coefficients (`coefficient_bytes`): a 1-bit mask over ``out·k``,
                                            the values at ``value_bits(storage)``, fp16 per-output scales (int8).
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch

from .config import CoefStorage, Pattern
from .packing import index_bits, value_bits

MASK_BITS = 1      # one bit per position of a bitmask
SCALE_BYTES = 2    # int8 values: one fp16 scale per output channel


def dtype_bytes(dtype: torch.dtype) -> int:
    return torch.finfo(dtype).bits // 8


def dense_bytes(out_f: int, in_f: int, dtype: torch.dtype) -> int:
    """The dense weight ``(out, in)`` in ``dtype``: what every ratio is measured against."""
    return out_f * in_f * dtype_bytes(dtype)


# --- SparseLinear ----------------------------------------------------------------------------------
def sparse_bytes(out_f: int, in_f: int, nnz: int, dtype: torch.dtype, pattern: Pattern | None = None) -> int:
    """Stored bytes of a pruned ``(out, in)`` weight keeping ``nnz`` values (N:M: ``nnz = out·in·n/m``)."""
    if pattern is None:
        return math.ceil(out_f * in_f * MASK_BITS / 8) + nnz * dtype_bytes(dtype)
    return nnz * dtype_bytes(dtype) + math.ceil(nnz * index_bits(pattern.m) / 8)


def density_for_ratio(ratio: float, dtype: torch.dtype) -> float:
    """The inverse of unstructured `sparse_bytes`: fraction of weights kept so that values + mask are
    ``1 − ratio`` of the dense bytes (the mask costs ``1/bits`` of a value per position)."""
    density = (1 - ratio) - MASK_BITS / torch.finfo(dtype).bits
    if density <= 0:
        raise ValueError(f"ratio {ratio} leaves no room for values beside the bitmask")
    return density


# --- narrower dense nn.Linear (structured pruning) ------------------------------------------------
def narrow_bytes(out_f: int, in_f: int, dtype: torch.dtype, bias_added: bool = False) -> int:
    """A kept ``(out, in)`` dense weight, and the ``out`` bias values when the method added the bias."""
    return (out_f * in_f + (out_f if bias_added else 0)) * dtype_bytes(dtype)


# --- LowRankLinear ---------------------------------------------------------------------------------
def lowrank_bytes(in_f: int, out_f: int, rank: int, dtype: torch.dtype) -> int:
    return (in_f + out_f) * rank * dtype_bytes(dtype)


def rank_for_ratio(ratio: float, in_f: int, out_f: int) -> int:
    """The inverse of `lowrank_bytes`: the largest rank whose factors are ``≤ 1 − ratio`` of dense (≥ 1)."""
    return max(1, int((1 - ratio) * in_f * out_f / (in_f + out_f)))


# --- SparseDictLinear ------------------------------------------------------------------------------
def dictionary_bytes(in_f: int, k: int, dtype: torch.dtype) -> int:
    return in_f * k * dtype_bytes(dtype)


def coefficient_bytes(out_f: int, k: int, nnz: int, storage: CoefStorage, dtype: torch.dtype) -> int:
    """Column-sparse ``S`` ``(k, out)``: bitmask of ``Sᵀ``, ``nnz`` packed values, int8 scales."""
    values = math.ceil(nnz * value_bits(storage, dtype) / 8)
    scales = SCALE_BYTES * out_f if storage is CoefStorage.INT8 else 0
    return math.ceil(out_f * k * MASK_BITS / 8) + values + scales


def dict_bytes(in_f: int, out_f: int, k: int, nnz: int, storage: CoefStorage, dtype: torch.dtype) -> int:
    """One `SparseDictLinear` with its own dictionary."""
    return dictionary_bytes(in_f, k, dtype) + coefficient_bytes(out_f, k, nnz, storage, dtype)


def group_dict_bytes(in_f: int, outs: Sequence[int], k: int, nnz: Sequence[int], storage: CoefStorage,
                     dtype: torch.dtype) -> int:
    """Layers sharing one dictionary ``(in, k)``: ``D`` once, each layer's coefficients."""
    return dictionary_bytes(in_f, k, dtype) + sum(coefficient_bytes(o, k, n, storage, dtype)
                                                  for o, n in zip(outs, nnz))


# --- inverting a formula -----------------------------------------------------------------------------
def largest(fits: Callable[[int], bool], hi: int) -> int:
    """Largest ``k`` in ``0..hi`` with ``fits(k)``, for ``fits`` true up to some ``k`` and false after
    (a size formula under a byte budget); 0 when even ``fits(1)`` fails."""
    lo, hi = 0, hi + 1  # fits(lo) (by convention for 0), not fits(hi)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo
