"""Compression methods: pure tensor functions, registered by spec type. No model, no I/O.

A per-layer method is ``fn(W, stats, spec, dtype) -> Result`` where ``W`` is ``(out, in)`` float32,
``stats`` the layer's `LinearStats` (None for data-free methods), and ``dtype`` the storage dtype of the
dense model (the byte budget depends on it). A *group* method (one dictionary shared across layers) is
``fn([W...], [stats...], spec, dtype) -> [Result...]``. `compress_group` calls either uniformly.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..capture import LinearStats
from ..config import CoefStorage, MethodSpec, Pattern


@dataclass
class Pruned:
    """W with zeros: ``weight`` ``(out, in)``, ``mask`` bool ``(out, in)`` of kept entries."""
    weight: torch.Tensor
    mask: torch.Tensor
    pattern: Pattern | None = None
    info: dict = field(default_factory=dict)  # e.g. {'whitening_shift': ...}: goes into the manifest

    def reconstruct(self) -> torch.Tensor:  # (out, in)
        return self.weight * self.mask


@dataclass
class Factored:
    """Wᵀ ≈ U V: ``U`` ``(in, r)``, ``V`` ``(r, out)``."""
    U: torch.Tensor
    V: torch.Tensor
    info: dict = field(default_factory=dict)

    def reconstruct(self) -> torch.Tensor:
        return (self.U @ self.V).T


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


Result = Pruned | Factored | SparseDict

_PER_LAYER: dict[type, Callable] = {}
_GROUPED: dict[type, Callable] = {}
_MODULES = ("magnitude", "wanda", "sparsegpt", "lowrank", "cospadi", "rocket")


def register(spec_cls: type[MethodSpec], grouped: bool = False):
    """Decorator: ``fn`` implements ``spec_cls`` (per layer, or for a group of layers sharing factors)."""
    def deco(fn):
        (_GROUPED if grouped else _PER_LAYER)[spec_cls] = fn
        return fn
    return deco


def _load_all() -> None:
    for name in _MODULES:
        try:
            importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as e:  # a method file not written yet must not break the others
            if e.name != f"{__name__}.{name}":
                raise


def compress_group(spec: MethodSpec, weights: list[torch.Tensor], stats: list[LinearStats | None],
                   dtype: torch.dtype) -> list[Result]:
    """Compress layers that share factors (a list of one for per-layer methods)."""
    _load_all()
    kind = type(spec)
    if kind in _GROUPED:
        return _GROUPED[kind](weights, stats, spec, dtype)
    if kind in _PER_LAYER:
        return [_PER_LAYER[kind](w, s, spec, dtype) for w, s in zip(weights, stats)]
    raise KeyError(f"no implementation registered for {kind.__name__}")


def compress_weight(spec: MethodSpec, W: torch.Tensor, stats: LinearStats | None, dtype: torch.dtype) -> Result:
    """Compress one weight ``(out, in)``."""
    return compress_group(spec, [W], [stats], dtype)[0]
