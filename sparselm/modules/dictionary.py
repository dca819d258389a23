"""Sparse-dictionary layers: Wᵀ ≈ D S, a dense dictionary and column-sparse coefficients (CoSpaDi, ROCKET)."""
from __future__ import annotations

import torch

from .. import formats, kernels
from ..config import CoefStorage, Storage
from ..packing import VALUE_BUFFER, QParams, value_count
from .base import CompressedLinear, decode_dense, decode_masked, dense_buffers, encode_dense, encode_masked, \
    masked_buffers


class SparseDictLinear(CompressedLinear):
    """Wᵀ ≈ D S with S column-sparse (each output channel uses a few atoms).

    Buffers: the dense dictionary ``D`` ``(in, k)`` in the model dtype, or, with another ``dict_storage``, its
    rows of ``Dᵀ`` ``(k, in)`` flat as ``Dt`` (bf16/fp16), ``Dt14``, ``Dt_int8`` / ``Dt_int4`` + ``Dt_scale`` (+
    ``Dt_zero``), one scale per atom or per ``dict_quant_group`` inputs (`encode_dense`); ``mask`` packed bitmask
    of Sᵀ ``(out, k)``; the nonzero coefficients of Sᵀ in row-major order, stored as ``store`` says: ``values`` (a
    float dtype), ``values14`` (14-bit packed bf16), ``values_int8`` or ``values_int4`` + ``scale`` (+ ``zero``),
    one per output channel or per ``quant_group`` atoms; optional ``bias``.
    Forward: ``(X D) S + b``; the kernels read an encoded ``D`` as stored (the reference forward decodes it,
    transiently: the resident bytes stay the stored ones). Layers of a ``group`` hold the very same dictionary
    tensors (`share_dictionary`; `io.save` writes them once).
    """
    dict_storage: CoefStorage = CoefStorage.DTYPE  # how D is stored (`config.Storage`) ...
    dict_quant_group: int = 0                      # ... and int8/int4's group along its inputs (0: per atom)

    def __init__(self, D: torch.Tensor, S: torch.Tensor, mask: torch.Tensor, bias: torch.Tensor | None = None,
                 store: Storage = formats.MODEL_DTYPE, dtype: torch.dtype | None = None,
                 qparams: QParams | None = None, dict_store: Storage = formats.MODEL_DTYPE):
        super().__init__(D.shape[0], S.shape[1])
        dtype = dtype or D.dtype
        store, dict_store = Storage.of(store), Storage.of(dict_store)
        self.k, self.storage, self.quant_group = D.shape[1], store.kind, store.group
        self.dict_storage, self.dict_quant_group = dict_store.kind, dict_store.group
        self.count = int(mask.sum())
        dictionary = ({"D": D.to(dtype)} if dict_store.kind is CoefStorage.DTYPE
                      else encode_dense("Dt", D.T, dict_store, dtype))
        self._set(**dictionary, **encode_masked(S.T, mask.T.bool(), store, dtype, qparams),
                  bias=None if bias is None else bias.detach().to(dtype))

    @classmethod
    def from_result(cls, result, bias: torch.Tensor | None, dtype: torch.dtype) -> "SparseDictLinear":
        """From `methods.SparseDict` (``D``, ``S``, ``mask``, ``store``, ``qparams``, ``dict_store``)."""
        return cls(result.D, result.S, result.mask, bias, result.store, dtype, result.qparams, result.dict_store)

    def meta(self) -> dict:
        return {**super().meta(), "k": self.k, "dict_storage": self.dict_storage.value,
                "dict_quant_group": self.dict_quant_group}

    @property
    def dict_store(self) -> Storage:
        return Storage(self.dict_storage, self.dict_quant_group)

    def dictionary_buffers(self) -> list[str]:
        """Names of the buffers that hold ``D`` (what layers sharing a dictionary share)."""
        return [n for n in ("D", "Dt", "Dt14", "Dt_int8", "Dt_int4", "Dt_scale", "Dt_zero")
                if getattr(self, n, None) is not None]

    def share_dictionary(self, other: "SparseDictLinear") -> None:
        """Hold the very same dictionary tensors as ``other`` (a shared ``D`` is stored once)."""
        for name in other.dictionary_buffers():
            setattr(self, name, getattr(other, name))

    def dictionary(self) -> torch.Tensor:  # (in, k), as stored (decoded for storages other than the model dtype)
        if self.dict_storage is CoefStorage.DTYPE:
            return self.D
        return decode_dense(self, "Dt", self.k, self.in_features, self.dict_store).T

    @property
    def nnz(self) -> int:
        if self.count is not None:
            return self.count
        return value_count(getattr(self, VALUE_BUFFER[self.storage]), self.storage)

    def weight_bytes(self, users: int = 1) -> int:
        d_dtype = self.D.dtype if self.dict_storage is CoefStorage.DTYPE else torch.float32  # unused if not dtype
        d = formats.dictionary_bytes(self.in_features, self.k, d_dtype, self.dict_store)
        own = formats.coefficient_bytes(self.out_features, self.k, self.nnz, self.store, self._value_dtype())
        return own + d - d * (users - 1) // users  # the other users carry the rest of D

    def params(self, users: int = 1) -> float:
        return self.in_features * self.k / users + self.nnz

    def coefficients(self) -> torch.Tensor:  # (k, out)
        return decode_masked(self, self.out_features, self.k, self.store).T

    def dense_weight(self) -> torch.Tensor:
        return (self.dictionary().float() @ self.coefficients().float()).T  # (out, in)

    def reference_forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._dense is not None:  # inside `dense_cache`: the weight rebuilt once, not S decoded at every call
            return super().reference_forward(x)
        y = (x @ self.dictionary().to(x.dtype)) @ self.coefficients().to(x.dtype)  # (..., in) -> (..., k) -> (..., out)
        return y if self.bias is None else y + self.bias.to(x.dtype)

    def build_runtime(self) -> tuple:
        """``(Dᵀ, Sᵀ)``: ``Dᵀ (k, in)`` a view of D re-laid out column-major (same values and bytes; a shared D
        stays shared) or an encoded D's mask-free `kernels.Masked` form; Sᵀ's bitmask form."""
        if self.dict_storage is CoefStorage.DTYPE:
            self.D = kernels.colmajor(self.D)
            Dt = self.D.t()
        else:
            Dt = kernels.from_dense(dense_buffers(self, "Dt", self.dict_storage), self.k, self.in_features,
                                    self.dict_quant_group)
        S = kernels.from_bitmask(masked_buffers(self, self.storage), self.out_features, self.k, self.quant_group)
        return Dt, S

    def fast_forward(self, x: torch.Tensor, path: str | None = None) -> torch.Tensor:
        Dt, S = self.runtime()
        return kernels.dict_linear(x, Dt, S, self._buffers["bias"], path or self.kernel_path)
