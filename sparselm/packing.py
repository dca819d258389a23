"""Bit packing and value codecs for compressed storage: bitmasks, N:M indices, 14-bit bf16, int8 rows.

Everything here is exact and reversible (up to the codec's rounding, applied once at compression):
``unpack(pack(x)) == x``. Bits are packed little-endian within each byte.
"""
from __future__ import annotations

import math

import torch

from .config import CoefStorage

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
    """Bits per stored value (int8 adds a per-row scale, counted by the caller)."""
    return {CoefStorage.DTYPE: torch.finfo(dtype).bits, CoefStorage.BF16: 16, CoefStorage.FP16: 16,
            CoefStorage.BF16_14BIT: 14, CoefStorage.INT8: 8}[storage]


def round_values(values: torch.Tensor, storage: CoefStorage, dtype: torch.dtype,
                 rows: torch.Tensor | None = None) -> torch.Tensor:
    """The values as they will read back after `encode_values` (same shape, float32)."""
    enc = encode_values(values, storage, dtype, rows)
    return decode_values(enc, storage, values.numel(), rows).to(torch.float32)


VALUE_BUFFER = {CoefStorage.DTYPE: "values", CoefStorage.BF16: "values", CoefStorage.FP16: "values",
                CoefStorage.BF16_14BIT: "values14", CoefStorage.INT8: "values_int8"}  # storage -> its buffer
SCALE_BUFFER = "scale"  # int8 only: one fp16 scale per row


def value_count(buffer: torch.Tensor, storage: CoefStorage) -> int:
    """How many values the packed ``buffer`` of ``storage`` holds (from its length; nothing is unpacked)."""
    if storage is CoefStorage.BF16_14BIT:
        return buffer.numel() * 8 // 14  # ceil(14n/8) bytes determine n uniquely
    return buffer.numel()


def encode_values(values: torch.Tensor, storage: CoefStorage, dtype: torch.dtype,
                  rows: torch.Tensor | None = None, n_rows: int | None = None) -> dict[str, torch.Tensor]:
    """Encode flat ``values``; ``rows`` (same length) gives each value's row for int8 per-row scales, and
    ``n_rows`` how many scales to store (default: up to the last row that has a value)."""
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
    if storage is CoefStorage.INT8:
        assert rows is not None, "int8 storage needs the row of each value"
        if n_rows is None:
            n_rows = int(rows.max()) + 1 if rows.numel() else 0
        absmax = torch.zeros(n_rows, dtype=torch.float32, device=values.device)
        absmax.scatter_reduce_(0, rows, values.abs().float(), reduce="amax")
        # floor at fp16's smallest subnormal 2^-24: a float32 floor rounds to a zero fp16 scale
        scale = (absmax / 127).clamp_min(2 ** -24).to(torch.float16).float()
        q = torch.round(values.float() / scale[rows]).clamp(-127, 127).to(torch.int8)
        return {"values_int8": q, SCALE_BUFFER: scale.to(torch.float16)}
    raise ValueError(storage)


def decode_values(enc: dict[str, torch.Tensor], storage: CoefStorage, count: int,
                  rows: torch.Tensor | None = None) -> torch.Tensor:
    """Inverse of `encode_values` for ``storage`` (``enc``: its buffers by name, as `encode_values` wrote them)."""
    packed = enc[VALUE_BUFFER[storage]]
    if storage is CoefStorage.BF16_14BIT:
        v = unpack_bits(packed, 14, count).to(torch.int32)  # (count,)
        raw = ((v & 0x2000) << 2) | ((v & 0x1FFF) << 2)
        return raw.to(torch.int16).view(torch.bfloat16) if raw.numel() else raw.to(torch.bfloat16)
    if storage is CoefStorage.INT8:
        return packed.float() * enc[SCALE_BUFFER].float()[rows]
    return packed
