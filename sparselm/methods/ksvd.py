"""K-SVD dictionary update with the support fixed (Aharon, Elad & Bruckstein 2006), rank-1 steps by power
iteration ("approximate K-SVD", Rubinstein et al. 2008), batched over blocks of atoms.

Objective: min ``‖Y − D S‖_F²`` over ``D`` ``(n, k)`` (unit-norm atoms) and the values of ``S`` ``(k, cols)``
on its fixed support ``mask``. Sequential K-SVD visits atom ``i``: with ``Ω_i`` the columns that use it and
``E_i = R[:, Ω_i] + d_i s_i`` the residual without its contribution, it replaces ``(d_i, s_i)`` by the best
rank-1 approximation of ``E_i`` (power iterations started from ``d_i``) and updates ``R`` before the next atom.

Here a *block* of ``B`` atoms takes that step simultaneously against the same residual (block-Jacobi): the
power iterations of the whole block are two dense GEMMs each, ``uᵀR`` and ``R vᵀ``, masked to the support.
``B = 1`` is exactly sequential K-SVD; ``B = k`` is a fully simultaneous update. A simultaneous update can
overshoot where atoms share columns, so each block's step is accepted only if the objective does not grow;
otherwise the block is split in two and each half is retried against the updated residual (down to single
atoms, where the step is the exact K-SVD step, and a single-atom step that would increase the objective is
dropped: the previous atom is kept). The objective therefore never increases.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

DEFAULT_BLOCKS = 16  # the default block size is ceil(k / DEFAULT_BLOCKS)


@dataclass
class DictUpdate:
    """Result of one K-SVD sweep: new ``D`` ``(n, k)``, ``S`` ``(k, cols)`` (zeros off the support)."""
    D: torch.Tensor
    S: torch.Tensor
    objective_before: float  # ‖Y − D S‖² before the sweep
    objective_after: float   # ... and after (tracked incrementally; never larger)
    splits: int              # blocks whose simultaneous step was rejected and split


def ksvd_update(Y: torch.Tensor, D: torch.Tensor, S: torch.Tensor, mask: torch.Tensor, power_iters: int = 8,
                block_size: int | None = None) -> DictUpdate:
    """One K-SVD sweep over all atoms in blocks of ``block_size`` (default ``ceil(k/16)``)."""
    k = D.shape[1]
    B = block_size or -(-k // DEFAULT_BLOCKS)
    D, S = D.clone(), S.clone() * mask
    R = Y - D @ S  # (n, cols)
    before = _sq(R)
    state = {"obj": before, "splits": 0, "R": R}
    for start in range(0, k, B):
        _update_block(Y, D, S, mask, torch.arange(start, min(k, start + B), device=D.device), power_iters, state)
    return DictUpdate(D, S, before, state["obj"], state["splits"])


def _sq(R: torch.Tensor) -> float:
    return float(R.double().square().sum())


def _update_block(Y, D, S, mask, atoms: torch.Tensor, power_iters: int, state: dict) -> None:
    """Simultaneous rank-1 step for ``atoms``, accepted if the objective does not grow, else split."""
    R = state["R"]
    Db, Sb, Mb = D[:, atoms], S[atoms], mask[atoms].to(D.dtype)  # (n, B), (B, cols), (B, cols)
    U, V = rank1_steps(R, Db, Sb, Mb, power_iters)  # (n, B), (B, cols)
    R_new = R + torch.cat([Db, -U], 1) @ torch.cat([Sb, V], 0)  # (n, cols)
    obj = _sq(R_new)
    if obj <= state["obj"]:
        D[:, atoms], S[atoms] = U, V
        state["R"], state["obj"] = R_new, obj
    elif len(atoms) > 1:
        state["splits"] += 1
        half = len(atoms) // 2
        _update_block(Y, D, S, mask, atoms[:half], power_iters, state)
        _update_block(Y, D, S, mask, atoms[half:], power_iters, state)


def rank1_steps(R: torch.Tensor, Db: torch.Tensor, Sb: torch.Tensor, Mb: torch.Tensor,
                power_iters: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank-1 approximation ``u_i v_iᵀ`` of every ``E_i = R[:, Ω_i] + d_i s_i`` of a block, all at once.

    ``R`` ``(n, cols)`` residual; ``Db`` ``(n, B)`` atoms; ``Sb`` ``(B, cols)`` their coefficients; ``Mb``
    ``(B, cols)`` their support as 0/1. Power iterations start from ``d_i``; an atom whose ``E_i`` is zero
    (unused atom) keeps ``d_i`` with zero coefficients.
    """
    def E_t(u):  # E_iᵀ u_i for every atom, on its support
        return (u.T @ R + (u * Db).sum(0).unsqueeze(1) * Sb) * Mb  # (B, cols)

    u = Db
    for _ in range(power_iters):
        v = E_t(u)  # (B, cols)
        x = R @ v.T + Db * (Sb * v).sum(1).unsqueeze(0)  # (n, B) = E_i v_i
        norm = x.norm(dim=0, keepdim=True)  # (1, B)
        u = torch.where(norm > 0, x / norm.clamp_min(torch.finfo(x.dtype).tiny), Db)
    return u, E_t(u)
