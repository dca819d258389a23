"""Bit packing and value codecs for compressed storage: bitmasks, N:M indices, 14-bit bf16, int8 / int4 with
per-row or per-group scales (int4: + zero points).

Everything here is exact and reversible (up to the codec's rounding, applied once at compression):
``unpack(pack(x)) == x``. Bits are packed little-endian within each byte.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .config import CoefStorage
from .errors import InputError

_BIT_WEIGHTS = 1 << torch.arange(8, dtype=torch.int32)  # (8,)


def pack_bits(values: torch.Tensor, nbits: int) -> torch.Tensor:
    """Pack non-negative ints ``< 2**nbits`` (any shape, flattened) into a uint8 tensor of ceil(N·nbits/8)."""
    v = values.reshape(-1).to(torch.int32)
    bits = (v.unsqueeze(1) >> torch.arange(nbits, dtype=torch.int32, device=v.device)) & 1  # (N, nbits)
    bits = bits.reshape(-1)
    pad = (-bits.numel()) % 8
    if pad:
        bits = torch.cat([bits, bits.new_zeros(pad)])
    return (bits.view(-1, 8) * _BIT_WEIGHTS.to(v.device)).sum(1).to(torch.uint8)  # (ceil(N*nbits/8),)


def unpack_bits(packed: torch.Tensor, nbits: int, count: int) -> torch.Tensor:
    """Inverse of `pack_bits`: the first ``count`` ints, as int64 ``(count,)``."""
    bits = (packed.to(torch.int32).unsqueeze(1) >> torch.arange(8, dtype=torch.int32, device=packed.device)) & 1
    bits = bits.reshape(-1)[: count * nbits].view(count, nbits)  # (count, nbits)
    return (bits.to(torch.int64) << torch.arange(nbits, device=packed.device)).sum(1)


def index_bits(m: int) -> int:
    """Bits needed for a position inside a group of ``m``."""
    return max(1, math.ceil(math.log2(m)))


# --- value codecs -----------------------------------------------------------------------------------
def value_bits(storage: CoefStorage, dtype: torch.dtype) -> float:
    """Bits per stored value (int8/int4 add per-group parameters: `param_bits`)."""
    return {CoefStorage.DTYPE: torch.finfo(dtype).bits, CoefStorage.BF16: 16, CoefStorage.FP16: 16,
            CoefStorage.BF16_14BIT: 14, CoefStorage.INT8: 8, CoefStorage.INT4: 4}[storage]


SCALE_BITS = 16  # int8/int4: one fp16 scale per group
ZERO_BITS = 4    # int4: one 4-bit zero point per group
INT4_MAX = 15    # int4 codes 0..15, value = (code - zero) * scale
INT8_MAX = 127   # int8 codes -127..127, value = code * scale
FP16_MAX = 65504.0


def groups_per_row(cols: int, group: int) -> int:
    """Quantization groups in one row of ``cols`` inputs (``group`` 0: the whole row is one group)."""
    return 1 if group == 0 else -(-cols // group)


def group_ids(rows: torch.Tensor, cols: torch.Tensor, n_cols: int, group: int) -> torch.Tensor:
    """The quantization group of each value at ``(rows, cols)`` of a matrix with ``n_cols`` columns:
    row-major, ``groups_per_row`` per row, groups of ``group`` consecutive columns."""
    if group == 0:
        return rows
    return rows * groups_per_row(n_cols, group) + torch.div(cols, group, rounding_mode="floor")


@dataclass
class QParams:
    """Per-group quantization parameters: ``scale`` fp16 ``(groups,)``, ``zero`` int64 ``(groups,)`` (int4)."""
    scale: torch.Tensor
    zero: torch.Tensor | None = None


def fit_params(values: torch.Tensor, groups: torch.Tensor, n_groups: int, storage: CoefStorage) -> QParams:
    """Round-to-nearest parameters of each group from its ``values`` (flat; ``groups`` gives each one's group).

    int8: symmetric, ``scale = absmax/127``. int4: asymmetric over ``[min(v, 0), max(v, 0)]`` (zero is always
    representable, as in GPTQ), ``scale = range/15``, integer zero point in 0..15. Scales are fp16, floored at its
    smallest subnormal; a group whose scale would exceed fp16's range is an `InputError` (never an inf scale)."""
    v = values.detach().float()
    if storage is CoefStorage.INT8:
        absmax = v.new_zeros(n_groups).scatter_reduce_(0, groups, v.abs(), reduce="amax")
        scale = absmax / INT8_MAX
        zero = None
    else:
        lo = v.new_zeros(n_groups).scatter_reduce_(0, groups, v, reduce="amin")  # includes 0
        hi = v.new_zeros(n_groups).scatter_reduce_(0, groups, v, reduce="amax")
        scale = (hi - lo) / INT4_MAX
    if scale.numel() and float(scale.max()) > FP16_MAX:
        worst = float(scale.max()) * (INT8_MAX if storage is CoefStorage.INT8 else INT4_MAX)
        raise InputError(f"{storage.value} storage: a group spans {worst:.4g}, beyond what an fp16 scale covers "
                         f"({FP16_MAX * (INT8_MAX if storage is CoefStorage.INT8 else INT4_MAX):.4g})",
                         "store these values in the model dtype (storage: dtype) or rescale the checkpoint")
    # floor at fp16's smallest subnormal 2^-24: a float32 floor rounds to a zero fp16 scale
    scale = scale.clamp_min(2 ** -24).to(torch.float16)
    if storage is CoefStorage.INT4:
        zero = torch.round(-lo / scale.float()).clamp(0, INT4_MAX).to(torch.int64)
    return QParams(scale, zero)


def quantize_codes(values: torch.Tensor, groups: torch.Tensor, params: QParams, storage: CoefStorage) -> torch.Tensor:
    """Integer codes (int64) of ``values`` under ``params``."""
    s = params.scale.float()[groups]
    if storage is CoefStorage.INT8:
        return torch.round(values.float() / s).clamp(-INT8_MAX, INT8_MAX).to(torch.int64)
    return torch.round(values.float() / s + params.zero[groups]).clamp(0, INT4_MAX).to(torch.int64)


def dequantize_codes(codes: torch.Tensor, groups: torch.Tensor, params: QParams, storage: CoefStorage) -> torch.Tensor:
    """The float32 values codes read back as."""
    s = params.scale.float()[groups]
    if storage is CoefStorage.INT8:
        return codes.float() * s
    return (codes - params.zero[groups]).float() * s


def round_values(values: torch.Tensor, storage: CoefStorage, dtype: torch.dtype,
                 groups: torch.Tensor | None = None, n_groups: int | None = None,
                 params: QParams | None = None) -> torch.Tensor:
    """The values as they will read back after `encode_values` (same shape, float32)."""
    enc = encode_values(values, storage, dtype, groups, n_groups, params)
    return decode_values(enc, storage, values.numel(), groups).to(torch.float32)


VALUE_BUFFER = {CoefStorage.DTYPE: "values", CoefStorage.BF16: "values", CoefStorage.FP16: "values",
                CoefStorage.BF16_14BIT: "values14", CoefStorage.INT8: "values_int8",
                CoefStorage.INT4: "values_int4"}  # storage -> its buffer
SCALE_BUFFER = "scale"  # int8/int4: one fp16 scale per group
ZERO_BUFFER = "zero"    # int4: 4-bit zero points, packed


def value_count(buffer: torch.Tensor, storage: CoefStorage) -> int:
    """How many values the packed ``buffer`` of ``storage`` holds (from its length; nothing is unpacked).
    int4 packs two per byte: an odd count is recorded by the caller (``ceil(n/2)`` bytes do not determine n)."""
    if storage is CoefStorage.BF16_14BIT:
        return buffer.numel() * 8 // 14  # ceil(14n/8) bytes determine n uniquely
    if storage is CoefStorage.INT4:
        return buffer.numel() * 2
    return buffer.numel()


def encode_values(values: torch.Tensor, storage: CoefStorage, dtype: torch.dtype,
                  groups: torch.Tensor | None = None, n_groups: int | None = None,
                  params: QParams | None = None) -> dict[str, torch.Tensor]:
    """Encode flat ``values``. int8/int4: ``groups`` (same length) gives each value's quantization group,
    ``n_groups`` how many groups to store parameters for (default: up to the last group that has a value),
    ``params`` the parameters to use (a method that rounded the values itself, e.g. GPTQ); default: fitted."""
    if storage is CoefStorage.DTYPE:
        return {"values": values.to(dtype)}
    if storage in (CoefStorage.BF16, CoefStorage.FP16):
        return {"values": values.to(torch.bfloat16 if storage is CoefStorage.BF16 else torch.float16)}
    if storage is CoefStorage.BF16_14BIT:
        # round to nearest bf16 first, then to nearest multiple of 4 ulps (drop 2 mantissa bits)
        raw = values.to(torch.bfloat16).view(torch.int16).to(torch.int32) & 0xFFFF
        sign, mag = raw & 0x8000, raw & 0x7FFF
        mag = torch.clamp((mag + 2) >> 2, max=(0x7F7F >> 2))  # (N,) 13 bits of magnitude, no inf/nan
        return {"values14": pack_bits((sign >> 2) | mag, 14)}
    assert groups is not None, f"{storage.value} storage needs the group of each value"
    if n_groups is None:
        n_groups = int(groups.max()) + 1 if groups.numel() else 0
    if params is None:
        params = fit_params(values, groups, n_groups, storage)
    codes = quantize_codes(values, groups, params, storage)
    if storage is CoefStorage.INT8:
        return {"values_int8": codes.to(torch.int8), SCALE_BUFFER: params.scale}
    return {"values_int4": pack_bits(codes, 4), SCALE_BUFFER: params.scale, ZERO_BUFFER: pack_bits(params.zero, 4)}


def decode_values(enc: dict[str, torch.Tensor], storage: CoefStorage, count: int,
                  groups: torch.Tensor | None = None) -> torch.Tensor:
    """Inverse of `encode_values` for ``storage`` (``enc``: its buffers by name, as `encode_values` wrote them)."""
    packed = enc[VALUE_BUFFER[storage]]
    if storage is CoefStorage.BF16_14BIT:
        v = unpack_bits(packed, 14, count).to(torch.int32)  # (count,)
        raw = ((v & 0x2000) << 2) | ((v & 0x1FFF) << 2)
        return raw.to(torch.int16).view(torch.bfloat16) if raw.numel() else raw.to(torch.bfloat16)
    if storage is CoefStorage.INT8:
        return packed.float() * enc[SCALE_BUFFER].float()[groups]
    if storage is CoefStorage.INT4:
        scale = enc[SCALE_BUFFER]
        params = QParams(scale, unpack_bits(enc[ZERO_BUFFER], 4, scale.numel()))
        return dequantize_codes(unpack_bits(packed, 4, count), groups, params, storage)
    return packed


# --- matrices: which group each stored value belongs to ------------------------------------------------
def masked_groups(mask: torch.Tensor, group: int) -> tuple[torch.Tensor, int]:
    """Groups of the kept entries of ``mask`` ``(rows, cols)`` in row-major order (the stored order), and the
    number of groups (``rows·groups_per_row``: every group has parameters, kept values or not)."""
    rows, cols = mask.shape
    pos = mask.nonzero()  # (nnz, 2)
    return group_ids(pos[:, 0], pos[:, 1], cols, group), rows * groups_per_row(cols, group)


def block_groups(blocks: torch.Tensor, group: int) -> tuple[torch.Tensor, int]:
    """1×g blocks: ``blocks`` bool ``(rows, cols/g)`` of kept blocks; each kept block is one group (row-major),
    its ``g`` values stored together. Returns the group of each stored value and the number of kept blocks."""
    kept = int(blocks.sum())
    return torch.arange(kept, device=blocks.device).repeat_interleave(group), kept


def round_grouped(values: torch.Tensor, groups: torch.Tensor, n_groups: int, storage: CoefStorage,
                  dtype: torch.dtype, params: QParams | None = None) -> tuple[torch.Tensor, QParams | None]:
    """Flat ``values`` as they read back, and the parameters used (fitted unless given; None for float storages)."""
    if storage.quantized and params is None:
        params = fit_params(values, groups, n_groups, storage)
    return round_values(values, storage, dtype, groups, n_groups, params), params
