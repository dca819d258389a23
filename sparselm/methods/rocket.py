"""ROCKET: single-step sparse factorization of one linear layer (arXiv 2602.11008, §3; methods.md §4.3).

Objective: ``min ‖X(W − Ŵ)ᵀ‖_F = ‖L(Wᵀ − U S)‖_F`` with ``Wᵀ ≈ U S``, ``U`` ``(in, k)`` dense and
``S`` ``(k, out)`` with about ``s = k/ks`` nonzeros per column, at a stored-bytes budget. No iterations:
  1. whiten: ``W_L = L Wᵀ`` ``(in, out)``; one SVD of ``W_L`` (for ``in ≤ out`` the paper's eigh of
     ``W_L W_Lᵀ``, the same basis, App. B.3); basis ``B`` = top-k left singular vectors, ``C = Bᵀ W_L``;
  2. importance ``|c_ij|·‖L⁻¹ b_i‖^λ``; keep the top ``⌊k(1/ks − β)⌋`` per column (``⌊k/ks⌋`` when that
     is 0: a tiny dictionary), then re-activate the
     ``refill·k·out`` masked entries of largest ``|c_ij|·‖L⁻¹ b_i‖`` over the whole matrix;
  3. ridge refit of the dictionary: ``D = argmin ‖W_L − D C_s‖² + µ‖D‖²``, ``µ = max(1e-6, 1e-3·tr(C_sC_sᵀ)/k)``
     (Cholesky); map back ``U = L⁻¹ D`` by a triangular solve. Solved as ``D = U Z`` in the coordinates of
     the SVD's ``U`` (m ≤ in rows), its residual in closed form, the products in float32 (`WORK`), the
     per-column top-k from one sort per layer (`WhitenedSVD.ranking`): the knapsack profile runs about 35 of
     these per layer (14 ratios, a walk over 5 ks, `profile._Table.rocket`); the whole ROCKET + knapsack run is
     3.3× faster than the code of 2026-12-01 on one thread (`docs/methods.md`, ROCKET + knapsack profiling).

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

import functools
import math
from dataclasses import dataclass, field

import torch

from .. import formats
from ..capture import LinearStats, gram
from ..config import RocketSpec, Storage
from ..errors import InputError
from . import SparseDict, register, rocket_cpu
from .whiten import Whitening, whiten


# The factorization's products (mask scores, C_s C_sᵀ, C_s W_Lᵀ, the Cholesky refit) run in float32, the GEMM
# precision of CPUs and GPUs alike (half the time of float64 on CPU); the SVD, the whitening and every error sum
# stay in float64. Measured against float64 end to end: benchmarks/rocket_speed.py.
WORK = torch.float32


# --- sizing -------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RocketSize:
    k: int          # dictionary atoms
    nnz: int        # most nonzero coefficients allowed (⌊k·out/ks⌋)
    clipped: bool   # k was limited by min(in, out): the layer is stored below its target


@functools.lru_cache(maxsize=4096)
def rocket_size(ratio: float, ks: float, in_f: int, out_f: int, store: Storage,
                dtype: torch.dtype) -> RocketSize:
    """Largest ``k`` (and its ``nnz``) whose stored bytes are ≤ ``(1 − ratio)`` of the dense bytes.

    Memoized: a knapsack's profile asks for the same (ratio, ks, shape) of every layer of a shape, and the byte
    search behind it is pure Python (2.9 of 185 profiled seconds of a 30-block SmolLM2 run before)."""
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
    """``W_L = L Wᵀ = U R`` with ``R = diag(sigma) Vh = Uᵀ W_L`` in float64; reused for every (k, ks) of a layer."""
    wh: Whitening
    WL: torch.Tensor      # (in, out)
    U: torch.Tensor       # (in, m), m = min(in, out): left singular vectors, orthonormal
    sigma: torch.Tensor   # (m,) descending
    R: torch.Tensor       # (m, out) the coefficients of W_L in U: rows orthogonal, row i of norm sigma_i
    _norms: torch.Tensor | None = None
    _coeffs: torch.Tensor | None = None
    _energy: float | None = None
    _refill: torch.Tensor | None = None
    _rankings: dict = field(default_factory=dict)

    def atom_norms(self, k: int) -> torch.Tensor:
        """``‖L⁻¹ b_i‖`` of the first ``k`` basis vectors, ``(k,)`` (one triangular solve, cached)."""
        if self._norms is None or self._norms.numel() < k:
            self._norms = self.wh.unapply(self.U[:, :k]).norm(dim=0)  # (k,)
        return self._norms[:k]

    @property
    def coeffs(self) -> torch.Tensor:
        """``R`` in `WORK`: every ``C`` is its first ``k`` rows."""
        if self._coeffs is None:
            self._coeffs = self.R.to(WORK)
        return self._coeffs

    @property
    def coeff_energy(self) -> float:
        """``‖R‖²`` of `coeffs` as stored (in `WORK`), summed in float64: the closed-form residuals start from it."""
        if self._energy is None:
            self._energy = sq_norm(self.coeffs)
        return self._energy

    @property
    def refill_scores(self) -> torch.Tensor:
        """``|r_ij|·‖L⁻¹ b_i‖`` ``(m, out)`` in `WORK`, the refill stage's score: every ``C``'s are its first ``k`` rows."""
        if self._refill is None:
            self._refill = self.coeffs.abs() * self.atom_norms(self.sigma.numel()).to(WORK).unsqueeze(1)
        return self._refill

    def ranking(self, lam: float) -> "AtomRanking":
        """Per column of ``R``, its atoms by decreasing importance ``|r|·n^λ`` (one sort per layer, cached).

        The importances of ``C = R[:k]`` are the first ``k`` rows of those of ``R`` (the norms do not depend on
        ``k``), so this one ranking gives the per-column top entries at every ``k`` (`AtomRanking.top`)."""
        if lam not in self._rankings:
            m = self.sigma.numel()
            imp = self.coeffs.abs() * self.atom_norms(m).to(WORK).unsqueeze(1) ** lam  # (m, out)
            order = imp.T.contiguous().argsort(dim=1, descending=True, stable=True)  # (out, m) (sorting contiguous
            # rows: 1.7× faster than through the transposed view, same order)
            position = torch.empty_like(order).scatter_(1, order, torch.arange(m, device=order.device).expand_as(order))
            small = torch.int16 if m < 2 ** 15 else torch.int32  # half the bytes for top's compare and cumsum
            self._rankings[lam] = AtomRanking(order.to(small), position.T.to(small).contiguous())
        return self._rankings[lam]


@dataclass
class AtomRanking:
    """One layer's per-column atom ranking: ``order[j]`` the atoms of column ``j`` best first, ``(out, m)``;
    ``position[i, j]`` where atom ``i`` stands in it, ``(m, out)`` (int16 both when ``m`` allows, else int32)."""
    order: torch.Tensor
    position: torch.Tensor

    def top(self, k: int, keep: int) -> torch.Tensor:
        """``(k, out)`` bool: per column, the ``keep`` best of atoms ``0..k-1``. In column ``j`` they are the
        atoms ranked at or before ``p_j``, the position of the ``keep``-th atom below ``k`` in ``order[j]``."""
        dt = self.order.dtype
        below = (self.order < k).cumsum(1, dtype=dt)  # (out, m): atoms below k seen so far
        p = torch.searchsorted(below, torch.full((below.shape[0], 1), keep, dtype=dt, device=below.device))
        return self.position[:k] <= p.T.to(dt)  # (k, out)


def whitened_svd(W: torch.Tensor, stats: LinearStats) -> WhitenedSVD:
    """Whiten ``W`` ``(out, in)`` with the layer's Gram and take one thin SVD.

    The SVD comes from the eigendecomposition of a small ``(m, m)`` product, ``m = min(in, out)``: of ``W_L W_Lᵀ``
    when ``in ≤ out`` (q/o, gate/up), and ``R = Uᵀ W_L`` from one product (no division by ``σ``); a taller
    ``W_L`` (down_proj, k/v) is first ``Q T`` (QR), then the same on ``T``: ``U = Q U_T``, ``R = U_Tᵀ T``. Against
    LAPACK's SVD of ``W_L``, one thread, SmolLM2: 1.6–4.3× faster on the wide shapes, down_proj 114 against 151
    ms. Squaring the condition number costs accuracy only in singular values below ~1e-8 of the largest,
    directions no dictionary keeps; ``U`` is orthonormal to float64 rounding either way (no ``W_L V/σ``, which
    would divide by small ``σ``)."""
    wh = whiten(stats)
    WL = wh.apply(W.to(wh.L.device).T)  # (in, out) float64
    Q, base = (None, WL) if WL.shape[0] <= WL.shape[1] else torch.linalg.qr(WL)  # base: (m, out)
    lam, Ub = torch.linalg.eigh(gram(base.T))  # ascending, (m,), (m, m); base baseᵀ, half of the products
    Ub, sigma = Ub.flip(1), lam.flip(0).clamp_min(0).sqrt()
    return WhitenedSVD(wh, WL, Ub if Q is None else Q @ Ub, sigma, Ub.T @ base)


# --- one factorization ---------------------------------------------------------------------------------
@dataclass
class Factorization:
    basis: torch.Tensor   # (in, k) the basis B, or (in, m) the left singular vectors U when Z is set
    C: torch.Tensor       # (k, out) coefficients, zero outside mask
    mask: torch.Tensor    # (k, out) bool
    error: float          # ‖W_L − D C‖²_F = ‖X(W − Ŵ)ᵀ‖²_F in the (shifted) Gram metric
    refit: bool           # True: D is the ridge refit; False: the basis B was better
    mu: float
    Z: torch.Tensor | None = None  # (m, k) the refit in U's coordinates: D = U Z

    @property
    def D(self) -> torch.Tensor:
        """``(in, k)`` whitened dictionary (``L⁻¹ D`` is stored), float64; formed only when asked for."""
        return self.basis if self.Z is None else self.basis @ self.Z.to(self.basis.dtype)


def sparse_mask(C: torch.Tensor, norms: torch.Tensor, keep: int, refill: int, lam: float,
                ranking: AtomRanking | None = None, refill_scores: torch.Tensor | None = None) -> torch.Tensor:
    """Two-stage mask of ``C`` ``(k, out)``: top ``keep`` per column by ``|c|·n^λ``, then ``refill`` by ``|c|·n``.

    From a taller ``R`` whose first ``k`` rows are ``C`` (`WhitenedSVD`): ``ranking`` gives the top ``keep``
    without a sort or top-k per call, ``refill_scores`` the refill scores without computing them (a twin test
    checks both against the plain top-k)."""
    k = C.shape[0]
    norms = norms.to(C.dtype)
    if keep > 0 and ranking is not None:
        mask = ranking.top(k, keep)  # (k, out), contiguous
    else:
        mask = torch.zeros(C.shape, dtype=torch.bool, device=C.device)  # (k, out), contiguous
        if keep > 0:
            imp = C.abs() * norms.unsqueeze(1) ** lam  # (k, out)
            mask.scatter_(0, imp.topk(keep, dim=0).indices, True)
    if refill > 0:
        score = C.abs() * norms.unsqueeze(1) if refill_scores is None else refill_scores[:k]  # (k, out)
        mask.view(-1)[largest(score.reshape(-1), refill, mask.view(-1))] = True
    return mask


def largest(x: torch.Tensor, n: int, exclude: torch.Tensor | None = None, stride: int = 16) -> torch.Tensor:
    """Indices of the ``n`` largest entries of ``x`` (1-D) outside ``exclude`` (1-D bool, or None), as
    ``torch.where(exclude, -inf, x).topk(n)`` (the same set barring exact ties).

    For a small ``n`` (the refill: 0.5 % of the entries), a threshold from every ``stride``-th entry — the
    ``2n/stride``-th largest of the sample, so that about ``2n`` entries pass — leaves a short list to rank; if
    fewer than ``n`` pass, the plain top-k. The threshold's compare drops the excluded entries itself (no
    ``-inf`` copy of ``x``): on SmolLM2's gate_proj 3× faster than the copy + this sampled top-k."""
    def plain(v: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:  # (n,) indices into v
        return v.topk(n).indices if out is None else torch.where(out, -math.inf, v).topk(n).indices

    if x.numel() < 64 * n:
        return plain(x, exclude)
    sample = x[::stride] if exclude is None else torch.where(exclude[::stride], -math.inf, x[::stride])
    threshold = sample.topk(min(2 * n // stride + 1, sample.numel())).values[-1]
    ok = x >= threshold
    if exclude is not None:
        ok = ok > exclude  # above the threshold and not excluded
    passed = ok.nonzero().squeeze(1)  # every allowed entry ≥ the n-th largest allowed one when ≥ n pass
    if passed.numel() < n:
        return plain(x, exclude)
    return passed[x[passed].topk(n).indices]


def sq_norm(x: torch.Tensor, row: int = 1024) -> float:
    """``‖x‖²`` of a float32 ``x``: float32 norms of runs of ``row`` entries, their squares summed in float64.
    Relative error about 1e-9 on SmolLM2's coefficient matrices (float64 accumulation: 1e-13, but 15× slower;
    one float32 norm of the whole: 1e-5 to 1e-3), well below the float32 products' own rounding. On CPU with
    numba: one compiled pass summing the squares in float64 (`rocket_cpu.sq_norm`)."""
    if x.dtype == torch.float32 and rocket_cpu.usable(x):
        return rocket_cpu.sq_norm(x)
    flat = (x if x.is_contiguous() or x.dim() < 2 or not x.mT.is_contiguous() else x.mT).reshape(-1)  # a column-major x: no copy
    whole = flat.numel() - flat.numel() % row
    runs = torch.linalg.vector_norm(flat[:whole].view(-1, row), dim=1).double().square().sum()
    return float(runs) + float(torch.linalg.vector_norm(flat[whole:], dtype=torch.float64)) ** 2


def ridge_refit(R: torch.Tensor, Cs: torch.Tensor, R_energy: float | None = None
                ) -> tuple[torch.Tensor, float, float]:
    """``argmin_Z ‖R − Z C_s‖² + µ‖Z‖²`` by Cholesky; ``R`` ``(m, out)``, ``C_s`` ``(k, out)`` -> ``Z`` ``(m, k)``,
    ``µ`` and the residual ``‖R − Z C_s‖²``.

    With ``R = Uᵀ W_L`` (`WhitenedSVD.coeffs`) this is the refit ``argmin_D ‖W_L − D C_s‖² + µ‖D‖²`` in the
    coordinates of ``U``: ``D = U Z`` (the solution lies in the span of ``W_L``'s columns, and ``U`` is
    orthonormal, so residual and ridge term are the same), at ``m`` instead of ``in`` rows. The residual comes
    in closed form, without the ``(m, k) × (k, out)`` product: with ``M = C_s Rᵀ`` and ``A = C_s C_sᵀ``,
    ``Z (A + µI) = Mᵀ``, so ``‖R − Z C_s‖² = ‖R‖² − 2⟨Z, Mᵀ⟩ + ⟨Z A, Z⟩ = ‖R‖² − ⟨Z, Mᵀ⟩ − µ‖Z‖²`` (sums in
    float64; a twin test checks it against the direct evaluation). ``R_energy``: ``‖R‖²`` when the caller has it."""
    A = gram(Cs.T)  # (k, k) = C_s C_sᵀ
    k = A.shape[0]
    mu = max(1e-6, 1e-3 * float(A.diagonal().sum()) / k)
    A.diagonal().add_(mu)
    chol = torch.linalg.cholesky(A)  # L Lᵀ = A + µI
    # solved from the right, on row-major (m, k) operands: LAPACK reads them as its column-major (k, m) without a
    # transposing copy (1.4× faster than the left-side solves of (k, m) on SmolLM2's gate_proj)
    Mt = (Cs @ R.T).T  # (m, k) = Mᵀ, column-major: this product order is 8-12 % faster for SmolLM2's q / gate
    # shapes than R @ Cs.T (the solves then read it as it is), with the same values
    Yt = torch.linalg.solve_triangular(chol.T, Mt, upper=True, left=False)  # Yᵀ = Mᵀ L⁻ᵀ: ⟨Z, Mᵀ⟩ = ‖Y‖²
    Z = torch.linalg.solve_triangular(chol, Yt, upper=False, left=False)  # (m, k) = Yᵀ L⁻¹ = Mᵀ (A + µI)⁻¹
    R_energy = sq_norm(R) if R_energy is None else R_energy
    err = R_energy - sq_norm(Yt) - mu * sq_norm(Z)
    return Z, mu, max(err, 0.0)


def factorize(svd: WhitenedSVD, k: int, keep: int, refill: int, lam: float, refit: bool = True,
              many: bool = True) -> Factorization:
    """ROCKET steps 1–3 at dictionary size ``k`` with the given kept/refilled counts. ``many``: more
    factorizations of this SVD follow (the knapsack's table), so its per-layer ranking and refill scores pay off;
    a single one (the final compression) takes the plain top-k, the same mask."""
    B = svd.U[:, :k]  # (in, k)
    C = svd.coeffs[:k]  # (k, out) = Bᵀ W_L
    ranking = svd.ranking(lam) if many else None
    if ranking is not None and rocket_cpu.usable(ranking.order, svd.coeffs, svd.refill_scores):
        mask, Cs, cs_energy = rocket_cpu.masked_coefficients(ranking.order, ranking.position, svd.coeffs,
                                                             svd.refill_scores, k, keep, refill)  # one pass
    else:
        mask = (sparse_mask(C, svd.atom_norms(k), keep, refill, lam, ranking, svd.refill_scores) if many
                else sparse_mask(C, svd.atom_norms(k), keep, refill, lam))
        Cs = C * mask  # (k, out)
        cs_energy = sq_norm(Cs)
    # B orthonormal: ‖W_L − B C_s‖² = (energy outside B) + (dropped coefficients) = ‖R‖² − ‖C_s‖²
    raw_err = max(svd.coeff_energy - cs_energy, 0.0)
    if not refit or keep * Cs.shape[1] + refill == 0:
        return Factorization(B, Cs, mask, raw_err, False, 0.0)
    Z, mu, err = ridge_refit(svd.coeffs, Cs, svd.coeff_energy)
    if err <= raw_err:
        return Factorization(svd.U, Cs, mask, err, True, mu, Z)
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
    return to_result(svd, factorize(svd, size.k, keep, refill, spec.lam, many=False), spec, size)
