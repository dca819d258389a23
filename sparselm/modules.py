"""Compressed linear layers. Each stores only what it needs, in documented buffers, and has a plain
reference ``forward`` that is exact (it rebuilds the weight it represents and calls ``F.linear``).

All three compute ``Y = X Wᵀ + b`` for a weight ``W`` ``(out, in)`` they represent:
  * `SparseLinear`      W with zeros: nonzero values + a packed bitmask, or N:M values + packed indices.
  * `LowRankLinear`     Wᵀ = U V, U ``(in, r)``, V ``(r, out)``: two dense products.
  * `SparseDictLinear`  Wᵀ = D S, D ``(in, k)`` dense, S ``(k, out)`` column-sparse: values + bitmask.

Buffers are kept in their storage dtype; ``forward`` computes in the input's dtype. Each class owns its
size: ``weight_bytes`` is its format's formula in `formats` (from shapes and ``nnz``, nothing unpacked), equal
to the bytes of its buffers, what `io.save` writes; ``params`` and ``paper_params`` are its counts in the
other two conventions (DESIGN.md). Each class builds itself from a method's result (``from_result``: a plain
dataclass of tensors from `sparselm.methods`, read by its fields; this module imports nothing above it).
A layer also carries what it was made from: ``spec`` (the method spec), ``info`` (the method's record) and
``group`` (the qualified names of the layers sharing its dictionary, itself included; empty when it owns
it alone), which its manifest entry records (`io.layer_entry`).

``forward`` runs a fast path from `sparselm.kernels` on CPU (it reads a runtime form built on first use:
row offsets, an N:M mask as bitmask, column-major factors; counted by ``resident_bytes``, never a dense
copy); ``reference_forward`` is the plain twin, also taken for gradients, other devices, inside
`dense_cache`, and when ``kernel_path = "reference"`` (see `reference_forwards`).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from . import formats, kernels
from .config import CoefStorage, MethodSpec, Pattern, Storage
from .packing import SCALE_BUFFER, VALUE_BUFFER, ZERO_BUFFER, QParams, block_groups, decode_values, \
    encode_values, index_bits, masked_groups, pack_bits, unpack_bits, value_count

MODULE_CLASSES: dict[str, type["CompressedLinear"]] = {}


class CompressedLinear(nn.Module):
    """Base: shape bookkeeping, bias, byte accounting and the dense reconstruction used by forward."""

    _dense: torch.Tensor | None = None  # the rebuilt weight, held only inside `dense_cache`
    spec: MethodSpec | None = None      # what made it (None: unknown, e.g. built by hand)
    info: dict = {}                     # the method's record (replaced per instance, never mutated)
    group: tuple[str, ...] = ()         # layers sharing its dictionary (itself included); () = none
    storage: CoefStorage = CoefStorage.DTYPE  # how its values are stored (`config.Storage`) ...
    quant_group: int = 0                      # ... and int8/int4's group along the input dimension
    count: int | None = None                  # stored values (recorded: int4 byte lengths leave it open)
    kernel_path: str | None = None  # None: `sparselm.kernels.policy` chooses; "reference": the plain forward
    _runtime = None  # the runtime form its kernel reads (built on first fast forward; see `runtime`)
    _runtime_key: tuple | None = None

    def __init_subclass__(cls, **kw):
        super().__init_subclass__(**kw)
        MODULE_CLASSES[cls.__name__] = cls

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.original = "Linear"  # class of the layer it replaced ("Conv1D" for GPT-2): what export rebuilds
        self.register_buffer("bias", None)

    def _set(self, **buffers: torch.Tensor | None) -> None:
        for name, t in buffers.items():
            if t is not None:
                self.register_buffer(name, t.contiguous())

    def dense_weight(self) -> torch.Tensor:  # (out, in)
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        path = kernels.fast_path(x, self.kernel_path) if self._dense is None else None
        return self.reference_forward(x) if path is None else self.fast_forward(x, path)

    def reference_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The plain forward: rebuild the dense weight, one ``F.linear`` (the fast paths' twin)."""
        b = None if self.bias is None else self.bias.to(x.dtype)
        W = self._dense if self._dense is not None else self.dense_weight()  # (out, in)
        return F.linear(x, W.to(x.dtype), b)

    def fast_forward(self, x: torch.Tensor, path: str | None = None) -> torch.Tensor:
        """The kernel forward; ``path``: the resolved `kernels.fast_path` (None: this module's ``kernel_path``)."""
        return self.reference_forward(x)

    def build_runtime(self):
        """The runtime form (may re-lay out buffers in place, same values and bytes); None if there is none."""
        return None

    def runtime(self):
        """The runtime form, rebuilt whenever a buffer was replaced or written since it was built."""
        key = self._buffer_key()
        if key != self._runtime_key:
            self._runtime = self.build_runtime()
            self._runtime_key = self._buffer_key()
        return self._runtime

    def _buffer_key(self) -> tuple:  # changes when a buffer is replaced, written in place or moved
        return tuple((t.data_ptr(), t._version, t.is_cpu) for t in self._buffers.values() if t is not None)

    def resident_bytes(self) -> int:
        """Bytes held in memory: the stored buffers + what the runtime forms add (offsets, N:M bitmask)."""
        rt = self.runtime()
        return self.stored_bytes() + sum(getattr(f, "owned", 0) for f in (rt if isinstance(rt, tuple) else (rt,)))

    def weight_bytes(self, users: int = 1) -> int:
        """Stored bytes without the bias, by the format's formula; ``users``: layers sharing a dictionary
        (each is charged its share, so a shared ``D`` counts once over the group)."""
        raise NotImplementedError

    def params(self, users: int = 1) -> float:
        """Nonzeros + dense factor entries, indices free (ROCKET's convention)."""
        raise NotImplementedError

    def paper_params(self, users: int = 1) -> float:
        """CoSpaDi's accounting, in parameters: Eq. 11 for dictionaries, Eq. 9 for low rank, values at 16 bits
        + index/mask bits for pruning (their Table 12)."""
        return self.params(users)

    def bias_bytes(self) -> int:
        return 0 if self.bias is None else self.bias.numel() * self.bias.element_size()

    def stored_bytes(self) -> int:
        """Everything `io.save` writes for this layer (bias included)."""
        return self.weight_bytes() + self.bias_bytes()

    @property
    def store(self) -> Storage:
        return Storage(self.storage, self.quant_group)

    def _value_dtype(self) -> torch.dtype:
        """The dtype a model-dtype storage holds (what `formats` needs for ``storage: dtype``)."""
        t = getattr(self, "values", None)
        return t.dtype if t is not None and t.is_floating_point() else torch.float32

    def meta(self) -> dict:
        """Constructor arguments that, with the buffers' shapes, rebuild an empty module (see `empty`)."""
        return {"in_features": self.in_features, "out_features": self.out_features, "original": self.original,
                "storage": self.storage.value, "quant_group": self.quant_group, "count": self.count}

    @classmethod
    def empty(cls, meta: dict, shapes: dict[str, tuple[list[int], str]]) -> "CompressedLinear":
        """A module with zero buffers of the saved shapes and dtypes, ready for ``load_state_dict``."""
        module = cls.__new__(cls)
        CompressedLinear.__init__(module, meta["in_features"], meta["out_features"])
        for key, value in meta.items():
            key = {"coef_storage": "storage"}.get(key, key)  # saved before the one storage rule
            setattr(module, key, _meta_value(key, value))
        for name, (shape, dtype) in shapes.items():
            module.register_buffer(name, torch.zeros(shape, dtype=getattr(torch, dtype)))
        return module

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, bytes={self.stored_bytes()}"


