"""Fast forwards for the compressed formats: pure tensor functions (nothing here imports `sparselm.modules`).

Each function has the module's plain reference forward as its twin (``module.reference_forward``) and a
test comparing them (tests/test_kernels.py). Paths and overrides: `policy`. Runtime forms: `masked`.
  * `masked_linear`  Y = X Wᵀ + b for a bitmask-packed W (pruned layers; N:M converted at load).
  * `lowrank_linear` Y = (X U) V + b from the row-major factors Uᵀ, Vᵀ: model-dtype U, V held column-major
    (`colmajor`) so that the C++ bf16 GEMV (few tokens) or one GEMM streams them; encoded ones (14-bit, int8,
    int4) as mask-free `Masked` forms (`from_dense`) through `masked_linear`'s paths.
  * `dict_linear`    Y = (X D) S + b; X·D as a factor above, S through `masked_linear`'s paths.
CPU only: other devices take the reference forward (`usable`). The C++ kernels run the best instruction set the
CPU has (AVX-512, AVX2, scalar) up to the cap ``SPARSELM_ISA`` (`_build.isa`).
"""
from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F

from . import _build, masked, policy
from ._build import available as extension_available
from .masked import Masked, from_bitmask, from_blocks, from_dense, from_nm, scratch_bytes

__all__ = ["Masked", "check_environment", "colmajor", "dict_linear", "extension_available", "fast_path",
           "from_bitmask", "from_blocks", "from_dense", "from_nm", "lowrank_linear", "masked_linear", "policy",
           "scratch_bytes", "usable"]


def check_environment() -> None:
    """Raise `InputError` for a bad kernel environment variable (``SPARSELM_KERNELS``, ``SPARSELM_ISA``) now,
    before any long work: they are otherwise read at the first fast forward, which in a compression comes after
    every block is done."""
    policy.requested(None)
    _build.isa()


def fast_path(x: torch.Tensor, module_path: str | None) -> policy.Route | None:
    """The resolved request (`policy.route`) if the fast forwards apply: a CPU input, no gradient wanted
    through it (the C++ products have no backward) and no request for the reference forward; else None.
    Modules resolve it once per call and pass it down (the functions below take it as ``module_path``, as
    they take a module's ``kernel_path``)."""
    if not x.is_cpu or (x.requires_grad and torch.is_grad_enabled()):
        return None
    route = policy.route(module_path)
    return None if route.path == "reference" else route


def usable(x: torch.Tensor, module_path: str | None) -> bool:
    """Whether the fast forwards apply (see `fast_path`)."""
    return fast_path(x, module_path) is not None


Request = "str | policy.Route | None"  # a module's kernel_path, or the Route `fast_path` resolved from it


def _product(x2: torch.Tensor, mm: Masked, bias: torch.Tensor | None, route: policy.Route) -> torch.Tensor:
    """``x2 (T, cols) -> (T, rows)`` (+ bias) in x's dtype."""
    path = policy.masked_path(x2.shape[0], route)
    if path == "gemv":
        return masked.matmul_gemv(x2, mm, bias, policy.SERIAL_BYTES, route.isa)
    dtype = policy.gemm_dtype(x2.dtype, x2.shape[0])
    return _bias(masked.matmul_panels(x2.to(dtype), mm, policy.PANEL_ROWS, path == "panel", route.isa).to(x2.dtype),
                 bias)


