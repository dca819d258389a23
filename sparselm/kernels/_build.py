"""The C++ extension: built on first use with `torch.utils.cpp_extension.load`, cached per source hash.

Cache: ``$SPARSELM_CACHE/kernels`` (default ``~/.cache/sparselm/kernels``). Any failure (no compiler, no
ninja, a build error) is logged once and `extension()` returns None: callers then run the pure-torch
paths. ``SPARSELM_KERNELS=torch`` skips the extension entirely.

Each kernel picks its instruction set at run time (AVX-512, AVX2 or a scalar loop: `cpu_level`); ``SPARSELM_ISA``
caps it (`isa`, read here and passed to every C++ call), so the AVX2 and scalar paths run, and are tested, on an
AVX-512 machine too. One build serves every level.
"""
from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import threading
from pathlib import Path

import torch

from ..errors import InputError

log = logging.getLogger(__name__)
_SOURCE = Path(__file__).with_name("csrc") / "masked.cpp"
_lock = threading.Lock()
_state: dict = {}


def cache_dir() -> Path:
    root = os.environ.get("SPARSELM_CACHE") or Path.home() / ".cache" / "sparselm"
    return Path(root) / "kernels"


# -fopenmp: ATen's parallel_for is a header template that runs serially unless the extension itself is built
# with OpenMP; the library it links (libgomp.so.1) is the one torch has already loaded (same soname).
_FLAGS = ["-O3", "-fopenmp"]
_LAYOUT = b"source copied into the build dir"  # in the digest: never share a directory with older layouts


def build_dir() -> Path:
    """Where this source, torch version and flags are built (a new name whenever one of them changes)."""
    digest = hashlib.sha256(_SOURCE.read_bytes() + torch.__version__.encode() + " ".join(_FLAGS).encode()
                            + _LAYOUT).hexdigest()[:12]
    return cache_dir() / f"sparselm_masked_{digest}"


def _build():
    from torch.utils import cpp_extension
    where = build_dir()
    name = where.name
    where.mkdir(parents=True, exist_ok=True)
    # torch's own build lock (a `lock` file, FileBaton) is left behind by a process killed mid-build, and then
    # every later build waits on it forever. An flock is released by the OS when its holder dies: holding one
    # while torch builds, a `lock` file found under it can only be such a leftover.
    with open(where / ".sparselm-build.lock", "w") as guard:
        fcntl.flock(guard, fcntl.LOCK_EX)
        (where / "lock").unlink(missing_ok=True)
        # Build from a copy inside the (content-addressed) build directory: ninja rebuilds whenever the
        # command changes, and a command naming this checkout's path differed between checkouts of the same
        # source (worktrees), so each one rebuilt the shared directory in turn (about 2 min under load).
        source = where / _SOURCE.name
        if not source.is_file() or source.read_bytes() != _SOURCE.read_bytes():
            source.write_bytes(_SOURCE.read_bytes())
        if not any(where.glob(f"{name}*.so")):
            log.warning("building the sparselm C++ kernels once (about 30 s) into %s", where)
        return cpp_extension.load(name=name, sources=[str(source)], build_directory=str(where),
                                  extra_cflags=_FLAGS, extra_ldflags=["-fopenmp"], verbose=False)


_UNSET = object()


def extension():
    """The compiled module, or None when it cannot be used here (then the torch fallback runs)."""
    if os.environ.get(PATH_VAR, "").lower() == "torch":
        return None
    return loaded()


def loaded():
    """`extension` without reading ``SPARSELM_KERNELS`` (for callers that resolved the path already): the hot
    path of every fast forward, so no lock once the build was tried."""
    ext = _state.get("ext", _UNSET)
    if ext is not _UNSET:
        return ext
    with _lock:
        if "ext" not in _state:
            try:
                _state["ext"] = _build()
            except Exception as e:  # no compiler, no ninja, build error: fall back, say so once
                log.warning("sparselm C++ kernels unavailable (%s: %s); using the pure-torch paths",
                            type(e).__name__, str(e).splitlines()[0] if str(e) else "")
                _state["ext"] = None
        return _state["ext"]


def available() -> bool:
    return extension() is not None


LEVELS = ("scalar", "avx2", "avx512")  # the C++ side's level numbers 0, 1, 2
PATH_VAR = "SPARSELM_KERNELS"  # the path request (`policy.requested`); "torch" skips the build
ISA_VAR = "SPARSELM_ISA"


def isa() -> int:
    """The highest kernel level allowed, as the C++ side numbers `LEVELS`: ``SPARSELM_ISA`` = ``avx512`` |
    ``avx2`` | ``scalar``, unset or empty for no cap. A cap, not a demand: each kernel runs the best path this CPU
    has at or below it (``avx512`` on an AVX2-only CPU runs AVX2)."""
    raw = os.environ.get(ISA_VAR, "").strip().lower()
    if not raw:
        return len(LEVELS) - 1
    if raw not in LEVELS:
        raise InputError(f"{ISA_VAR}={raw!r} is not a kernel instruction set",
                         f"set {ISA_VAR} to one of {', '.join(reversed(LEVELS))}, "
                         "or unset it for the best this CPU has")
    return LEVELS.index(raw)


def resolve_isa(given: int | None) -> int:
    """``given`` (a level already resolved, e.g. a `policy.Route`'s) or else `isa` from the environment."""
    return isa() if given is None else given


def cpu_level() -> str:
    """The best kernel path this CPU runs, whatever the cap: ``avx512`` (VBMI2 + BF16), ``avx2`` (AVX2 + FMA +
    F16C) or ``scalar`` (also without the extension)."""
    ext = loaded()
    return LEVELS[int(ext.cpu_level())] if ext is not None else "scalar"


def dense_level(cap: int | None = None) -> str:
    """The dense bf16 GEMV's path under the cap (`isa`): ``avx512`` (VDPBF16PS), ``avx2`` (AVX2 + FMA + F16C) or
    ``scalar`` (none: the dense factors take F.linear)."""
    return _level("dense_level", resolve_isa(cap))


def gemv_level(kind: int, group: int = 0, cap: int | None = None) -> str:
    """The masked GEMV's and unpack's path under the cap (`isa`) for a value kind (`masked.KIND`, ...) and
    quantization group."""
    return _level("gemv_level", kind, group, resolve_isa(cap))


def _level(query: str, *args: int) -> str:
    """``ext.<query>(*args)`` as a `LEVELS` name, asked once per extension and arguments: the fast forwards ask on
    every call, and a call into the extension costs microseconds."""
    ext = loaded()
    if ext is None:
        return "scalar"
    known = _state.setdefault("levels", {})
    key = (query, *args)
    if key not in known:
        known[key] = LEVELS[int(getattr(ext, query)(*args))]
    return known[key]
