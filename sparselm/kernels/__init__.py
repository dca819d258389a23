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


def _product(x: torch.Tensor, mm: Masked, bias: torch.Tensor | None, route: policy.Route) -> torch.Tensor:
    """``x (..., cols) -> (..., rows)`` (+ bias) in x's dtype.

    The forwards here decide their path once and hand x to one C++ call as it comes (the C++ side flattens and
    reshapes): after the previous layer's product has left the caches, every further torch call or attribute
    read of a forward costs several microseconds (docs/benchmarks/README.md, session 20)."""
    tokens = x.numel() // mm.cols
    path = policy.masked_path(tokens, route)
    if path == "gemv":
        return masked.matmul_gemv(x, mm, bias, policy.SERIAL_BYTES, route.isa)
    dtype = policy.gemm_dtype(x.dtype, tokens)
    y = masked.matmul_panels(x if dtype == x.dtype else x.to(dtype), mm, policy.PANEL_ROWS, path == "panel",
                             route.isa)
    return _bias(y if y.dtype == x.dtype else y.to(x.dtype), bias)


def _bias(y: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return y if bias is None else y + bias.to(y.dtype)


def masked_linear(x: torch.Tensor, mm: Masked, bias: torch.Tensor | None = None,
                  module_path: Request = None) -> torch.Tensor:
    """``x (..., in) -> (..., out)`` for W ``(out, in)`` in runtime form ``mm``."""
    return _product(x, mm, bias, policy.route(module_path))


def _dense(x: torch.Tensor, At: torch.Tensor, bias: torch.Tensor | None, route: policy.Route,
           path: str | None = None) -> torch.Tensor:
    """``x (..., n) @ At.T (+ bias)`` for a contiguous ``At (m, n)``: the C++ bf16 GEMV for few tokens, the C++
    per-thread GEMMs for more (`policy.dense_path`; ``path``: that path, already decided), else ``torch.mv`` per
    token up to `policy.MV_MAX_TOKENS`, else one GEMM (in `policy.gemm_dtype`, cast back)."""
    stored, At = At, At if At.dtype == x.dtype else At.to(x.dtype)
    path = path if path and At is stored else policy.dense_path(x, At, route)
    if path == "gemv":
        return _build.loaded().dense_gemv(x, At, bias, policy.SERIAL_BYTES, route.isa)
    if path == "panel":
        return _bias(_build.loaded().dense_panels_mm(x, At), bias)
    T = x.numel() // At.shape[1]
    dtype = policy.gemm_dtype(x.dtype, T)
    if dtype != x.dtype:  # from the stored factor: one conversion, no rounding through x's dtype
        return F.linear(x.to(dtype), stored.to(dtype), None if bias is None else bias.to(dtype)).to(x.dtype)
    if T <= policy.MV_MAX_TOKENS:
        x2 = x.reshape(-1, At.shape[1])
        y = torch.stack([torch.mv(At, row) for row in x2]) if T > 1 else torch.mv(At, x2[0]).unsqueeze(0)
        return _bias(y.view(*x.shape[:-1], At.shape[0]), bias)
    return F.linear(x, At, bias if bias is None or bias.dtype == x.dtype else bias.to(x.dtype))


def _factor(x: torch.Tensor, f: torch.Tensor | Masked, bias: torch.Tensor | None,
            route: policy.Route) -> torch.Tensor:
    """``x (..., n) @ fᵀ (+ bias)`` for a row-major factor ``f (m, n)``: a contiguous tensor or a `Masked` form."""
    return _product(x, f, bias, route) if isinstance(f, Masked) else _dense(x, f, bias, route)


def lowrank_linear(x: torch.Tensor, Ut: torch.Tensor | Masked, Vt: torch.Tensor | Masked,
                   bias: torch.Tensor | None = None, module_path: Request = None) -> torch.Tensor:
    """``x (..., in) -> (..., out)`` = (x U) V + b from ``Uᵀ (r, in)``, ``Vᵀ (out, r)`` (`_factor`)."""
    route = policy.route(module_path)
    if isinstance(Ut, Masked) or isinstance(Vt, Masked) or not Vt.is_contiguous():
        return _factor(_factor(x, Ut, None, route), Vt, bias, route)  # (..., in) -> (..., r) -> (..., out)
    path = policy.dense_path(x, Ut, route)  # Vt's too: the same dtype, tokens and layout
    if path == "gemv":  # both C++ GEMVs, in one call
        return _build.loaded().dense_dense_gemv(x, Ut, Vt, bias, policy.SERIAL_BYTES, route.isa)
    if path == "panel" or policy.linear_in_extension(x, Ut, route):  # both GEMMs, in one call
        return _build.loaded().dense_dense_mm(x, Ut, Vt, bias, path == "panel")
    return _dense(_dense(x, Ut, None, route, path), Vt, bias, route, path)


def dict_linear(x: torch.Tensor, Dt: torch.Tensor | Masked, mm: Masked, bias: torch.Tensor | None = None,
                module_path: Request = None) -> torch.Tensor:
    """``x (..., in) -> (..., out)`` = (x D) S + b, ``Dᵀ (k, in)`` (`_factor`), S given as Sᵀ ``(out, k)`` in
    form ``mm``."""
    route = policy.route(module_path)
    if isinstance(Dt, Masked):
        return _product(_product(x, Dt, None, route), mm, bias, route)
    path = policy.dense_path(x, Dt, route)
    if path == "gemv" and policy.masked_path(x.numel() // Dt.shape[1], route) == "gemv":  # one call
        return masked.dense_then_gemv(x, Dt, mm, bias, policy.SERIAL_BYTES, route.isa)
    return _product(_dense(x, Dt, None, route, path), mm, bias, route)  # (..., in) -> (..., k) -> (..., out)


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
