"""Bitmask-packed matrices: the runtime form and its products ``Y = X Mᵀ``.

The saved formats (`sparselm.packing`): a packed bitmask of M ``(rows, cols)`` (bit ``r·cols + c``,
little-endian within bytes) + the nonzero values in row-major order, as bf16/fp16/fp32 ``values``,
14-bit packed bf16 ``values14``, ``values_int8`` × a per-row ``scale``, or grouped int8 / int4 (``values_int4``,
``(code - zero)·scale``) with an fp16 ``scale`` (+ packed 4-bit ``zero``) per ``group`` columns of a row. N:M weights (values
``(rows, cols·n/m)`` + packed in-group positions) become the same form at load: 2:4 costs the same bits.

`Masked` holds the saved tensors themselves (no copy) plus the popcount prefix ``offsets`` (8 B per row),
the bitmask built from N:M indices (1 bit per weight) and a float32 copy of an int8 scale.

Three ways to compute the product, all exact up to float rounding:
  * ``gemv``  C++ (AVX-512 expand-load + VDPBF16PS/FMA with software prefetch, AVX2 table-driven spreads + FMA,
    or scalar): reads the compressed bytes once, rows split over the threads; for few tokens.
  * ``panel`` C++: each thread unpacks cache-sized row panels into its own reused scratch buffer and runs a
    single-threaded dense GEMM on each (one parallel region per call); the unpack (AVX-512, AVX2 or scalar)
    gives the same values bit for bit on every path.
  The C++ path is the best the CPU has under ``SPARSELM_ISA`` (`_build.isa`; `_build.gemv_level` names it).
  * ``torch`` panels unpacked with torch ops, one GEMM each: the fallback when the extension cannot be built.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from . import _build

KIND = {torch.bfloat16: 0, torch.float16: 1, torch.float32: 2}
INT8, P14, INT8G, INT4 = 3, 4, 5, 6
_BITS = (1 << torch.arange(8, dtype=torch.int16))  # (8,)
_ROWS_PER_STEP = 1 << 22  # bits handled at once by the torch helpers (bounds their temporaries)


@dataclass
class Masked:
    rows: int
    cols: int
    mask: torch.Tensor     # uint8 (ceil(rows*cols/8),)
    offsets: torch.Tensor  # int64 (rows+1,): index of each row's first value
    values: torch.Tensor   # flat: bf16/fp16/fp32, int8, or uint8 (14-bit packed)
    kind: int
    scale: torch.Tensor | None = None  # float32 (rows,) for int8; the saved fp16 (groups,) for INT8G / INT4
    owned: int = 0         # bytes this form adds beside the saved buffers
    zero: torch.Tensor | None = None   # INT4: the saved packed 4-bit zero points, one per group
    group: int = 0         # INT8G / INT4: columns per quantization group (0: one group per row)
    block: int = 0         # 1×block blocks (`from_blocks`): one mask bit per block, one group per kept block

    def __post_init__(self):
        self.owned += self.offsets.numel() * 8 + (self.scale.numel() * 4 if self.kind == INT8 else 0)
        # the C++ products' matrix arguments, read once here: at decode each attribute read of a forward costs
        # time (cold after the previous layer's product, docs/benchmarks/README.md, session 20)
        self.args = (self.mask, self.offsets, self.values, self.kind, self.scale, self.zero, self.group)

    @property
    def shape(self) -> tuple[int, int]:  # as a dense factor's (`kernels.lowrank_linear` takes either)
        return self.rows, self.cols

    @property
    def full(self) -> bool:
        """No mask: every entry is kept (`from_dense`)."""
        return self.mask.numel() == 0


def _bits(mask: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """Bits ``start..stop-1`` of a packed mask as uint8 0/1 ``(stop-start,)``."""
    b0, b1 = start // 8, -(-stop // 8)
    bits = (mask[b0:b1].to(torch.int16).unsqueeze(1) >> torch.arange(8, dtype=torch.int16)) & 1
    return bits.reshape(-1)[start - 8 * b0: stop - 8 * b0].to(torch.uint8)


def row_counts(mask: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """Set bits per row of a packed ``(rows, cols)`` mask, int64 ``(rows,)``."""
    step = max(1, _ROWS_PER_STEP // max(cols, 1))
    parts = [_bits(mask, r * cols, min(rows, r + step) * cols).view(-1, cols).sum(1)
             for r in range(0, rows, step)]
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.int64)


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """A bool tensor (flattened) packed as `packing.pack_bits(mask, 1)` does, without its int32 temporaries."""
    flat = mask.reshape(-1)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    groups = flat.view(-1, 8)
    out = torch.empty(groups.shape[0], dtype=torch.uint8)
    step = _ROWS_PER_STEP // 8
    for i in range(0, groups.shape[0], step):
        out[i:i + step] = (groups[i:i + step].to(torch.int16) * _BITS).sum(1).to(torch.uint8)
    return out


def _value_form(buffers: dict[str, torch.Tensor], group: int) -> dict:
    """The `Masked` fields for the saved values (values|values14|values_int8|values_int4, scale, zero)."""
    if "values14" in buffers:
        return {"values": buffers["values14"], "kind": P14}
    if "values_int4" in buffers:
        return {"values": buffers["values_int4"], "kind": INT4, "scale": buffers["scale"], "zero": buffers["zero"],
                "group": group}
    if "values_int8" in buffers and group:
        return {"values": buffers["values_int8"], "kind": INT8G, "scale": buffers["scale"], "group": group}
    if "values_int8" in buffers:
        return {"values": buffers["values_int8"], "kind": INT8, "scale": buffers["scale"].float()}
    return {"values": buffers["values"].reshape(-1), "kind": KIND[buffers["values"].dtype]}


def _row_starts(counts: torch.Tensor) -> torch.Tensor:
    """``offsets`` (rows+1,) int64 from the values stored per row."""
    offsets = torch.zeros(counts.numel() + 1, dtype=torch.int64)
    torch.cumsum(counts, 0, out=offsets[1:])
    return offsets


def from_bitmask(buffers: dict[str, torch.Tensor], rows: int, cols: int, group: int = 0) -> Masked:
    """The runtime form of a saved mask + values (keys as in `modules`: mask, values|values14|values_int8|
    values_int4, scale, zero); ``group``: int8/int4's quantization group along a row (0: per row)."""
    mask = buffers["mask"]
    return Masked(rows, cols, mask, _row_starts(row_counts(mask, rows, cols)), **_value_form(buffers, group))


