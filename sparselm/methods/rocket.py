"""ROCKET: single-step sparse factorization of one linear layer (arXiv 2602.11008, §3; methods.md §4.3).

Objective: ``min ‖X(W − Ŵ)ᵀ‖_F = ‖L(Wᵀ − U S)‖_F`` with ``Wᵀ ≈ U S``, ``U`` ``(in, k)`` dense and
``S`` ``(k, out)`` with about ``s = k/ks`` nonzeros per column, at a stored-bytes budget. No iterations:
  1. whiten: ``W_L = L Wᵀ`` ``(in, out)``; one SVD of ``W_L`` (the paper's eigh of ``W_L W_Lᵀ`` gives the
     same basis, App. B.3); basis ``B`` = top-k left singular vectors, coefficients ``C = Bᵀ W_L``;
  2. importance ``|c_ij|·‖L⁻¹ b_i‖^λ``; keep the top ``⌊k(1/ks − β)⌋`` per column (``⌊k/ks⌋`` when that
     is 0: a tiny dictionary), then re-activate the
     ``refill·k·out`` masked entries of largest ``|c_ij|·‖L⁻¹ b_i‖`` over the whole matrix;
  3. ridge refit of the dictionary: ``D = argmin ‖W_L − D C_s‖² + µ‖D‖²``, ``µ = max(1e-6, 1e-3·tr(C_sC_sᵀ)/k)``
     (Cholesky); map back ``U = L⁻¹ D`` by a triangular solve.

Sizing (`rocket_size`): ``k`` is the largest dictionary size whose *real* stored bytes (`formats.dict_bytes`) — ``D`` in the model
dtype, the values in ``spec.storage`` (+ their scales for int8/int4), a 1-bit mask over ``k·out`` — fit ``(1 − ratio)`` of the dense bytes with ``nnz ≤ ⌊k·out/ks⌋``. ``k`` is clipped to
``min(in, out)`` as in the paper (no overcomplete dictionary); a clipped layer is stored *below* its target
(``info['k_clipped']``). The refill is capped so that ``nnz`` never exceeds ``⌊k·out/ks⌋`` (with
``beta == refill`` the β over-sparsification pays for it, as in the paper), so the bytes never exceed the target.

Paper vs code (methods.md §4.3–4.7, §7) and what we follow:
  * mask: the ROCKET profiler ranks by ``|c|/√σ`` with no refill and µ = 1e-8; its compressor uses the
    scheme above. We use the compressor's scheme everywhere (`sparselm.profile` calls `factorize`), so
    knapsack costs are the errors of the factorization finally applied.
  * Adam refinement (code default 100 steps): not done; the paper's single step ("no iterative optimization").
  * output selection: the code keeps the better of {raw eigenbasis / Adam, LS refit} by *weight-space*
    error. We keep the better of {basis ``B``, ridge refit} by the *whitened (functional)* error — our
    objective — so the refit never makes the result worse (``info['refit']`` says which was kept).
  * accounting: the paper counts ``in·k + nnz`` parameters (no mask, no indices); we count real bytes.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .. import formats
from ..capture import LinearStats
from ..config import RocketSpec, Storage
from ..errors import InputError
from . import SparseDict, register
from .whiten import Whitening, whiten


# --- sizing -------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RocketSize:
    k: int          # dictionary atoms
    nnz: int        # most nonzero coefficients allowed (⌊k·out/ks⌋)
    clipped: bool   # k was limited by min(in, out): the layer is stored below its target


def rocket_size(ratio: float, ks: float, in_f: int, out_f: int, store: Storage,
                dtype: torch.dtype) -> RocketSize:
    """Largest ``k`` (and its ``nnz``) whose stored bytes are ≤ ``(1 − ratio)`` of the dense bytes."""
    target = (1 - ratio) * formats.dense_bytes(out_f, in_f, dtype)

    def nnz(k: int) -> int:
        return math.floor(k * out_f / ks + 1e-9)

    free = formats.largest(lambda k: formats.dict_bytes(in_f, out_f, k, nnz(k), store, dtype) <= target,
                           int(target // formats.dictionary_bytes(in_f, 1, dtype)))  # unclipped k
    k = min(free, in_f, out_f)
    if k < 1:
        raise InputError(f"rocket: ratio {ratio} with ks={ks} leaves no room for one atom in a "
                         f"{out_f}x{in_f} layer", "lower the ratio or the ks of this layer")
    return RocketSize(k, nnz(k), free > min(in_f, out_f))


def keep_counts(size: RocketSize, out_f: int, spec: RocketSpec) -> tuple[int, int]:
    """(entries kept per column, entries refilled over the matrix); their total never exceeds ``size.nnz``."""
    k = size.k
    keep = math.floor(k * (1.0 / spec.ks - spec.beta) + 1e-9)
    if keep == 0:  # a tiny dictionary: β's over-sparsification would leave every column empty
        keep = math.floor(k / spec.ks + 1e-9)
    keep = max(0, min(keep, k, size.nnz // out_f))
    refill = min(round(spec.refill * k * out_f), size.nnz - keep * out_f, (k - keep) * out_f)
    return keep, max(0, refill)


# --- the one whitened SVD -------------------------------------------------------------------------------
@dataclass
class WhitenedSVD:
    """``W_L = L Wᵀ = U diag(sigma) Vh`` in float64; reused for every (k, ks) of a layer."""
    wh: Whitening
    WL: torch.Tensor      # (in, out)
    U: torch.Tensor       # (in, m), m = min(in, out)
    sigma: torch.Tensor   # (m,)
    Vh: torch.Tensor      # (m, out)
    _norms: torch.Tensor | None = None

    def atom_norms(self, k: int) -> torch.Tensor:
        """``‖L⁻¹ b_i‖`` of the first ``k`` basis vectors, ``(k,)`` (one triangular solve, cached)."""
        if self._norms is None or self._norms.numel() < k:
            self._norms = self.wh.unapply(self.U[:, :k]).norm(dim=0)  # (k,)
        return self._norms[:k]


def whitened_svd(W: torch.Tensor, stats: LinearStats) -> WhitenedSVD:
    """Whiten ``W`` ``(out, in)`` with the layer's Gram and take one thin SVD."""
    wh = whiten(stats)
    WL = wh.apply(W.to(wh.L.device).T)  # (in, out) float64
    U, sigma, Vh = torch.linalg.svd(WL, full_matrices=False)  # (in, m), (m,), (m, out)
    return WhitenedSVD(wh, WL, U, sigma, Vh)


