"""Pruned layers: unstructured (values + bitmask), N:M (values + packed indices), 1×g blocks (GQSA, GPTQ)."""
from __future__ import annotations

import torch

from .. import formats, kernels
from ..config import CoefStorage, Pattern, Storage
from ..packing import SCALE_BUFFER, VALUE_BUFFER, ZERO_BUFFER, QParams, block_groups, decode_values, \
    encode_values, index_bits, masked_groups, pack_bits, unpack_bits, value_count
from .base import CompressedLinear, decode_masked, encode_masked, masked_buffers


class SparseLinear(CompressedLinear):
    """A pruned linear layer. Values are stored as ``store`` says (`formats`: model dtype by default).

    Buffers (unstructured): ``mask`` uint8 ``(ceil(out·in/8),)`` packed bitmask of nonzeros (row-major);
    the kept weights in row-major order as ``values`` (a float dtype), ``values14``, ``values_int8`` or
    ``values_int4`` (+ ``scale`` fp16 and, int4, packed 4-bit ``zero``: one per row, or per ``quant_group`` inputs).
    Buffers (N:M, ``pattern`` set): the kept weights of each group in order (model dtype: ``values``
    ``(out, in·n/m)``; other storages flat, as above); ``indices`` uint8 packed positions inside each group,
    ``ceil(log2 m)`` bits each.
    Buffers (1×g blocks, ``block`` set, GQSA): ``mask`` packed over the ``(out, in/g)`` blocks (absent when every
    block is kept), the kept blocks' values in row-major order, one ``scale`` (+ ``zero``) per kept block.
    ``bias`` ``(out,)`` when the original layer had one.
    """
    block: bool = False

    def __init__(self, weight: torch.Tensor, mask: torch.Tensor, bias: torch.Tensor | None = None,
                 pattern: Pattern | None = None, dtype: torch.dtype | None = None,
                 store: Storage = formats.MODEL_DTYPE, qparams: QParams | None = None, block: bool = False):
        out_f, in_f = weight.shape
        super().__init__(in_f, out_f)
        dtype = dtype or weight.dtype
        mask, store = mask.bool(), Storage.of(store)
        self.pattern, self.storage, self.quant_group, self.block = pattern, store.kind, store.group, block
        self.count = int(mask.sum())
        if block:
            g = store.group
            blocks = mask.view(out_f, in_f // g, g).any(-1)  # (out, in/g)
            groups, n = block_groups(blocks, g)
            values = weight.view(out_f, in_f // g, g)[blocks].reshape(-1)  # (kept*g,)
            self.count = values.numel()
            self._set(**encode_values(values, store.kind, dtype, groups, n, qparams))
            if not bool(blocks.all()):
                self._set(mask=pack_bits(blocks, 1))
        elif pattern is None:
            self._set(**encode_masked(weight, mask, store, dtype, qparams))
        else:
            n, m = pattern.n, pattern.m
            groups = mask.view(out_f, in_f // m, m)
            if not (groups.sum(-1) == n).all():
                raise ValueError(f"mask is not exactly {pattern} (every group of {m} must keep {n})")
            pos = groups.nonzero()[:, 2].view(out_f, in_f // m, n)  # (out, groups, n) sorted positions
            values = weight.view(out_f, in_f // m, m).gather(2, pos).reshape(out_f, -1)  # (out, in*n/m)
            if store.kind is CoefStorage.DTYPE:
                enc = {"values": values.to(dtype)}
            else:  # flat, row-major: the same order as the mask's nonzeros
                vgroups, n_groups = masked_groups(mask, store.group)
                enc = encode_values(values.reshape(-1), store.kind, dtype, vgroups, n_groups, qparams)
            self._set(**enc, indices=pack_bits(pos, index_bits(m)))
        self._set(bias=None if bias is None else bias.detach().to(dtype))

    @classmethod
    def from_result(cls, result, bias: torch.Tensor | None, dtype: torch.dtype) -> "SparseLinear":
        """From `methods.Pruned` (``weight``, ``mask``, ``pattern``, ``store``, ``qparams``, ``block``)."""
        return cls(result.weight, result.mask, bias, result.pattern, dtype, result.store, result.qparams,
                   result.block)

    def meta(self) -> dict:
        return {**super().meta(), "pattern": None if self.pattern is None else str(self.pattern),
                "block": self.block}

    @property
    def nnz(self) -> int:
        if self.count is not None:
            return self.count
        return value_count(getattr(self, VALUE_BUFFER[self.storage]), self.storage)

    def _blocks(self) -> torch.Tensor:  # (out, in/g) bool
        shape = (self.out_features, self.in_features // self.quant_group)
        if getattr(self, "mask", None) is None:
            return torch.ones(shape, dtype=torch.bool, device=self.scale.device)
        return unpack_bits(self.mask, 1, shape[0] * shape[1]).view(shape).bool()

    def weight_bytes(self, users: int = 1) -> int:
        if self.block:
            return formats.block_sparse_bytes(self.out_features, self.in_features, self.nnz // self.quant_group,
                                              self._value_dtype(), self.store)
        return formats.sparse_bytes(self.out_features, self.in_features, self.nnz, self._value_dtype(),
                                    self.pattern, self.store)

    def params(self, users: int = 1) -> float:
        return self.nnz

    def paper_params(self, users: int = 1) -> float:
        if self.block:
            meta_bits = 0 if getattr(self, "mask", None) is None else self.mask.numel() * 8
        else:
            meta_bits = index_bits(self.pattern.m) * self.nnz if self.pattern else self.in_features * self.out_features
        return self.nnz + meta_bits / 16

    def _enc(self) -> dict[str, torch.Tensor]:
        names = (VALUE_BUFFER[self.storage], SCALE_BUFFER, ZERO_BUFFER)
        return {k: getattr(self, k) for k in names if getattr(self, k, None) is not None}

    def dense_weight(self) -> torch.Tensor:
        out_f, in_f = self.out_features, self.in_features
        if self.block:
            g, blocks = self.quant_group, self._blocks()
            groups, _ = block_groups(blocks, g)
            values = decode_values(self._enc(), self.storage, self.nnz, groups)
            w = torch.zeros(out_f, in_f // g, g, dtype=values.dtype, device=values.device)
            w[blocks] = values.view(-1, g)
            return w.view(out_f, in_f)
        if self.pattern is None:
            return decode_masked(self, out_f, in_f, self.store)
        n, m = self.pattern.n, self.pattern.m
        pos = unpack_bits(self.indices, index_bits(m), out_f * in_f * n // m).view(out_f, in_f // m, n)
        if self.storage is CoefStorage.DTYPE:
            values = self.values
        else:
            mask = torch.zeros(out_f, in_f // m, m, dtype=torch.bool, device=pos.device)
            mask.scatter_(2, pos, True)
            groups = masked_groups(mask.view(out_f, in_f), self.quant_group)[0] if self.store.kind.quantized else None
            values = decode_values(self._enc(), self.storage, self.nnz, groups)
        w = torch.zeros(out_f, in_f // m, m, dtype=values.dtype, device=values.device)
        w.scatter_(2, pos.to(w.device), values.reshape(out_f, in_f // m, n))
        return w.view(out_f, in_f)

    def build_runtime(self) -> kernels.Masked | None:
        out_f, in_f = self.out_features, self.in_features
        if self.block:  # GQSA's 1×g blocks; every block kept (``gptq``, no mask stored): a dense grouped matrix
            make = kernels.from_blocks if getattr(self, "mask", None) is not None else kernels.from_dense
            return make(masked_buffers(self, self.storage), out_f, in_f, self.quant_group)
        if self.pattern is None:
            return kernels.from_bitmask(masked_buffers(self, self.storage), out_f, in_f, self.quant_group)
        n, m = self.pattern.n, self.pattern.m
        pos = unpack_bits(self.indices, index_bits(m), out_f * in_f * n // m).view(out_f, in_f // m, n)
        return kernels.from_nm(masked_buffers(self, self.storage), pos, n, m, self.quant_group)

    def fast_forward(self, x: torch.Tensor, path: str | None = None) -> torch.Tensor:
        return kernels.masked_linear(x, self.runtime(), self._buffers["bias"], path or self.kernel_path)
