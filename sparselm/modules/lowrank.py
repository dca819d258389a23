"""Low-rank layers: Wᵀ ≈ U V, two dense products."""
from __future__ import annotations

import torch

from .. import formats, kernels
from ..config import CoefStorage, Storage
from .base import CompressedLinear, decode_dense, dense_buffers, encode_dense


class LowRankLinear(CompressedLinear):
    """Wᵀ ≈ U V. Buffers (model dtype): ``U`` ``(in, r)``, ``V`` ``(r, out)``; other storages: ``Uᵀ`` ``(r, in)``
    and ``Vᵀ`` ``(out, r)`` row-major as ``U14`` / ``U_int8`` / ``U_int4`` + ``U_scale`` (+ ``U_zero``), same for
    ``V`` (`encode_dense`; bf16/fp16: ``U``, ``V`` flat); optional ``bias`` ``(out,)``.
    Forward: ``(X U) V + b``, two dense products."""
    stored_rank: int = 0

    def __init__(self, U: torch.Tensor, V: torch.Tensor, bias: torch.Tensor | None = None,
                 dtype: torch.dtype | None = None, store: Storage = formats.MODEL_DTYPE):
        super().__init__(U.shape[0], V.shape[1])
        dtype = dtype or U.dtype
        store = Storage.of(store)
        self.storage, self.quant_group, self.stored_rank = store.kind, store.group, U.shape[1]
        if store.kind is CoefStorage.DTYPE:
            self._set(U=U.to(dtype), V=V.to(dtype))
        else:
            self._set(**encode_dense("U", U.T, store, dtype), **encode_dense("V", V.T, store, dtype))
        self._set(bias=None if bias is None else bias.detach().to(dtype))

    @classmethod
    def from_result(cls, result, bias: torch.Tensor | None, dtype: torch.dtype) -> "LowRankLinear":
        """From `methods.Factored` (``U``, ``V``, ``store``)."""
        return cls(result.U, result.V, bias, dtype, result.store)

    def meta(self) -> dict:
        return {**super().meta(), "stored_rank": self.stored_rank}

    @property
    def rank(self) -> int:
        return self.U.shape[1] if self.storage is CoefStorage.DTYPE else self.stored_rank

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``U`` ``(in, r)``, ``V`` ``(r, out)`` as stored (decoded for storages other than the model dtype)."""
        if self.storage is CoefStorage.DTYPE:
            return self.U, self.V
        r = self.rank
        return (decode_dense(self, "U", r, self.in_features, self.store).T,
                decode_dense(self, "V", self.out_features, r, self.store).T)

    def weight_bytes(self, users: int = 1) -> int:
        dtype = self.U.dtype if self.storage is CoefStorage.DTYPE else torch.float32
        return formats.lowrank_bytes(self.in_features, self.out_features, self.rank, dtype, self.store)

    def params(self, users: int = 1) -> float:
        return (self.in_features + self.out_features) * self.rank

    def dense_weight(self) -> torch.Tensor:
        U, V = self.factors()
        return (U.float() @ V.float()).T  # (out, in)

    def reference_forward(self, x: torch.Tensor) -> torch.Tensor:
        U, V = self.factors()
        y = (x @ U.to(x.dtype)) @ V.to(x.dtype)  # (..., in) -> (..., r) -> (..., out)
        return y if self.bias is None else y + self.bias.to(x.dtype)

    def build_runtime(self) -> tuple:
        """``(Uᵀ, Vᵀ)`` row-major: views of U, V re-laid out column-major (same values, same bytes), or an encoded
        storage's buffers as mask-free `kernels.Masked` forms (read as stored, never decoded to a dense copy)."""
        if self.storage is CoefStorage.DTYPE:
            self.U, self.V = kernels.colmajor(self.U), kernels.colmajor(self.V)
            return self.U.t(), self.V.t()
        r, g = self.rank, self.quant_group
        return (kernels.from_dense(dense_buffers(self, "U", self.storage), r, self.in_features, g),
                kernels.from_dense(dense_buffers(self, "V", self.storage), self.out_features, r, g))

    def fast_forward(self, x: torch.Tensor, path: str | None = None) -> torch.Tensor:
        Ut, Vt = self.runtime()
        return kernels.lowrank_linear(x, Ut, Vt, self._buffers["bias"], path or self.kernel_path)
