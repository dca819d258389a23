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
from ..config import CoefStorage, MethodSpec, Pattern, PruneSpec, Refine


@dataclass
class Pruned:
    """W with zeros: ``weight`` ``(out, in)``, ``mask`` bool ``(out, in)`` of kept entries."""
    weight: torch.Tensor
    mask: torch.Tensor
    pattern: Pattern | None = None
    info: dict = field(default_factory=dict)  # e.g. {'whitening_shift': ...}: goes into the manifest

    def reconstruct(self) -> torch.Tensor:  # (out, in)
        return self.weight * self.mask

    def stored_bytes(self, dtype: torch.dtype) -> int:
        out_f, in_f = self.weight.shape
        return formats.sparse_bytes(out_f, in_f, int(self.mask.sum()), dtype, self.pattern)


@dataclass
class Factored:
    """Wᵀ ≈ U V: ``U`` ``(in, r)``, ``V`` ``(r, out)``."""
    U: torch.Tensor
    V: torch.Tensor
    info: dict = field(default_factory=dict)

    def reconstruct(self) -> torch.Tensor:
        return (self.U @ self.V).T

    def stored_bytes(self, dtype: torch.dtype) -> int:
        return formats.lowrank_bytes(self.U.shape[0], self.V.shape[1], self.U.shape[1], dtype)


@dataclass
class SparseDict:
    """Wᵀ ≈ D S: ``D`` ``(in, k)``, ``S`` ``(k, out)`` with zeros outside ``mask`` (bool, same shape)."""
    D: torch.Tensor
    S: torch.Tensor
    mask: torch.Tensor
    coef_storage: CoefStorage = CoefStorage.DTYPE
    info: dict = field(default_factory=dict)

    def reconstruct(self) -> torch.Tensor:
        return (self.D @ (self.S * self.mask)).T

    def stored_bytes(self, dtype: torch.dtype) -> int:
        """With its own dictionary (a shared one is counted once by `formats.group_dict_bytes`)."""
        (in_f, k), out_f = self.D.shape, self.S.shape[1]
        return formats.dict_bytes(in_f, out_f, k, int(self.mask.sum()), self.coef_storage, dtype)


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
    """A pruning result with its mask refined by DSnoT (same nonzeros per row, same pattern)."""
    weight, mask, info = dsnot.dsnot(W, result.weight, result.mask, stats, result.pattern, exact=exact)
    return Pruned(weight, mask, result.pattern, {**result.info, **info})


def compress_weight(spec: MethodSpec, W: torch.Tensor, stats: LinearStats | None, dtype: torch.dtype) -> Result:
    """Compress one weight ``(out, in)``."""
    return compress_group(spec, [W], [stats], dtype)[0]


from . import cospadi, dsnot, lowrank, magnitude, rocket, sparsegpt, wanda  # noqa: E402,F401  (they register themselves)
