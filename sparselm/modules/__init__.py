"""Compressed linear layers, one file per format (`sparse`, `lowrank`, `dictionary`; what they share in `base`).
Each stores only what it needs, in documented buffers, and has a plain reference ``forward`` that is exact (it
rebuilds the weight it represents and calls ``F.linear``).

All three compute ``Y = X Wᵀ + b`` for a weight ``W`` ``(out, in)`` they represent:
  * `SparseLinear`      W with zeros: nonzero values + a packed bitmask, or N:M values + packed indices.
  * `LowRankLinear`     Wᵀ = U V, U ``(in, r)``, V ``(r, out)``: two dense products.
  * `SparseDictLinear`  Wᵀ = D S, D ``(in, k)`` dense, S ``(k, out)`` column-sparse: values + bitmask.

Buffers are kept in their storage dtype; ``forward`` computes in the input's dtype. Each class owns its
size: ``weight_bytes`` is its format's formula in `formats` (from shapes and ``nnz``, nothing unpacked), equal
to the bytes of its buffers, what `io.save` writes; ``params`` and ``paper_params`` are its counts in the
other two conventions (DESIGN.md). Each class builds itself from a method's result (``from_result``: a plain
dataclass of tensors from `sparselm.methods`, read by its fields; this package imports nothing above it).
A layer also carries what it was made from: ``spec`` (the method spec), ``info`` (the method's record) and
``group`` (the qualified names of the layers sharing its dictionary, itself included; empty when it owns
it alone), which its manifest entry records (`io.layer_entry`).

``forward`` runs a fast path from `sparselm.kernels` on CPU (it reads a runtime form built on first use:
row offsets, an N:M mask as bitmask, column-major factors; counted by ``resident_bytes``, never a dense
copy); ``reference_forward`` is the plain twin, also taken for gradients, other devices, inside
`dense_cache`, and when ``kernel_path = "reference"`` (see `reference_forwards`).
"""
from .base import MODULE_CLASSES, NARROWED, CompressedLinear, Narrowed, dense_cache, mark_narrowed, narrowed_of, \
    reference_forwards
from .dictionary import SparseDictLinear
from .lowrank import LowRankLinear
from .sparse import SparseLinear

__all__ = ["MODULE_CLASSES", "NARROWED", "CompressedLinear", "LowRankLinear", "Narrowed", "SparseDictLinear",
           "SparseLinear", "dense_cache", "mark_narrowed", "narrowed_of", "reference_forwards"]
