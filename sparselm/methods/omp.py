"""Batched Orthogonal Matching Pursuit: Batch-OMP (Rubinstein, Zibulevsky & Elad 2008, "Efficient
implementation of the K-SVD algorithm using Batch Orthogonal Matching Pursuit").

Problem, for every column ``y`` of ``Y`` ``(n, cols)``: min ``‖y − D γ‖₂`` over ``γ`` with exactly ``s``
nonzeros, greedily: pick the atom most correlated with the residual, refit all coefficients on the support by
least squares, repeat ``s`` times.

Batch-OMP never forms residuals: with ``G = DᵀD`` and ``α⁰ = DᵀY`` precomputed, the correlations are
``α = α⁰ − G γ``. The least-squares refit uses an incrementally grown inverse Cholesky factor
``M = L⁻¹`` of ``G[I, I] = L Lᵀ`` (lower): for a new atom ``a``, ``w = M g`` with ``g = G[I, a]``,
``δ = √(G_aa − ‖w‖²)``, new row ``[−wᵀM/δ, 1/δ]``; the new orthogonalized coefficient is ``c = α_a/δ`` and
``γ += c · (new row of M)``. Every column of a chunk runs these steps together as tensor ops (batched
matrix-vector products and one GEMM ``Γ G`` per step); there is a Python loop over the ``s`` steps only.

Exactly ``s`` atoms per column: if the residual vanishes early (or a chosen atom lies numerically in the span
of the support, ``δ² ≤ tol·G_aa``), OMP keeps picking atoms; such an atom is *frozen*: coefficient 0 and it
is treated as orthogonal to the others, which leaves the least-squares fit on the support exact (the atom
adds nothing to the span). Zero-valued coefficients inside the support are therefore possible.

Atoms need not be unit-norm: selection uses ``|α_a|/‖d_a‖``; zero atoms are never useful and get frozen.
Runs on the device of its inputs; internal math in float32 by default (``dtype=torch.float64`` available).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

MAX_BYTES = 1 << 30  # working memory per chunk of columns


@dataclass
class Codes:
    """Sparse codes: column ``j`` uses atoms ``idx[j]`` ``(cols, s)`` with values ``val[j]`` ``(cols, s)``."""
    idx: torch.Tensor
    val: torch.Tensor

    def dense(self, k: int) -> torch.Tensor:
        """``S`` ``(k, cols)`` with the values scattered (zeros elsewhere)."""
        cols = self.idx.shape[0]
        S = torch.zeros(cols, k, dtype=self.val.dtype, device=self.val.device)
        return S.scatter_(1, self.idx, self.val).T.contiguous()  # (k, cols)

    def mask(self, k: int) -> torch.Tensor:
        """Support ``(k, cols)`` bool: exactly ``s`` True per column."""
        cols = self.idx.shape[0]
        m = torch.zeros(cols, k, dtype=torch.bool, device=self.idx.device)
        return m.scatter_(1, self.idx, True).T.contiguous()  # (k, cols)


def omp(D: torch.Tensor, Y: torch.Tensor, s: int, dtype: torch.dtype = torch.float32,
        max_bytes: int = MAX_BYTES) -> Codes:
    """Exactly-``s``-sparse codes of ``Y`` ``(n, cols)`` over the dictionary ``D`` ``(n, k)``."""
    D, Y = D.to(dtype), Y.to(dtype)
    return omp_gram(D.T @ D, D.T @ Y, s, dtype, max_bytes)  # (k, k), (k, cols)


def omp_gram(G: torch.Tensor, DtY: torch.Tensor, s: int, dtype: torch.dtype = torch.float32,
             max_bytes: int = MAX_BYTES) -> Codes:
    """Batch-OMP from the Gram ``G = DᵀD`` ``(k, k)`` and ``DᵀY`` ``(k, cols)``, chunked over columns."""
    k, cols = DtY.shape
    if not 1 <= s <= k:
        raise ValueError(f"omp: sparsity s={s} must be between 1 and the number of atoms k={k}")
    G, DtY = G.to(dtype), DtY.to(dtype)
    per_col = (s * s + 6 * k + 2 * s) * torch.finfo(dtype).bits // 8
    chunk = max(1, min(cols, max_bytes // per_col))
    idx = torch.empty(cols, s, dtype=torch.long, device=G.device)
    val = torch.empty(cols, s, dtype=dtype, device=G.device)
    for start in range(0, cols, chunk):
        stop = min(cols, start + chunk)
        idx[start:stop], val[start:stop] = _omp_chunk(G, DtY[:, start:stop].T.contiguous(), s)
    return Codes(idx, val)


def _omp_chunk(G: torch.Tensor, A0: torch.Tensor, s: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Batch-OMP for the columns of one chunk; ``A0`` = ``(DᵀY)ᵀ`` ``(c, k)``."""
    c, k = A0.shape
    dev, dt = A0.device, A0.dtype
    tol = 1e-10 if dt == torch.float64 else 1e-5
    diag_G = G.diagonal().clone()  # (k,)
    inv_norm = torch.where(diag_G > 0, diag_G.clamp_min(1e-300).rsqrt(), torch.zeros_like(diag_G))
    rows = torch.arange(c, device=dev)
    alpha = A0.clone()  # (c, k) correlations of the residual with every atom
    chosen = torch.zeros(c, k, dtype=torch.bool, device=dev)
    idx = torch.zeros(c, s, dtype=torch.long, device=dev)
    active = torch.zeros(c, s, dtype=dt, device=dev)  # 1 for live atoms, 0 for frozen ones
    M = torch.zeros(c, s, s, dtype=dt, device=dev)  # inverse Cholesky factor of G[I, I], lower
    gam = torch.zeros(c, s, dtype=dt, device=dev)  # least-squares coefficients on the support
    for t in range(s):
        score = (alpha.abs() * inv_norm).masked_fill_(chosen, -1.0)  # (c, k)
        new = score.argmax(1)  # (c,)
        chosen[rows, new] = True
        idx[:, t] = new
        g = G[new].gather(1, idx[:, :t]) * active[:, :t]  # (c, t) = G[I, a], frozen atoms as orthogonal
        Mt = M[:, :t, :t]  # (c, t, t)
        w = torch.bmm(Mt, g.unsqueeze(2)).squeeze(2)  # (c, t)
        gaa = diag_G[new]  # (c,)
        d2 = gaa.double() - w.double().square().sum(1)  # (c,) float64: the one cancellation-prone step
        live = (d2 > tol * gaa.double()) & (gaa > 0)
        delta = torch.where(live, d2.clamp_min(1e-300).sqrt(), torch.ones_like(d2)).to(dt)  # (c,)
        w = w * live.unsqueeze(1)
        M[:, t, :t] = -torch.bmm(w.unsqueeze(1), Mt).squeeze(1) / delta.unsqueeze(1)  # (c, t)
        M[:, t, t] = 1.0 / delta
        active[:, t] = live.to(dt)
        coef = alpha[rows, new] / delta * live  # (c,) orthogonalized coefficient of the new direction
        gam[:, : t + 1] += coef.unsqueeze(1) * M[:, t, : t + 1]
        Gam = torch.zeros(c, k, dtype=dt, device=dev).scatter_(1, idx[:, : t + 1], gam[:, : t + 1])  # (c, k)
        alpha = A0 - Gam @ G  # (c, k); G symmetric
    return idx, gam
