"""The base of every compressed format (`CompressedLinear`: shapes, bias, byte accounting, the reference and fast
forwards, the runtime form), the contexts that switch their forwards, the buffer codecs the formats share
(values + bitmask, encoded dense factors) and the record structured pruning leaves on a plain ``nn.Linear``."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from .. import kernels
from ..config import CoefStorage, MethodSpec, Pattern, Storage
from ..packing import SCALE_BUFFER, VALUE_BUFFER, ZERO_BUFFER, QParams, decode_values, encode_values, masked_groups, \
    pack_bits, unpack_bits

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
    _runtime_key: list | None = None

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
        """The kernel forward; ``path``: the resolved `kernels.fast_path` (None: this module's ``kernel_path``).
        The formats read their bias as ``self._buffers["bias"]``: ``self.bias`` runs `nn.Module.__getattr__`, 14 µs
        of a decode step's forward when cold (docs/benchmarks/README.md, session 20)."""
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

    def _buffer_key(self) -> list:  # changes when a buffer is replaced, written in place or moved
        return [(t.data_ptr(), t._version, t.is_cpu) for t in self._buffers.values() if t is not None]

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