@contextlib.contextmanager
def reference_forwards(module: nn.Module) -> Iterator[None]:
    """Inside the context, the compressed layers under ``module`` run their plain reference forward."""
    layers = [m for m in module.modules() if isinstance(m, CompressedLinear)]
    saved = [m.kernel_path for m in layers]
    try:
        for m in layers:
            m.kernel_path = "reference"
        yield
    finally:
        for m, path in zip(layers, saved):
            m.kernel_path = path


@contextlib.contextmanager
def dense_cache(module: nn.Module) -> Iterator[None]:
    """Inside the context, the compressed layers under ``module`` rebuild their weight once instead of at
    every call (the pipeline runs a block once per calibration batch); the copies are dropped on exit. Nested:
    the outermost context that built a copy drops it."""
    layers = [m for m in module.modules() if isinstance(m, CompressedLinear) and m._dense is None]
    try:
        for m in layers:
            m._dense = m.dense_weight()
        yield
    finally:
        for m in layers:
            m._dense = None


def _meta_value(key: str, value):
    if key == "pattern" and value is not None:
        return Pattern.parse(value)
    if key in ("storage", "dict_storage"):
        return CoefStorage(value)
    return value


# --- values + bitmask for a (rows, cols) matrix -------------------------------------------------------
def encode_masked(matrix: torch.Tensor, mask: torch.Tensor, store: Storage, dtype: torch.dtype,
                  params: QParams | None = None) -> dict:
    """Nonzero values (row-major order of ``mask``) + a packed 1-bit mask of ``matrix`` ``(rows, cols)``;
    int8/int4: one group per row or per ``store.group`` columns of a row (``params``: given, else fitted)."""
    groups, n = masked_groups(mask, store.group)
    enc = encode_values(matrix[mask], store.kind, dtype, groups, n, params)
    return {"mask": pack_bits(mask, 1), **enc}