def from_dense(buffers: dict[str, torch.Tensor], rows: int, cols: int, group: int = 0) -> Masked:
    """A dense ``(rows, cols)`` factor in an encoded storage (`modules.encode_dense`: values|values14|values_int8|
    values_int4, scale, zero, every entry stored in row-major order) as a form with an empty mask (all kept): the
    kernels then read its bytes as they are, with no mask bits beside them."""
    offsets = torch.arange(rows + 1, dtype=torch.int64) * cols
    return Masked(rows, cols, torch.empty(0, dtype=torch.uint8), offsets, **_value_form(buffers, group))


def from_blocks(buffers: dict[str, torch.Tensor], rows: int, cols: int, block: int) -> Masked:
    """GQSA's 1×``block`` blocks: ``mask`` packed over the ``(rows, cols/block)`` blocks, the kept blocks' values
    whole in row-major order, one scale (+ zero) per kept block (keys as in `from_bitmask`). The kernels read the
    block bits as the mask of every column in the block, and count kept blocks for each block's parameters."""
    mask = buffers["mask"]
    offsets = _row_starts(row_counts(mask, rows, cols // block) * block)
    return Masked(rows, cols, mask, offsets, **_value_form(buffers, block), block=block)


def from_nm(buffers: dict[str, torch.Tensor], positions: torch.Tensor, n: int, m: int, group: int = 0) -> Masked:
    """N:M weights (their values as in `from_bitmask`, in row-major order; in-group positions
    ``(rows, cols/m, n)``) as a bitmask form."""
    rows, groups = positions.shape[0], positions.shape[1]
    bool_mask = torch.zeros(rows, groups, m, dtype=torch.bool).scatter_(2, positions, True)
    mask = pack_mask(bool_mask)
    offsets = torch.arange(rows + 1, dtype=torch.int64) * (groups * n)
    return Masked(rows, groups * m, mask, offsets, **_value_form(buffers, group), owned=mask.numel())


# --- torch helpers: one panel of dense rows ------------------------------------------------------------
def _values14(packed: torch.Tensor, start: int, count: int) -> torch.Tensor:
    bits = _bits(packed, 14 * start, 14 * (start + count)).view(count, 14).to(torch.int32)
    raw = (bits << torch.arange(14, dtype=torch.int32)).sum(1) << 2  # bf16 bit pattern
    return raw.to(torch.int16).view(torch.bfloat16)


def _nibbles(packed: torch.Tensor, start: int, count: int) -> torch.Tensor:
    """4-bit codes ``start..start+count-1`` (low nibble first) as int64."""
    b = packed[start // 2: -(-(start + count) // 2)].to(torch.int64)
    return torch.stack([b & 15, b >> 4], 1).reshape(-1)[start % 2: start % 2 + count]


def panel_torch(mm: Masked, r0: int, r1: int, dtype: torch.dtype) -> torch.Tensor:
    """Dense rows ``r0..r1-1`` of M in ``dtype`` (pure torch)."""
    if mm.full:
        keep = torch.ones(r1 - r0, mm.cols, dtype=torch.bool)
    elif mm.block:
        bpr = mm.cols // mm.block
        keep = _bits(mm.mask, r0 * bpr, r1 * bpr).view(r1 - r0, bpr).bool().repeat_interleave(mm.block, 1)
    else:
        keep = _bits(mm.mask, r0 * mm.cols, r1 * mm.cols).view(r1 - r0, mm.cols).bool()
    i0, i1 = int(mm.offsets[r0]), int(mm.offsets[r1])
    if mm.kind in (INT8G, INT4) and mm.block:  # a group per kept block, stored whole: value i in group i // block
        g = torch.div(torch.arange(i0, i1), mm.block, rounding_mode="floor")
        codes = _nibbles(mm.values, i0, i1 - i0) if mm.kind == INT4 else mm.values[i0:i1]
        z = _nibbles(mm.zero, 0, mm.zero.numel() * 2)[g] if mm.kind == INT4 else 0
        vals = (codes - z).float() * mm.scale.float()[g]
    elif mm.kind in (INT8G, INT4):
        pos = keep.nonzero()  # (n, 2): the values' rows (from r0) and columns, in stored order
        gpr = -(-mm.cols // mm.group) if mm.group else 1
        g = (pos[:, 0] + r0) * gpr + (torch.div(pos[:, 1], mm.group, rounding_mode="floor") if mm.group else 0)
        if mm.kind == INT4:
            z = _nibbles(mm.zero, 0, mm.zero.numel() * 2)[g]
            vals = (_nibbles(mm.values, i0, i1 - i0) - z).float() * mm.scale.float()[g]
        else:
            vals = mm.values[i0:i1].float() * mm.scale.float()[g]
    elif mm.kind == P14:
        vals = _values14(mm.values, i0, i1 - i0)
    elif mm.kind == INT8:
        rows = torch.repeat_interleave(torch.arange(r0, r1), mm.offsets[r0 + 1:r1 + 1] - mm.offsets[r0:r1])
        vals = mm.values[i0:i1].float() * mm.scale[rows]
    else:
        vals = mm.values[i0:i1]
    out = torch.zeros(r1 - r0, mm.cols, dtype=dtype)
    out[keep] = vals.to(dtype)
    return out


# --- products -----------------------------------------------------------------------------------------
_scratch = {"bytes": 0}  # the largest panel scratch the C++ path has held (one buffer per thread)


def scratch_bytes() -> int:
    """Bytes held by the per-thread panel buffers (sized by the largest panel used so far)."""
    return _scratch["bytes"]


def panel_rows(mm: Masked, rows: int) -> int:
    """At most ``rows`` per panel, and at least one panel per thread."""
    return max(1, min(rows, -(-mm.rows // torch.get_num_threads())))


def matmul_panels(x: torch.Tensor, mm: Masked, rows: int, use_ext: bool = True, isa: int | None = None) -> torch.Tensor:
    """``x (..., cols) -> (..., rows)``: unpack row panels, one dense GEMM each (output written in place); x in its
    own dtype if a value kind (`KIND`), else float32."""
    ext = _build.loaded() if use_ext else None
    if x.dtype not in KIND:
        x = x.float()
    p = panel_rows(mm, rows)
    if ext is not None:
        threads = min(torch.get_num_threads(), -(-mm.rows // p))
        _scratch["bytes"] = max(_scratch["bytes"], threads * p * mm.cols * x.element_size())
        return ext.masked_panels_mm(x, *mm.args, mm.rows, mm.cols, p, _build.resolve_isa(isa), mm.block)
    x2 = x.reshape(-1, mm.cols)
    y = torch.empty(x2.shape[0], mm.rows, dtype=x.dtype)  # (T, rows) row-major: each panel's columns in place
    for r0 in range(0, mm.rows, p):
        r1 = min(mm.rows, r0 + p)
        torch.mm(x2, panel_torch(mm, r0, r1, x.dtype).t(), out=y[:, r0:r1])
    return y.view(*x.shape[:-1], mm.rows)


def matmul_gemv(x: torch.Tensor, mm: Masked, bias: torch.Tensor | None = None,
                serial_bytes: int = 0, isa: int | None = None) -> torch.Tensor:
    """``x (..., cols) -> (..., rows)`` (+ bias) in x's dtype through the C++ GEMV (the extension must be available);
    one thread below ``serial_bytes`` of weight bytes; ``isa``: the cap (default `_build.isa`)."""
    return _build.loaded().masked_gemv(x, *mm.args, bias, mm.rows, mm.cols, _build.resolve_isa(isa), mm.block,
                                       serial_bytes)


def dense_then_gemv(x: torch.Tensor, At: torch.Tensor, mm: Masked, bias: torch.Tensor | None = None,
                    serial_bytes: int = 0, isa: int | None = None) -> torch.Tensor:
    """``matmul_gemv(x @ Atᵀ, mm, bias)`` in one call into the extension, for a dense bf16 ``At`` (`dict_linear`'s
    X·D then S at decode)."""
    return _build.loaded().dense_masked_gemv(x, At, *mm.args, bias, mm.rows, mm.cols, _build.resolve_isa(isa),
                                             mm.block, serial_bytes)
