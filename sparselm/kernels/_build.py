"""The C++ extension: built on first use with `torch.utils.cpp_extension.load`, cached per source hash.

Cache: ``$SPARSELM_CACHE/kernels`` (default ``~/.cache/sparselm/kernels``). Any failure (no compiler, no
ninja, a build error) is logged once and `extension()` returns None: callers then run the pure-torch
paths. ``SPARSELM_KERNELS=torch`` skips the extension entirely.
"""
from __future__ import annotations

import hashlib
import logging
import os
import threading
from pathlib import Path

import torch

log = logging.getLogger(__name__)
_SOURCE = Path(__file__).with_name("csrc") / "masked.cpp"
_lock = threading.Lock()
_state: dict = {}


def cache_dir() -> Path:
    root = os.environ.get("SPARSELM_CACHE") or Path.home() / ".cache" / "sparselm"
    return Path(root) / "kernels"


def _build():
    from torch.utils import cpp_extension
    digest = hashlib.sha256(_SOURCE.read_bytes() + torch.__version__.encode()).hexdigest()[:12]
    name = f"sparselm_masked_{digest}"
    where = cache_dir() / name
    where.mkdir(parents=True, exist_ok=True)
    if not any(where.glob(f"{name}*.so")):
        log.warning("building the sparselm C++ kernels once (about 30 s) into %s", where)
    return cpp_extension.load(name=name, sources=[str(_SOURCE)], build_directory=str(where),
                              extra_cflags=["-O3"], verbose=False)


def extension():
    """The compiled module, or None when it cannot be used here (then the torch fallback runs)."""
    if os.environ.get("SPARSELM_KERNELS", "").lower() == "torch":
        return None
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