def masked_buffers(module: nn.Module, storage: CoefStorage) -> dict[str, torch.Tensor]:
    """A values + bitmask layer's buffers by saved name: ``mask``, the values of ``storage`` (``values``,
    ``values14``, ``values_int8`` or ``values_int4``) and ``scale`` / ``zero`` when it has them (what a
    kernel's runtime form reads)."""
    names = ("mask", VALUE_BUFFER[storage], SCALE_BUFFER, ZERO_BUFFER)
    return {name: getattr(module, name) for name in names if getattr(module, name, None) is not None}


def decode_masked(module: nn.Module, rows: int, cols: int, store: Storage) -> torch.Tensor:
    """Inverse of `encode_masked`, from ``module``'s ``mask`` and value buffers of ``store``."""
    enc = masked_buffers(module, store.kind)
    mask = unpack_bits(enc.pop("mask"), 1, rows * cols).view(rows, cols).bool()  # (rows, cols)
    groups = masked_groups(mask, store.group)[0] if store.kind.quantized else None
    values = decode_values(enc, store.kind, int(mask.sum()), groups)
    out = torch.zeros(rows, cols, dtype=values.dtype if values.is_floating_point() else torch.float32)
    out[mask] = values.to(out.dtype)
    return out


def encode_dense(name: str, M: torch.Tensor, store: Storage, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """A dense factor ``M`` ``(rows, cols)`` (quantized along ``cols``) as buffers named after ``name``:
    ``name`` (float storages), ``name14``, ``name_int8`` / ``name_int4`` + ``name_scale`` (+ ``name_zero``)."""
    ones = torch.ones_like(M, dtype=torch.bool)
    groups, n = masked_groups(ones, store.group)
    enc = encode_values(M.reshape(-1), store.kind, dtype, groups, n)
    return {_dense_name(name, key): t for key, t in enc.items()}


def dense_buffers(module: nn.Module, name: str, storage: CoefStorage) -> dict[str, torch.Tensor]:
    """`encode_dense`'s buffers of ``name`` on ``module`` under the generic keys (``values``, ``values14``,
    ``values_int8``, ``values_int4``, ``scale``, ``zero``: what `decode_values` and `kernels.from_dense` read)."""
    keys = (VALUE_BUFFER[storage], SCALE_BUFFER, ZERO_BUFFER)
    return {k: getattr(module, _dense_name(name, k)) for k in keys
            if getattr(module, _dense_name(name, k), None) is not None}


def decode_dense(module: nn.Module, name: str, rows: int, cols: int, store: Storage) -> torch.Tensor:
    """Inverse of `encode_dense`: ``(rows, cols)``."""
    groups = masked_groups(torch.ones(rows, cols, dtype=torch.bool), store.group)[0] if store.kind.quantized else None
    return decode_values(dense_buffers(module, name, store.kind), store.kind, rows * cols, groups).view(rows, cols)


def _dense_name(name: str, key: str) -> str:
    return name + {"values": "", "values14": "14"}.get(key, "_" + key.removeprefix("values_"))


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
        return kernels.masked_linear(x, self.runtime(), self.bias, path or self.kernel_path)


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
        return kernels.lowrank_linear(x, Ut, Vt, self.bias, path or self.kernel_path)


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
        return kernels.dict_linear(x, Dt, S, self.bias, path or self.kernel_path)


# --- structured pruning: plain narrower nn.Linear layers --------------------------------------------------
NARROWED = "sparselm_narrowed"  # the attribute of a plain nn.Linear that structured pruning narrowed


@dataclass
class Narrowed:
    """What structured pruning made of a plain ``nn.Linear`` (kept on it as ``NARROWED``): the dense shape it
    had, the output ``rows`` / input ``cols`` it kept (None: all), whether the method added its bias, the spec
    and the method's record. Its stored bytes: `formats.narrow_bytes` of the layer's shape."""
    dense_shape: tuple[int, int]
    rows: list[int] | None
    cols: list[int] | None
    bias_added: bool = False
    spec: MethodSpec | None = None
    info: dict = field(default_factory=dict)


def narrowed_of(module: nn.Module) -> Narrowed | None:
    return getattr(module, NARROWED, None) if isinstance(module, nn.Linear) else None


def mark_narrowed(module: nn.Linear, record: Narrowed) -> nn.Linear:
    setattr(module, NARROWED, record)
    return module
