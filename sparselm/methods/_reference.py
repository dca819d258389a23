"""Reference twin of CoSpaDi's dictionary learning (arXiv 2509.22075, Alg. 1), written plainly and slowly.

Same problem as `cospadi`: min ``‖Y − D S‖_F²`` over unit-norm ``D`` ``(n, k)`` and ``S`` ``(k, cols)`` with
exactly ``s`` nonzeros per column, ``Y = L Wᵀ``. Same inputs, sizing, initialization, whitening, rounding
and stopping rule (they are imported from `cospadi`); only the two engines differ:

* sparse coding: OMP one column at a time; at each of the ``s`` steps the coefficients on the support are
  refit with ``torch.linalg.lstsq`` and the residual is recomputed;
* dictionary update: sequential K-SVD, one atom at a time, each a rank-1 power iteration on the residual
  restricted to the columns that use the atom, the residual updated before the next atom.

Used by the tests (fast engines against this) and by ``benchmarks/factorization_speed.py`` (timings).
"""
from __future__ import annotations

import torch

from ..capture import LinearStats
from ..config import CoSpaDiSpec
from . import SparseDict
from .cospadi import Learned, alternate, factorize_group


def omp_column(D: torch.Tensor, y: torch.Tensor, s: int) -> tuple[list[int], torch.Tensor]:
    """Textbook OMP for one column ``y`` ``(n,)``: support (in pick order) and its coefficients ``(s,)``."""
    norms = D.norm(dim=0)  # (k,)
    inv = torch.where(norms > 0, 1 / norms.clamp_min(1e-30), torch.zeros_like(norms))
    support: list[int] = []
    coef = y.new_zeros(0)
    r = y.clone()
    for _ in range(s):
        score = (D.T @ r).abs() * inv  # (k,)
        score[support] = -1.0
        support.append(int(score.argmax()))
        coef = torch.linalg.lstsq(D[:, support], y.unsqueeze(1)).solution.squeeze(1)  # (t,) refit on the support
        r = y - D[:, support] @ coef
    return support, coef


def omp_reference(D: torch.Tensor, Y: torch.Tensor, s: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense codes ``S`` ``(k, cols)`` of ``Y`` ``(n, cols)`` and their support, column by column."""
    S = Y.new_zeros(D.shape[1], Y.shape[1])
    mask = torch.zeros(S.shape, dtype=torch.bool, device=S.device)
    for j in range(Y.shape[1]):
        support, coef = omp_column(D, Y[:, j], s)
        S[support, j] = coef
        mask[support, j] = True
    return S, mask


def ksvd_atom(R: torch.Tensor, D: torch.Tensor, S: torch.Tensor, mask: torch.Tensor, i: int,
              power_iters: int) -> None:
    """K-SVD step for atom ``i`` in place: best rank-1 of ``E_i = R[:, Ω_i] + d_i s_i[Ω_i]``, ``R`` updated."""
    omega = mask[i].nonzero().squeeze(1)  # (|Ω_i|,)
    if omega.numel() == 0:
        return
    d, coefs = D[:, i], S[i, omega]
    E = R[:, omega] + torch.outer(d, coefs)  # (n, |Ω_i|)
    u = d
    for _ in range(power_iters):
        x = E @ (E.T @ u)  # (n,)
        if float(x.norm()) == 0.0:
            break
        u = x / x.norm()
    v = E.T @ u  # (|Ω_i|,)
    R[:, omega] = E - torch.outer(u, v)
    D[:, i] = u
    S[i, omega] = v


def ksvd_reference(Y: torch.Tensor, D: torch.Tensor, S: torch.Tensor, mask: torch.Tensor,
                   power_iters: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One sequential K-SVD sweep over all atoms (support fixed)."""
    D, S = D.clone(), S.clone() * mask
    R = Y - D @ S  # (n, cols)
    for i in range(D.shape[1]):
        ksvd_atom(R, D, S, mask, i, power_iters)
    return D, S


def learn_reference(Y: torch.Tensor, D: torch.Tensor, s: int, iters: int, power_iters: int,
                    tol: float | None) -> Learned:
    """The same alternation as `cospadi.learn_dictionary`, with the reference engines."""
    return alternate(Y, D, iters, tol, lambda D: omp_reference(D, Y, s),
                     lambda D, S, mask: (*ksvd_reference(Y, D, S, mask, power_iters), None))


def cospadi_reference(weights: list[torch.Tensor], stats: list[LinearStats | None], spec: CoSpaDiSpec,
                      dtype: torch.dtype) -> list[SparseDict]:
    """`cospadi.cospadi` with the reference engines (same sizing, init, whitening, rounding)."""
    return factorize_group(weights, stats, spec, dtype, learner=learn_reference)