# --- one factorization ---------------------------------------------------------------------------------
@dataclass
class Factorization:
    D: torch.Tensor       # (in, k) whitened dictionary (L⁻¹ D is stored)
    C: torch.Tensor       # (k, out) coefficients, zero outside mask
    mask: torch.Tensor    # (k, out) bool
    error: float          # ‖W_L − D C‖²_F = ‖X(W − Ŵ)ᵀ‖²_F in the (shifted) Gram metric
    refit: bool           # True: D is the ridge refit; False: the basis B was better
    mu: float


def sparse_mask(C: torch.Tensor, norms: torch.Tensor, keep: int, refill: int, lam: float) -> torch.Tensor:
    """Two-stage mask of ``C`` ``(k, out)``: top ``keep`` per column by ``|c|·n^λ``, then ``refill`` by ``|c|·n``."""
    mask = torch.zeros(C.shape, dtype=torch.bool, device=C.device)  # (k, out), contiguous
    if keep > 0:
        imp = C.abs() * norms.unsqueeze(1) ** lam  # (k, out)
        mask.scatter_(0, imp.topk(keep, dim=0).indices, True)
    if refill > 0:
        score = (C.abs() * norms.unsqueeze(1)).masked_fill(mask, -math.inf).reshape(-1)  # (k*out,)
        mask.view(-1)[score.topk(refill).indices] = True
    return mask


def ridge_refit(WL: torch.Tensor, Cs: torch.Tensor) -> tuple[torch.Tensor, float]:
    """``argmin_D ‖W_L − D C_s‖² + µ‖D‖²`` by Cholesky; ``W_L`` ``(in, out)``, ``C_s`` ``(k, out)`` -> ``(in, k)``."""
    A = Cs @ Cs.T  # (k, k)
    k = A.shape[0]
    mu = max(1e-6, 1e-3 * float(A.diagonal().sum()) / k)
    chol = torch.linalg.cholesky(A + mu * torch.eye(k, dtype=A.dtype, device=A.device))
    return torch.cholesky_solve(Cs @ WL.T, chol).T, mu  # (k, in) -> (in, k)


def factorize(svd: WhitenedSVD, k: int, keep: int, refill: int, lam: float, refit: bool = True) -> Factorization:
    """ROCKET steps 1–3 at dictionary size ``k`` with the given kept/refilled counts."""
    B = svd.U[:, :k]  # (in, k)
    C = svd.sigma[:k].unsqueeze(1) * svd.Vh[:k]  # (k, out) = Bᵀ W_L
    mask = sparse_mask(C, svd.atom_norms(k), keep, refill, lam)
    Cs = C * mask  # (k, out)
    # B orthonormal: ‖W_L − B C_s‖² = (energy outside B) + (dropped coefficients)
    raw_err = float((svd.sigma[k:] ** 2).sum() + (C * ~mask).pow(2).sum())
    if not refit or keep * Cs.shape[1] + refill == 0:
        return Factorization(B, Cs, mask, raw_err, False, 0.0)
    D, mu = ridge_refit(svd.WL, Cs)
    err = float((svd.WL - D @ Cs).pow(2).sum())
    if err <= raw_err:
        return Factorization(D, Cs, mask, err, True, mu)
    return Factorization(B, Cs, mask, raw_err, False, mu)


def to_result(svd: WhitenedSVD, fac: Factorization, spec: RocketSpec, size: RocketSize) -> SparseDict:
    U = svd.wh.unapply(fac.D).float()  # (in, k): L⁻¹ D
    info = {"whitening_shift": svd.wh.shift, "k": size.k, "ks": spec.ks, "nnz": int(fac.mask.sum()),
            "k_clipped": size.clipped, "refit": fac.refit, "mu": fac.mu,
            "whitened_rel_error": fac.error / max(float((svd.sigma ** 2).sum()), 1e-300)}
    return SparseDict(U, fac.C.float(), fac.mask, spec.store, info)


@register(RocketSpec)
def rocket(W: torch.Tensor, stats: LinearStats | None, spec: RocketSpec, dtype: torch.dtype) -> SparseDict:
    """Compress ``W`` ``(out, in)`` to a `SparseDict` whose stored bytes fit ``spec.target`` in ``dtype``."""
    if stats is None:
        raise InputError("method 'rocket' got no calibration statistics for this layer",
                         "run it with calibration data (--calib)")
    out_f, in_f = W.shape
    size = rocket_size(spec.target.value, spec.ks, in_f, out_f, spec.store, dtype)
    svd = whitened_svd(W, stats)
    keep, refill = keep_counts(size, out_f, spec)
    return to_result(svd, factorize(svd, size.k, keep, refill, spec.lam), spec, size)
