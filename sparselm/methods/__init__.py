"""Compression methods: pure tensor functions, registered by spec type. No model, no I/O.

A per-layer method is ``fn(W, stats, spec, dtype) -> Result`` where ``W`` is ``(out, in)`` float32,
``stats`` the layer's `LinearStats` (None for data-free methods), and ``dtype`` the storage dtype of the
dense model (the byte budget depends on it). A *group* method (one dictionary shared across layers) is
``fn([W...], [stats...], spec, dtype) -> [Result...]``. `compress_group` calls either uniformly.

Results are plain dataclasses of tensors; each knows its stored bytes by its format's formula in
`sparselm.formats` (the same one the module built from it uses), so sizes are known before anything is
built. This package never imports `sparselm.modules`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from .. import formats
from ..capture import LinearStats
from ..config import CoefStorage, MethodSpec, Pattern, PruneSpec, Refine, Storage
from ..packing import QParams, block_groups, masked_groups, round_grouped


@dataclass
class Pruned:
    """W with zeros: ``weight`` ``(out, in)``, ``mask`` bool ``(out, in)`` of kept entries; the kept values are
    stored as ``store`` says (``qparams``: the int8/int4 parameters the method rounded with; None: fitted at
    encoding, round-to-nearest). ``block``: the mask is made of whole 1×g blocks (``g = store.group``, GQSA)."""
    weight: torch.Tensor
    mask: torch.Tensor
    pattern: Pattern | None = None
    info: dict = field(default_factory=dict)  # e.g. {'whitening_shift': ...}: goes into the manifest
    store: Storage = formats.MODEL_DTYPE
    qparams: QParams | None = None
    block: bool = False

    def blocks(self) -> torch.Tensor:  # (out, in/g) bool: kept 1×g blocks
        out_f, in_f = self.mask.shape
        return self.mask.view(out_f, in_f // self.store.group, self.store.group).any(-1)

    def value_groups(self) -> tuple[torch.Tensor, int]:
        """The quantization group of each kept value (row-major) and the number of groups."""
        return block_groups(self.blocks(), self.store.group) if self.block else masked_groups(self.mask, self.store.group)

    def reconstruct(self) -> torch.Tensor:  # (out, in), the values as they read back
        return _round_masked(self.weight, self.mask, self.store, self.qparams, self.value_groups)

    def stored_bytes(self, dtype: torch.dtype) -> int:
        out_f, in_f = self.weight.shape
        if self.block:
            return formats.block_sparse_bytes(out_f, in_f, int(self.blocks().sum()), dtype, self.store)
        return formats.sparse_bytes(out_f, in_f, int(self.mask.sum()), dtype, self.pattern, self.store)


@dataclass
class Factored:
    """Wᵀ ≈ U V: ``U`` ``(in, r)``, ``V`` ``(r, out)``; both stored as ``store`` says (``Uᵀ``, ``Vᵀ`` rows)."""
    U: torch.Tensor
    V: torch.Tensor
    info: dict = field(default_factory=dict)
    store: Storage = formats.MODEL_DTYPE

    def reconstruct(self) -> torch.Tensor:
        U = round_dense(self.U.T, self.store).T  # (in, r)
        V = round_dense(self.V.T, self.store).T  # (r, out)
        return (U @ V).T

    def stored_bytes(self, dtype: torch.dtype) -> int:
        return formats.lowrank_bytes(self.U.shape[0], self.V.shape[1], self.U.shape[1], dtype, self.store)


@dataclass
class SparseDict:
    """Wᵀ ≈ D S: ``D`` ``(in, k)``, ``S`` ``(k, out)`` with zeros outside ``mask`` (bool, same shape); the
    coefficients stored as ``store`` says (rows of ``Sᵀ``; ``qparams`` as for `Pruned`), ``D`` as ``dict_store``
    says (rows of ``Dᵀ``, round to nearest)."""
    D: torch.Tensor
    S: torch.Tensor
    mask: torch.Tensor
    store: Storage = formats.MODEL_DTYPE
    info: dict = field(default_factory=dict)
    qparams: QParams | None = None
    dict_store: Storage = formats.MODEL_DTYPE

    def __post_init__(self):
        self.store, self.dict_store = Storage.of(self.store), Storage.of(self.dict_store)

    def coefficients(self) -> torch.Tensor:  # (k, out), as they read back
        Mt = self.mask.T
        return _round_masked(self.S.T, Mt, self.store, self.qparams, lambda: masked_groups(Mt, self.store.group)).T

    def dictionary(self) -> torch.Tensor:  # (in, k), as it reads back
        return round_dense(self.D.T, self.dict_store).T

    def reconstruct(self) -> torch.Tensor:
        return (self.dictionary() @ self.coefficients()).T

    def stored_bytes(self, dtype: torch.dtype) -> int:
        """With its own dictionary (a shared one is counted once by `formats.group_dict_bytes`)."""
        (in_f, k), out_f = self.D.shape, self.S.shape[1]
        return formats.dict_bytes(in_f, out_f, k, int(self.mask.sum()), self.store, dtype, self.dict_store)


def _round_masked(M: torch.Tensor, mask: torch.Tensor, store: Storage, params: QParams | None,
                  groups: Callable[[], tuple[torch.Tensor, int]]) -> torch.Tensor:
    """``M`` ``(rows, cols)`` zero outside ``mask``, kept values rounded to ``store`` (model dtype: as given)."""
    if store.kind is CoefStorage.DTYPE:
        return M * mask
    g, n = groups()
    out = torch.zeros_like(M, dtype=torch.float32)
    out[mask] = round_grouped(M[mask], g.to(M.device), n, store.kind, torch.float32, params)[0].to(M.device)
    return out


def round_dense(M: torch.Tensor, store: Storage) -> torch.Tensor:
    """A dense ``(rows, cols)`` factor as it reads back in ``store`` (quantized along ``cols``)."""
    if store.kind is CoefStorage.DTYPE:
        return M
    return _round_masked(M, torch.ones_like(M, dtype=torch.bool), store, None,
                         lambda: masked_groups(torch.ones_like(M, dtype=torch.bool), store.group))


Result = Pruned | Factored | SparseDict

_PER_LAYER: dict[type, Callable] = {}
_GROUPED: dict[type, Callable] = {}


def register(spec_cls: type[MethodSpec], grouped: bool = False):
    """Decorator: ``fn`` implements ``spec_cls`` (per layer, or for a group of layers sharing factors)."""
    def deco(fn):
        (_GROUPED if grouped else _PER_LAYER)[spec_cls] = fn
        return fn
    return deco


def compress_group(spec: MethodSpec, weights: list[torch.Tensor], stats: list[LinearStats | None],
                   dtype: torch.dtype) -> list[Result]:
    """Compress layers that share factors (a list of one for per-layer methods)."""
    kind = type(spec)
    if kind in _GROUPED:
        return _GROUPED[kind](weights, stats, spec, dtype)
    if kind in _PER_LAYER:
        results = [_PER_LAYER[kind](w, s, spec, dtype) for w, s in zip(weights, stats)]
        if isinstance(spec, PruneSpec) and spec.refine is not Refine.NONE:
            exact = spec.refine is Refine.DSNOT
            results = [refine_dsnot(w, r, s, exact) for w, r, s in zip(weights, results, stats)]
        return results
    raise KeyError(f"no implementation registered for {kind.__name__}")


def refine_dsnot(W: torch.Tensor, result: Pruned, stats: LinearStats | None, exact: bool = True) -> Pruned:
    """A pruning result with its mask refined by DSnoT (same nonzeros per row, same pattern), in the same storage
    (values a method had rounded in its sweep are rounded to nearest again: the swaps changed them)."""
    weight, mask, info = dsnot.dsnot(W, result.weight, result.mask, stats, result.pattern, exact=exact)
    return Pruned(weight, mask, result.pattern, {**result.info, **info}, result.store)


def compress_weight(spec: MethodSpec, W: torch.Tensor, stats: LinearStats | None, dtype: torch.dtype) -> Result:
    """Compress one weight ``(out, in)``."""
    return compress_group(spec, [W], [stats], dtype)[0]


from . import cospadi, dsnot, gqsa, lowrank, magnitude, rocket, sparsegpt, wanda  # noqa: E402,F401  (they register themselves)
