"""GEMM-only sparse coding: hard-thresholding pursuit with refits (Foucart 2011, "Hard thresholding pursuit:
an algorithm for compressive sensing"; the step size of Blumensath & Davies' normalized IHT, 2010).

Problem, for every column ``y`` of ``Y`` ``(n, cols)``: min ``‖y − D γ‖₂²`` over ``γ`` with exactly ``s``
nonzeros, the same as `omp` (exact Batch-OMP, the reference this coder is tested against). With ``G = DᵀD``
``(k, k)`` and ``B = DᵀY`` ``(k, cols)`` the objective is ``f(γ) = γᵀGγ − 2bᵀγ`` (+ ``‖y‖²``), and every step
below is one dense ``(k, k) × (k, cols)`` product for all columns at once, so it runs at matrix-multiply speed
(tensor cores on a GPU), ``k²`` per column and round, not OMP's memory-bound ``k·s²/2``:

  * start: thresholded least squares (``G x = B`` by Cholesky, keep the ``s`` largest ``|x|`` per column);
    given ``warm = (S, mask)`` (e.g. the last dictionary update's), per column the better of the two;
  * ``cg_steps`` conjugate-gradient steps on the support (masked products ``M ⊙ (G (M ⊙ P))``): the
    least-squares values on the support, approximately;
  * then ``rounds`` times: a gradient step ``z = γ + μ (B − Gγ)``, keep the ``s`` largest ``|z|`` per column
    as the new support, refit by CG there. ``μ`` alternates ``STEPS`` = 2, 1 (over the mean atom norm²):
    measured, a fixed step beats the exact line search ``‖g‖²/gᵀGg`` (which stalls at fixed points: 13 of
    200 planted 4-sparse codes missed, none with ``μ = 1``) and saves its product; the long step swaps more
    atoms on structured data, the short one is safer on random data; each column keeps its best round.

Each column keeps the best ``(support, values)`` it has seen (``f`` is read off the tracked ``Gγ`` at no extra
product), so the result is never worse than its start (warm-started, coding never undoes a dictionary update;
CoSpaDi nevertheless restarts cold every iteration: measured better over a whole run). ``Gγ`` is tracked through the CG recurrences and recomputed once per round (float32 drift).
Rounds and CG steps are set by measurement (docs/methods.md, Speed). Exactly ``s`` atoms per column, some
possibly with value 0 (as OMP's frozen atoms). Runs on the device and in the dtype of its inputs.
"""
from __future__ import annotations

import torch

from .omp import Codes

ROUNDS = 4      # support-changing rounds after the start (measured: docs/methods.md, Speed)
CG_STEPS = 8    # conjugate-gradient steps per refit
STEPS = (2.0, 1.0)  # gradient step sizes, alternating by round (unit-norm atoms; measured, see docs)


def htp(D: torch.Tensor, Y: torch.Tensor, s: int, rounds: int = ROUNDS, cg_steps: int = CG_STEPS,
        warm: tuple[torch.Tensor, torch.Tensor] | None = None) -> Codes:
    """Exactly-``s``-sparse codes of ``Y`` ``(n, cols)`` over ``D`` ``(n, k)``; ``warm`` = ``(S, mask)``
    ``(k, cols)`` to start from (its support must have ``s`` atoms per column)."""
    G, B = D.T @ D, D.T @ Y  # (k, k), (k, cols)
    return htp_gram(G, B, s, rounds, cg_steps, warm)