def _bias(y: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return y if bias is None else y + bias.to(y.dtype)


def masked_linear(x: torch.Tensor, mm: Masked, bias: torch.Tensor | None = None,
                  module_path: Request = None) -> torch.Tensor:
    """``x (..., in) -> (..., out)`` for W ``(out, in)`` in runtime form ``mm``."""
    y = _product(x.reshape(-1, mm.cols), mm, bias, policy.route(module_path))
    return y.reshape(*x.shape[:-1], mm.rows)


def _dense(x2: torch.Tensor, At: torch.Tensor, bias: torch.Tensor | None, route: policy.Route) -> torch.Tensor:
    """``x2 (T, n) @ At.T (+ bias)`` for a contiguous ``At (m, n)``: the C++ bf16 GEMV for few tokens, the C++
    per-thread GEMMs for more (`policy.dense_path`), else ``torch.mv`` per token up to `policy.MV_MAX_TOKENS`,
    else one GEMM (in `policy.gemm_dtype`, cast back)."""
    stored, At = At, At if At.dtype == x2.dtype else At.to(x2.dtype)
    path = policy.dense_path(x2, At, route)
    if path == "gemv":
        return _build.loaded().dense_gemv(x2, At, bias, policy.SERIAL_BYTES, route.isa)
    if path == "panel":
        return _bias(_build.loaded().dense_panels_mm(x2, At), bias)
    T = x2.shape[0]
    dtype = policy.gemm_dtype(x2.dtype, T)
    if dtype != x2.dtype:  # from the stored factor: one conversion, no rounding through x2's dtype
        return F.linear(x2.to(dtype), stored.to(dtype), None if bias is None else bias.to(dtype)).to(x2.dtype)
    if T <= policy.MV_MAX_TOKENS:
        y = torch.stack([torch.mv(At, row) for row in x2]) if T > 1 else torch.mv(At, x2[0]).unsqueeze(0)
        return _bias(y, bias)
    return F.linear(x2, At, None if bias is None else bias.to(x2.dtype))


def _dense_gemv(x2: torch.Tensor, f: torch.Tensor | Masked, route: policy.Route) -> bool:
    """Whether ``x2 @ fᵀ`` runs the C++ dense GEMV as it is (a bf16 tensor factor, no cast)."""
    return not isinstance(f, Masked) and policy.dense_path(x2, f, route) == "gemv"


def _factor(x2: torch.Tensor, f: torch.Tensor | Masked, bias: torch.Tensor | None,
            route: policy.Route) -> torch.Tensor:
    """``x2 (T, n) @ fᵀ (+ bias)`` for a row-major factor ``f (m, n)``: a contiguous tensor or a `Masked` form."""
    return _product(x2, f, bias, route) if isinstance(f, Masked) else _dense(x2, f, bias, route)


def lowrank_linear(x: torch.Tensor, Ut: torch.Tensor | Masked, Vt: torch.Tensor | Masked,
                   bias: torch.Tensor | None = None, module_path: Request = None) -> torch.Tensor:
    """``x (..., in) -> (..., out)`` = (x U) V + b from ``Uᵀ (r, in)``, ``Vᵀ (out, r)`` (`_factor`)."""
    route, x2 = policy.route(module_path), x.reshape(-1, Ut.shape[1])
    if _dense_gemv(x2, Ut, route) and _dense_gemv(x2, Vt, route):  # both C++ GEMVs, in one call
        y = _build.loaded().dense_dense_gemv(x2, Ut, Vt, bias, policy.SERIAL_BYTES, route.isa)
    else:
        y = _factor(_factor(x2, Ut, None, route), Vt, bias, route)  # (T, in) -> (T, r) -> (T, out)
    return y.reshape(*x.shape[:-1], Vt.shape[0])


def dict_linear(x: torch.Tensor, Dt: torch.Tensor | Masked, mm: Masked, bias: torch.Tensor | None = None,
                module_path: Request = None) -> torch.Tensor:
    """``x (..., in) -> (..., out)`` = (x D) S + b, ``Dᵀ (k, in)`` (`_factor`), S given as Sᵀ ``(out, k)`` in
    form ``mm``."""
    route, x2 = policy.route(module_path), x.reshape(-1, Dt.shape[1])
    if _dense_gemv(x2, Dt, route) and policy.masked_path(x2.shape[0], route) == "gemv":  # one call
        y = masked.dense_then_gemv(x2, Dt, mm, bias, policy.SERIAL_BYTES, route.isa)
    else:
        y = _product(_factor(x2, Dt, None, route), mm, bias, route)  # (T, in) -> (T, k) -> (T, out)
    return y.reshape(*x.shape[:-1], mm.rows)


_relaid: dict[int, tuple[weakref.ref, weakref.ref]] = {}


def colmajor(t: torch.Tensor) -> torch.Tensor:
    """The same matrix with column-major storage (``t.t()`` contiguous), same bytes: the GEMV over ``t.t()``
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
