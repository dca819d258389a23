"""Fast forwards for the compressed formats: pure tensor functions (nothing here imports `sparselm.modules`).

Each function has the module's plain reference forward as its twin (``module.reference_forward``) and a
test comparing them (tests/test_kernels.py). Paths and overrides: `policy`. Runtime forms: `masked`.
  * `masked_linear`  Y = X Wᵀ + b for a bitmask-packed W (pruned layers; N:M converted at load).
  * `lowrank_linear` Y = (X U) V + b; U, V held column-major (`colmajor`) so ``torch.mv`` streams them.
  * `dict_linear`    Y = (X D) S + b; X·D dense, S through `masked_linear`'s paths.
CPU only: other devices take the reference forward (`usable`).
"""
from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F

from . import masked, policy
from ._build import available as extension_available
from .masked import Masked, from_bitmask, from_nm, scratch_bytes

__all__ = ["Masked", "colmajor", "dict_linear", "extension_available", "from_bitmask", "from_nm",
           "lowrank_linear", "masked_linear", "policy", "scratch_bytes", "usable"]


def usable(x: torch.Tensor, module_path: str | None) -> bool:
    """Whether the fast forwards apply: a CPU input, no gradient wanted through it (the C++ products have no
    backward) and no request for the reference forward."""
    if x.device.type != "cpu" or (x.requires_grad and torch.is_grad_enabled()):
        return False
    return policy.requested(module_path) != "reference"


def _product(x2: torch.Tensor, mm: Masked, module_path: str | None) -> torch.Tensor:
    """``x2 (T, cols) -> (T, rows)`` in x's dtype."""
    path = policy.masked_path(x2.shape[0], module_path)
    if path == "gemv":
        return masked.matmul_gemv(x2, mm).to(x2.dtype)
    return masked.matmul_panels(x2, mm, policy.PANEL_ROWS, use_ext=path == "panel").to(x2.dtype)


def _bias(y: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return y if bias is None else y + bias.to(y.dtype)


def masked_linear(x: torch.Tensor, mm: Masked, bias: torch.Tensor | None = None,
                  module_path: str | None = None) -> torch.Tensor:
    """``x (..., in) -> (..., out)`` for W ``(out, in)`` in runtime form ``mm``."""
    y = _product(x.reshape(-1, mm.cols), mm, module_path)
    return _bias(y, bias).reshape(*x.shape[:-1], mm.rows)


def _matvecs(x2: torch.Tensor, At: torch.Tensor) -> torch.Tensor:
    """``x2 (T, n) @ At.T`` for a contiguous ``At (m, n)``: torch.mv per row when T is tiny, else one GEMM."""
    if x2.shape[0] == 1 and policy.MV_MAX_TOKENS >= 1:
        return torch.mv(At, x2[0]).unsqueeze(0)
    if x2.shape[0] <= policy.MV_MAX_TOKENS:
        return torch.stack([torch.mv(At, row) for row in x2])
    return F.linear(x2, At)


def lowrank_linear(x: torch.Tensor, U: torch.Tensor, V: torch.Tensor, bias: torch.Tensor | None = None,
                   module_path: str | None = None) -> torch.Tensor:
    """``x (..., in) -> (..., out)`` = (x U) V + b, ``U (in, r)``, ``V (r, out)`` (best column-major)."""
    x2 = x.reshape(-1, U.shape[0])
    h = _matvecs(x2, (U if U.dtype == x.dtype else U.to(x.dtype)).t())  # (T, r)
    y = _matvecs(h, (V if V.dtype == x.dtype else V.to(x.dtype)).t())   # (T, out)
    return _bias(y, bias).reshape(*x.shape[:-1], V.shape[1])


def dict_linear(x: torch.Tensor, D: torch.Tensor, mm: Masked, bias: torch.Tensor | None = None,
                module_path: str | None = None) -> torch.Tensor:
    """``x (..., in) -> (..., out)`` = (x D) S + b, ``D (in, k)``, S given as Sᵀ ``(out, k)`` in form ``mm``."""
    h = _matvecs(x.reshape(-1, D.shape[0]), (D if D.dtype == x.dtype else D.to(x.dtype)).t())  # (T, k)
    y = _product(h, mm, module_path)
    return _bias(y, bias).reshape(*x.shape[:-1], mm.rows)


_relaid: dict[int, tuple[weakref.ref, weakref.ref]] = {}


def colmajor(t: torch.Tensor) -> torch.Tensor:
    """The same matrix with column-major storage (``t.t()`` contiguous), same bytes: ``torch.mv(t.t(), x)``
    then streams it. One tensor object shared by several modules maps to one new tensor (stays shared)."""
    if t.dim() != 2 or t.t().is_contiguous():
        return t
    hit = _relaid.get(id(t))
    if hit is not None and hit[0]() is t and hit[1]() is not None:
        return hit[1]()
    new = t.t().contiguous().t()
    for key in [k for k, (a, b) in _relaid.items() if a() is None or b() is None]:
        del _relaid[key]
    _relaid[id(t)] = (weakref.ref(t), weakref.ref(new))
    return new