def htp_gram(G: torch.Tensor, B: torch.Tensor, s: int, rounds: int = ROUNDS, cg_steps: int = CG_STEPS,
             warm: tuple[torch.Tensor, torch.Tensor] | None = None) -> Codes:
    """HTP from the Gram ``G = DᵀD`` ``(k, k)`` and ``B = DᵀY`` ``(k, cols)``."""
    k, cols = B.shape
    if not 1 <= s <= k:
        raise ValueError(f"htp: sparsity s={s} must be between 1 and the number of atoms k={k}")
    x, mask = _keep_largest(_least_squares(G, B), s)
    x, Gx = _cg(G, B, x, mask, cg_steps)
    best_f = _objective(x, Gx, B)  # (cols,)
    if warm is not None:  # the better of the cold and the warm start, per column
        if not bool((warm[1].sum(0) == s).all()):
            raise ValueError(f"htp: the warm-start support must have exactly s={s} atoms per column")
        wmask = warm[1].to(B)
        xw, Gxw = _cg(G, B, warm[0].to(B) * wmask, wmask, cg_steps)
        fw = _objective(xw, Gxw, B)
        take = fw < best_f
        x, Gx, mask = torch.where(take, xw, x), torch.where(take, Gxw, Gx), torch.where(take, wmask, mask)
        best_f = torch.minimum(fw, best_f)
    best_x, best_mask = x, mask
    scale = float(G.diagonal().mean().clamp_min(torch.finfo(G.dtype).tiny))  # 1 for unit-norm atoms
    for rnd in range(rounds):
        g = B - Gx  # (k, cols): minus half the gradient
        x, mask = _keep_largest(g.mul_(STEPS[rnd % len(STEPS)] / scale).add_(x), s)
        x, Gx = _cg(G, B, x, mask, cg_steps)
        f = _objective(x, Gx, B)  # (cols,)
        better = f < best_f
        best_x = torch.where(better, x, best_x)
        best_mask = torch.where(better, mask, best_mask)
        best_f = torch.minimum(f, best_f)
    idx = best_mask.T.nonzero()[:, 1].view(cols, s)  # (cols, s) ascending atom order
    return Codes(idx, best_x.T.gather(1, idx))


def _least_squares(G: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """``x`` ``(k, cols)`` with ``(G + εI) x = B``, ``ε`` a small ridge that keeps Cholesky defined when
    ``k > n`` or atoms repeat."""
    k = G.shape[0]
    eps = 1e-6 * float(G.diagonal().mean().clamp_min(torch.finfo(G.dtype).tiny))
    eye = torch.eye(k, dtype=G.dtype, device=G.device)
    for _ in range(6):
        chol, info = torch.linalg.cholesky_ex(G + eps * eye)
        if int(info) == 0:
            return torch.cholesky_solve(B, chol)  # (k, cols)
        eps *= 100
    return B / G.diagonal().clamp_min(torch.finfo(G.dtype).tiny).unsqueeze(1)  # (k, cols) correlations


def _keep_largest(z: torch.Tensor, s: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``s`` largest ``|z|`` of every column: values ``(k, cols)`` zero elsewhere, and the 0/1 mask."""
    idx = z.abs().topk(s, dim=0, sorted=False).indices  # (s, cols)
    mask = torch.zeros_like(z).scatter_(0, idx, 1.0)  # (k, cols)
    return z * mask, mask


def _objective(x: torch.Tensor, Gx: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """``‖y − Dx‖² − ‖y‖² = xᵀGx − 2bᵀx`` per column ``(cols,)``."""
    return _dots(x, Gx - 2 * B)


def _cg(G: torch.Tensor, B: torch.Tensor, x: torch.Tensor, mask: torch.Tensor,
        steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``steps`` CG steps on ``G[I, I] x_I = B_I`` per column (``I`` = the column's support), from ``x``;
    returns ``x`` and ``G x`` (full, off the support too), both ``(k, cols)``."""
    tiny = torch.finfo(B.dtype).tiny
    Gx = G @ x  # (k, cols)
    r = (B - Gx).mul_(mask)  # (k, cols) residual on the support
    p, rr = r.clone(), _dots(r, r)  # (k, cols), (cols,)
    x = x.clone()
    for _ in range(steps):
        Gp = G @ p  # (k, cols) full product: its off-support part keeps Gx exact
        pAp = _dots(p, Gp)  # (cols,)
        alpha = torch.where(pAp > tiny, rr / pAp.clamp_min(tiny), torch.zeros_like(rr))  # (cols,)
        x.addcmul_(p, alpha)
        Gx.addcmul_(Gp, alpha)
        r.addcmul_(Gp.mul_(mask), alpha, value=-1.0)
        rr_new = _dots(r, r)
        p.mul_(rr_new / rr.clamp_min(tiny)).add_(r)
        rr = rr_new
    return x, Gx


def _dots(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Column-wise dot products ``(cols,)`` of two ``(k, cols)`` tensors."""
    return (a * b).sum(0)
