"""Which path a compressed layer's forward takes, from the token count and measured thresholds.

Paths: ``gemv`` (C++ bitmask GEMV, reads the compressed bytes once; for dense factors a C++ bf16 GEMV), ``panel`` (C++ unpack into cache-sized
panels + dense GEMM), ``torch`` (the same panels unpacked with torch ops; no compiler needed) and
``reference`` (the module's plain forward: rebuilds the dense weight).

Override, most specific first: a module's ``kernel_path`` attribute, then the ``SPARSELM_KERNELS``
environment variable (``auto`` | ``gemv`` | ``panel`` | ``torch`` | ``reference``). Within the C++ paths,
``SPARSELM_ISA`` (``avx512`` | ``avx2`` | ``scalar``) caps the instruction set (`_build.isa`). Thresholds come from
``benchmarks/kernel_speed.py`` on the project's CPU (docs/benchmarks/kernels.md) and can be set here.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from . import _build
from ..device import amx_cpu as amx  # module names here: tests patch them
from ..device import native_bf16_cpu as native_bf16
from ..errors import InputError

PATHS = ("auto", "gemv", "panel", "torch", "reference")
# up to this many tokens the GEMV beats unpack + GEMM (docs/benchmarks/kernels.md, "GEMV vs panels": at
# 2048x8192 and 4096x14336, bf16, 1-2 threads, the GEMV was faster at 1-8 tokens in all four sweeps and
# slower at 16 tokens in three of four)
GEMV_MAX_TOKENS = 8
# the same on a CPU with AMX (`amx`): on the Intel Xeon (docs/benchmarks/kernels_xeon.md, crossover, 1-2 threads,
# 50 % of 2048x8192 / 4096x14336) the GEMV won at 1-4 tokens (4.0 vs 4.9 ms, 12.6 vs 17.5 ms at 4) and lost at 8
# (6.1-6.2 vs 5.1 ms, 21.0-21.2 vs 18.0-19.1 ms)
GEMV_MAX_TOKENS_AMX = 4
# dense factors (low rank, dictionaries) in bf16 on a CPU with AMX (`amx`; without AMX see below): the C++ GEMV
# beats F.linear (and torch.mv) up to this many tokens, and session 13 measured the per-thread GEMMs beyond it at
# batch 8 on the Xeon (docs/benchmarks/README.md "Kernels", session 13). First set from a sweep of the 0.4
# low-rank factors of 2048x8192 at 1-8 tokens (same section: fastest runs 0.7-1.0 ms vs 2.0-2.2 ms at 1-4
# tokens on the 8192x1228 factor, even on the 1228x2048 one; at 8 tokens the medians favoured F.linear)
DENSE_GEMV_MAX_TOKENS = 4
# the same on a CPU with native bf16 products but no AMX (`native_bf16`, not `amx`): on the AMD EPYC with AVX-512 BF16
# (session 15, 2 threads, weights cycled, the 0.4 factors of the eight Llama-3.2-1B / 3-8B shapes, medians) at 8
# tokens the GEMV took 0.025-3.76 ms against 0.105-3.64 ms for `dense_panels_mm` (2048x614 0.156 vs 0.436 ms,
# 8192x983 1.08 vs 2.45; the panels ahead only on 983x8192 and 1228x4096, by 4-5 %) and F.linear 0.046-3.73 ms
# (ahead on the (rank, in) factors); the end-to-end batch-8 rows in docs/benchmarks/kernels.md measure the change
DENSE_GEMV_MAX_TOKENS_NO_AMX = 8
# the same on a CPU without native bf16 products (`native_bf16`; there F.linear in bf16 is emulated by oneDNN):
# on the AVX2-only EPYC, 2 threads, the AVX2 GEMV of 1228x2048 / 2048x1228 bf16 factors took 0.18 / 1.0 / 7.9 /
# 16 / 43 ms at 1 / 8 / 32 / 64 / 256 tokens against 0.41 / 8.0 / 20-28 / 50 / - ms for F.linear in bf16 and
# 40 / 48 / 64 ms at 32 / 64 / 256 for a float32 GEMM with the conversions; at 512 the float32 GEMM won (72-80
# vs 112 ms; one run each under a 2-core load from another job)
DENSE_GEMV_MAX_TOKENS_EMULATED = 256
# on a CPU without native bf16, bf16 products over at least this many tokens run as one float32 GEMM (operands
# converted, output cast back): 1228x2048 bf16 F.linear 28 / 53 / 376 ms at 32 / 64 / 512 tokens vs 36 / 44 /
# 80 ms in float32 with the weight conversion (AVX2-only EPYC, 2 threads)
FLOAT32_MIN_TOKENS = 64
# without the C++ GEMV: torch.mv per token instead of one GEMM up to this many tokens (0: F.linear always;
# on the AMD EPYC measured last, F.linear at M=1 streams bf16 ~2-3x faster than torch.mv)
MV_MAX_TOKENS = 0
# below this many weight bytes a decode GEMV (masked or dense) runs on one thread (0: always both threads).
# Under load (12-14 on the 2 cores, interleaved 1-token layer runs) one thread won every layer up to 4096x4096,
# but on the quiet machine the end-to-end decode of the Llama-3.2-1B-shaped model (batch 1, 2 threads, medians,
# docs/benchmarks/kernels.md "quiet recheck") was faster with both threads everywhere: low rank 0.4 1.26x vs
# 1.10x dense, dictionary 0.4 1.27x vs 1.08x, 50 % 1.47x vs 1.42x with a 16 MiB threshold. Default: 0.
SERIAL_BYTES = 0
# dense bf16 factors beyond the GEMV's tokens on a CPU with AMX (`amx`) as one single-threaded GEMM per thread over
# W's rows (C++ `dense_panels_mm`, each writing its columns of Y; measured as Yᵀ = W Xᵀ, the layout until
# 2026-12-07, at the same speed) instead of one F.linear: the 0.4 low-rank factors of the eight Llama-3.2-1B /
# 3-8B layer shapes, 2 threads, Intel Xeon (AMX), warm, medians (docs/benchmarks/README.md "Kernels", session 13):
# 0.45-0.76x dense at 512 tokens against 0.50-1.56x for two F.linear, never more than ~15 % behind one
# two-thread Yᵀ = W Xᵀ GEMM at 8-2048 tokens, which itself lost up to 2x at 384-768 tokens
DENSE_PANELS = True
# the same without AMX (native bf16, `native_bf16`): on the AMD EPYC with AVX-512 BF16 one F.linear was ahead
# (session 18, 2 threads, weights cycled, medians of 21 interleaved rounds, the 0.4 low-rank and dictionary layers
# of the eight shapes at 128 / 512 / 2048 tokens: 40 of 48 rows faster, geometric mean 0.966x the panels' time,
# 0.81-1.09x; 1B k/v low rank at 512 tokens 0.826 -> 0.728x dense, 1B k/v dictionary at 128 1.114 -> 0.907x)
DENSE_PANELS_NO_AMX = False
# rows per unpacked panel (each feeds one GEMM of M = rows): 256 measured best at 2048..14336 inputs, 512
# tokens (64-row panels were 1.7-2.6x slower, 512 rows lost the cache); fewer when a layer has few rows
# so that every thread gets a panel
PANEL_ROWS = 256


def requested(module_path: str | None) -> str:
    """The requested path: ``module_path`` (a module's ``kernel_path``) if set, else ``SPARSELM_KERNELS``."""
    path = module_path or os.environ.get(_build.PATH_VAR, "auto").lower() or "auto"
    if path not in PATHS:
        raise InputError(f"kernel path {path!r} (module kernel_path or SPARSELM_KERNELS)",
                         f"use one of {', '.join(PATHS)}")
    return path


@dataclass(frozen=True)
class Route:
    """A request resolved once per forward: the path (`requested`) and the instruction-set cap (`_build.isa`).
    The functions below and in `kernels` take one wherever they take a module's ``kernel_path``, and then read
    no environment variable and ask the extension nothing: at decode a forward's Python is part of its latency."""
    path: str
    isa: int


_routes: dict[tuple, Route] = {}
# the environment as the process holds it: on POSIX `os.environ` keeps its entries in a plain dict of bytes, read
# here in one lookup per variable (`os.environ.get` runs four Python frames: 27 µs of a decode step's forward when
# the previous layer's product has left them out of the caches, docs/benchmarks/README.md, session 20)
_ENV = getattr(os.environ, "_data", None)
_KEYS = ((_build.PATH_VAR.encode(), _build.ISA_VAR.encode()) if isinstance(_ENV, dict) and os.name == "posix"
         else None)


def _env_key(module_path: str | None) -> tuple:
    if _KEYS is None:  # no bytes dict to read (not POSIX, or another interpreter): the mapping's own lookup
        return module_path, os.environ.get(_build.PATH_VAR), os.environ.get(_build.ISA_VAR)
    return module_path, _ENV.get(_KEYS[0]), _ENV.get(_KEYS[1])


def route(module_path: "str | Route | None") -> Route:
    """``module_path`` (a module's ``kernel_path``, or a `Route` already resolved) with the environment, resolved
    and checked once per distinct request."""
    if isinstance(module_path, Route):
        return module_path
    key = _env_key(module_path)
    found = _routes.get(key)
    if found is None:
        found = _routes[key] = Route(requested(module_path), _build.isa())
    return found


def gemm_dtype(dtype: torch.dtype, tokens: int) -> torch.dtype:
    """The dtype a GEMM of ``tokens`` rows of ``dtype`` input runs in (prefill panels, dense factors): float32
    for bf16 from `FLOAT32_MIN_TOKENS` tokens on a CPU without native bf16, else ``dtype`` itself."""
    if dtype == torch.bfloat16 and tokens >= FLOAT32_MIN_TOKENS and not native_bf16():
        return torch.float32
    return dtype


def dense_panels() -> bool:
    """Whether dense bf16 factors beyond the GEMV's tokens take `dense_panels_mm` on this CPU (`DENSE_PANELS` with
    AMX, `DENSE_PANELS_NO_AMX` with native bf16 only; never without native bf16 products)."""
    return native_bf16() and (DENSE_PANELS if amx() else DENSE_PANELS_NO_AMX)


def dense_gemv_max_tokens() -> int:
    """Up to how many tokens a dense bf16 factor takes the C++ GEMV on this CPU."""
    if not native_bf16():
        return DENSE_GEMV_MAX_TOKENS_EMULATED
    return DENSE_GEMV_MAX_TOKENS if amx() else DENSE_GEMV_MAX_TOKENS_NO_AMX


def dense_path(x: torch.Tensor, weight: torch.Tensor, module_path: "str | Route | None" = None) -> str:
    """For a dense factor product ``x (..., n) @ weight.T``: ``gemv`` (C++ bf16 GEMV: AVX-512 BF16 or AVX2) up to
    the GEMV's token limit, ``panel`` beyond it where measured faster (one single-threaded GEMM per thread over the
    weight's rows, each writing its columns of the output: `dense_panels`), else ``torch`` (one F.linear)."""
    r = route(module_path)
    if r.path == "torch" or not (x.dtype == weight.dtype == torch.bfloat16) or not weight.is_contiguous():
        return "torch"
    if x.numel() // weight.shape[1] > dense_gemv_max_tokens():
        return "panel" if dense_panels() and _build.loaded() is not None else "torch"
    return "torch" if _build.dense_level(r.isa) == "scalar" else "gemv"


def linear_in_extension(x: torch.Tensor, weight: torch.Tensor, r: Route) -> bool:
    """Whether dense factor products that `dense_path` sends to one F.linear each run from the C++ extension
    instead (`dense_dense_mm`: at::linear, the same result, one trip through Python for both factors): any path but
    ``torch`` (no C++ asked for), the extension built, and x in the factor's dtype, which the GEMM runs in."""
    if r.path == "torch" or x.dtype != weight.dtype or _build.loaded() is None:
        return False
    tokens = x.numel() // weight.shape[1]
    return tokens > MV_MAX_TOKENS and gemm_dtype(x.dtype, tokens) == x.dtype


def masked_path(tokens: int, module_path: "str | Route | None" = None) -> str:
    """The path for a bitmask product over ``tokens`` rows of input."""
    path = route(module_path).path
    if path == "torch" or _build.loaded() is None:
        return "torch"
    if path != "auto":
        return path
    return "gemv" if tokens <= (GEMV_MAX_TOKENS_AMX if amx() else GEMV_MAX_TOKENS) else "panel"
