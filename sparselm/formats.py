"""Stored size of each compressed format, from its shapes alone: one formula per format.

The bottom layer for sizes: `modules` (a built layer counts its own bytes), `methods` (sizing a
factorization to a byte budget before building anything) and `profile` (knapsack options) all call these,
so the bytes a method aims at, the bytes a profile promises and the bytes `io.save` writes are the same
number. Bias bytes are never included (they are the same for every option of a layer).

One value-storage rule for every format (`config.Storage`): values are stored in the model dtype unless the
spec asks for bf16 / fp16 / 14-bit bf16 / int8 / int4; int8 and int4 add one fp16 scale (int4: + one 4-bit zero
point) per row, or per group of ``group`` consecutive inputs of a row (`value_bytes`). Every matrix is
quantized along the input dimension of the product it takes part in: pruned ``W`` ``(out, in)`` along ``in``,
coefficients ``Sᵀ`` ``(out, k)`` along ``k``, low-rank ``Uᵀ`` ``(r, in)`` along ``in`` and ``Vᵀ`` ``(out, r)``
along ``r``. Dictionaries ``D`` ``(in, k)`` follow their own storage (CoSpaDi's ``dict_storage``, model dtype by
default): ``Dᵀ`` ``(k, in)`` quantized along ``in``, one scale per atom or per ``group`` inputs of an atom.

  * `sparse_bytes`      `SparseLinear`:     values + 1-bit mask over ``out·in``; N:M: values ``(out, in·n/m)`` +
                                            ``ceil(log2 m)``-bit positions; 1×g blocks (GQSA): a 1-bit mask over
                                            the ``out·in/g`` blocks (none when every block is kept) + the kept
                                            blocks' values, one scale (+ zero) per kept block.
  * `lowrank_bytes`     `LowRankLinear`:    ``U`` ``(in, r)`` + ``V`` ``(r, out)``.
  * `narrow_bytes`      a structurally pruned plain ``nn.Linear`` ``(out', in')`` in the model dtype, plus the
                                            bias structured pruning *added* (FLAP's compensation): unlike a
                                            model's own bias, it is storage the method spends.
  * `dict_bytes`        `SparseDictLinear`: ``D`` ``(in, k)`` in its storage (`dictionary_bytes`) + the
                                            coefficients (`coefficient_bytes`): a 1-bit mask over ``out·k``
                                            and the values.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch

from .config import CoefStorage, Pattern, Storage
from .packing import SCALE_BITS, ZERO_BITS, groups_per_row, index_bits, value_bits

MASK_BITS = 1      # one bit per position of a bitmask
MODEL_DTYPE = Storage()


def dtype_bytes(dtype: torch.dtype) -> int:
    return torch.finfo(dtype).bits // 8


def dense_bytes(out_f: int, in_f: int, dtype: torch.dtype) -> int:
    """The dense weight ``(out, in)`` in ``dtype``: what every ratio is measured against."""
    return out_f * in_f * dtype_bytes(dtype)


def value_bytes(count: int, n_groups: int, store: Storage, dtype: torch.dtype) -> int:
    """``count`` values in ``store`` (each packed buffer rounded up to a byte) + the parameters of
    ``n_groups`` quantization groups (int8: fp16 scales; int4: fp16 scales + 4-bit zero points)."""
    store = Storage.of(store)
    values = math.ceil(count * value_bits(store.kind, dtype) / 8)
    if not store.kind.quantized:
        return values
    zeros = math.ceil(n_groups * ZERO_BITS / 8) if store.kind is CoefStorage.INT4 else 0
    return values + n_groups * SCALE_BITS // 8 + zeros


def matrix_groups(rows: int, cols: int, store: Storage) -> int:
    """Quantization groups of a ``(rows, cols)`` matrix quantized along ``cols``."""
    return rows * groups_per_row(cols, Storage.of(store).group)


# --- SparseLinear ----------------------------------------------------------------------------------
def sparse_bytes(out_f: int, in_f: int, nnz: int, dtype: torch.dtype, pattern: Pattern | None = None,
                 store: Storage = MODEL_DTYPE) -> int:
    """Stored bytes of a pruned ``(out, in)`` weight keeping ``nnz`` values (N:M: ``nnz = out·in·n/m``)."""
    values = value_bytes(nnz, matrix_groups(out_f, in_f, store), store, dtype)
    if pattern is None:
        return math.ceil(out_f * in_f * MASK_BITS / 8) + values
    return values + math.ceil(nnz * index_bits(pattern.m) / 8)


def block_sparse_bytes(out_f: int, in_f: int, kept_blocks: int, dtype: torch.dtype, store: Storage) -> int:
    """1×g group-structured sparsity (GQSA, ``g = store.group`` dividing ``in``): a bitmask over the blocks
    (omitted when all are kept: plain group quantization), ``g`` values and one group's parameters per kept block."""
    g = Storage.of(store).group
    blocks = out_f * in_f // g
    mask = 0 if kept_blocks == blocks else math.ceil(blocks * MASK_BITS / 8)
    return mask + value_bytes(kept_blocks * g, kept_blocks, store, dtype)


def most_kept(ratio: float, out_f: int, in_f: int, dtype: torch.dtype, store: Storage = MODEL_DTYPE,
              per_row: bool = False) -> int | None:
    """The inverse of unstructured `sparse_bytes`: most values kept (per row when ``per_row``, the same count in
    every row; else over the whole layer) with the stored bytes ``≤ (1 − ratio)`` of dense. None: not even an
    empty layer (the mask and scales alone) fits."""
    budget = (1 - ratio) * dense_bytes(out_f, in_f, dtype)
    rows = out_f if per_row else 1

    def fits(n: int) -> bool:
        return sparse_bytes(out_f, in_f, rows * n, dtype, None, store) <= budget

    if not fits(0):
        return None
    return largest(fits, in_f if per_row else out_f * in_f)


def most_kept_blocks(ratio: float, out_f: int, in_f: int, dtype: torch.dtype, store: Storage) -> int | None:
    """The inverse of `block_sparse_bytes`: most 1×g blocks kept within ``(1 − ratio)`` of dense (None: none fits)."""
    budget = (1 - ratio) * dense_bytes(out_f, in_f, dtype)
    blocks = out_f * in_f // Storage.of(store).group
    if block_sparse_bytes(out_f, in_f, blocks, dtype, store) <= budget:
        return blocks
    fits = lambda n: block_sparse_bytes(out_f, in_f, n, dtype, store) <= budget  # noqa: E731
    return largest(fits, blocks - 1) if fits(0) else None


# --- narrower dense nn.Linear (structured pruning) ------------------------------------------------
def narrow_bytes(out_f: int, in_f: int, dtype: torch.dtype, bias_added: bool = False) -> int:
    """A kept ``(out, in)`` dense weight, and the ``out`` bias values when the method added the bias."""
    return (out_f * in_f + (out_f if bias_added else 0)) * dtype_bytes(dtype)


# --- LowRankLinear ---------------------------------------------------------------------------------
def lowrank_bytes(in_f: int, out_f: int, rank: int, dtype: torch.dtype, store: Storage = MODEL_DTYPE) -> int:
    """``Uᵀ`` ``(r, in)`` and ``Vᵀ`` ``(out, r)``, each quantized along its input dimension."""
    return (value_bytes(in_f * rank, matrix_groups(rank, in_f, store), store, dtype)
            + value_bytes(rank * out_f, matrix_groups(out_f, rank, store), store, dtype))


def rank_for_ratio(ratio: float, in_f: int, out_f: int, dtype: torch.dtype = torch.float16,
                   store: Storage = MODEL_DTYPE) -> int:
    """The inverse of `lowrank_bytes`: the largest rank ``≤ min(in, out)`` whose factors are ``≤ 1 − ratio`` of
    dense; 0 when not even rank 1 fits (the caller refuses the ratio)."""
    budget = (1 - ratio) * dense_bytes(out_f, in_f, dtype)
    return largest(lambda r: lowrank_bytes(in_f, out_f, r, dtype, store) <= budget, min(in_f, out_f))


# --- SparseDictLinear ------------------------------------------------------------------------------
def dictionary_bytes(in_f: int, k: int, dtype: torch.dtype, store: Storage = MODEL_DTYPE) -> int:
    """Dense ``D`` ``(in, k)`` stored as ``Dᵀ`` rows (one per atom) in ``store``, quantized along ``in``."""
    return value_bytes(in_f * k, matrix_groups(k, in_f, store), store, dtype)


def coefficient_bytes(out_f: int, k: int, nnz: int, store: Storage, dtype: torch.dtype) -> int:
    """Column-sparse ``S`` ``(k, out)``: bitmask of ``Sᵀ``, ``nnz`` packed values, their groups' parameters."""
    return math.ceil(out_f * k * MASK_BITS / 8) + value_bytes(nnz, matrix_groups(out_f, k, store), store, dtype)


def dict_bytes(in_f: int, out_f: int, k: int, nnz: int, store: Storage, dtype: torch.dtype,
               dict_store: Storage = MODEL_DTYPE) -> int:
    """One `SparseDictLinear` with its own dictionary (``D`` in ``dict_store``, coefficients in ``store``)."""
    return dictionary_bytes(in_f, k, dtype, dict_store) + coefficient_bytes(out_f, k, nnz, store, dtype)


def group_dict_bytes(in_f: int, outs: Sequence[int], k: int, nnz: Sequence[int], store: Storage,
                     dtype: torch.dtype, dict_store: Storage = MODEL_DTYPE) -> int:
    """Layers sharing one dictionary ``(in, k)``: ``D`` once, each layer's coefficients."""
    return dictionary_bytes(in_f, k, dtype, dict_store) + sum(coefficient_bytes(o, k, n, store, dtype)
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
