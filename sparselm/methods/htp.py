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

from functools import partial

from ..device import low_precision
from .omp import Codes

ROUNDS = 4      # support-changing rounds after the start, one pass on its own (measured: docs/methods.md, Speed)
CG_STEPS = 8    # conjugate-gradient steps per refit
# Inside CoSpaDi's alternation (a cold pass every iteration, the values refit exactly at the end) fewer are
# enough: measured over whole 60-iteration runs, (2, 4) ends at or below (4, 8)'s error (docs/methods.md, Speed).
ALTERNATION_ROUNDS, ALTERNATION_CG_STEPS = 2, 4
CG_DTYPE = "auto"  # the CG steps' products for float32 inputs: `device.low_precision` (docs/methods.md, Speed)
POLISH_STEPS = 2  # float32 CG steps on the best support at the end, after low-precision CG steps
STEPS = (2.0, 1.0)  # gradient step sizes, alternating by round (unit-norm atoms; measured, see docs)


def htp(D: torch.Tensor, Y: torch.Tensor, s: int, rounds: int = ROUNDS, cg_steps: int = CG_STEPS,
        warm: tuple[torch.Tensor, torch.Tensor] | None = None, cg_dtype: torch.dtype | str | None = CG_DTYPE,
        polish: int = POLISH_STEPS) -> Codes:
    """Exactly-``s``-sparse codes of ``Y`` ``(n, cols)`` over ``D`` ``(n, k)``; ``warm`` = ``(S, mask)``
    ``(k, cols)`` to start from (its support must have ``s`` atoms per column)."""
    G, B = D.T @ D, D.T @ Y  # (k, k), (k, cols)
    return htp_gram(G, B, s, rounds, cg_steps, warm, cg_dtype, polish)


def htp_gram(G: torch.Tensor, B: torch.Tensor, s: int, rounds: int = ROUNDS, cg_steps: int = CG_STEPS,
             warm: tuple[torch.Tensor, torch.Tensor] | None = None,
             cg_dtype: torch.dtype | str | None = CG_DTYPE, polish: int = POLISH_STEPS) -> Codes:
    """HTP from the Gram ``G = DᵀD`` ``(k, k)`` and ``B = DᵀY`` ``(k, cols)``."""
    x, mask = htp_rows(G, B, s, rounds, cg_steps, warm, cg_dtype, polish)  # (cols, k)
    pos = torch.where(mask, mask.cumsum(1) - 1, s)  # (cols, k): rank of each kept atom in its row, s elsewhere
    idx = torch.empty(mask.shape[0], s + 1, dtype=torch.long, device=mask.device)
    idx.scatter_(1, pos, torch.arange(mask.shape[1], device=mask.device).expand_as(pos))
    idx = idx[:, :s]  # (cols, s) ascending atom order
    return Codes(idx, x.gather(1, idx))


def htp_dense(D: torch.Tensor, Y: torch.Tensor, s: int, rounds: int = ROUNDS, cg_steps: int = CG_STEPS,
              warm: tuple[torch.Tensor, torch.Tensor] | None = None,
              cg_dtype: torch.dtype | str | None = CG_DTYPE, polish: int = POLISH_STEPS) -> tuple[torch.Tensor, torch.Tensor]:
    """`htp` as dense ``S`` ``(k, cols)`` (zeros off the support) and its bool support ``(k, cols)``: what
    CoSpaDi's dictionary update takes, without the index round trip."""
    x, mask = htp_rows(D.T @ D, D.T @ Y, s, rounds, cg_steps, warm, cg_dtype, polish)
    return x.T, mask.T


def htp_rows(G: torch.Tensor, B: torch.Tensor, s: int, rounds: int = ROUNDS, cg_steps: int = CG_STEPS,
             warm: tuple[torch.Tensor, torch.Tensor] | None = None,
             cg_dtype: torch.dtype | str | None = CG_DTYPE, polish: int = POLISH_STEPS) -> tuple[torch.Tensor, torch.Tensor]:
    """The pursuit itself: values ``(cols, k)`` (zeros off the support) and the bool support ``(cols, k)``.

    Every ``(k, cols)`` quantity is held transposed, ``(cols, k)`` row-major: one column's coefficients are
    contiguous, so the per-column top-``s`` reads contiguous rows (2.5× faster than along dim 0 at
    k = 460) and the products are ``P G`` (``G`` symmetric)."""
    k, cols = B.shape
    if not 1 <= s <= k:
        raise ValueError(f"htp: sparsity s={s} must be between 1 and the number of atoms k={k}")
    Bt = B.T.contiguous()  # (cols, k)
    if cg_dtype == "auto":
        cg_dtype = low_precision(B.device)
    # the CG steps' products in cg_dtype (float32 inputs only); G x exact in B's dtype before and after each refit
    Gc = G.to(cg_dtype) if cg_dtype is not None and B.dtype == torch.float32 and cg_dtype != B.dtype else None
    cg = partial(_cg, G, Bt, steps=cg_steps, Gc=Gc)
    x, mask = _keep_largest(_least_squares(G, B).T.contiguous(), s)
    x, Gx = cg(x, mask)
    best_f = _objective(x, Gx, Bt)  # (cols,)
    if warm is not None:  # the better of the cold and the warm start, per column
        if not bool((warm[1].sum(0) == s).all()):
            raise ValueError(f"htp: the warm-start support must have exactly s={s} atoms per column")
        wmask = warm[1].T.to(Bt)  # (cols, k)
        xw, Gxw = cg(warm[0].T.to(Bt) * wmask, wmask)
        fw = _objective(xw, Gxw, Bt)
        take = (fw < best_f).unsqueeze(1)
        x, Gx, mask = torch.where(take, xw, x), torch.where(take, Gxw, Gx), torch.where(take, wmask, mask)
        best_f = torch.minimum(fw, best_f)
    best_x, best_mask = x, mask
    scale = float(G.diagonal().mean().clamp_min(torch.finfo(G.dtype).tiny))  # 1 for unit-norm atoms
    for rnd in range(rounds):
        z = (Bt - Gx).mul_(STEPS[rnd % len(STEPS)] / scale).add_(x)  # (cols, k): x minus a gradient step
        x, mask = _keep_largest(z, s)
        x, Gx = cg(x, mask)
        f = _objective(x, Gx, Bt)  # (cols,)
        better = (f < best_f).unsqueeze(1)
        best_x = torch.where(better, x, best_x)
        best_mask = torch.where(better, mask, best_mask)
        best_f = torch.minimum(f, best_f)
    if Gc is not None and polish > 0:  # low-precision CG leaves ~1e-3 relative value errors: refine in float32
        best_x, _ = _cg(G, Bt, best_x, best_mask, polish)  # from the best values, CG only lowers f
    return best_x, best_mask.bool()


def _least_squares(G: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """``x`` ``(k, cols)`` with ``(G + εI) x = B``, ``ε`` a small ridge that keeps Cholesky defined when
    ``k > n`` or atoms repeat."""
    k = G.shape[0]
    eps = 1e-6 * float(G.diagonal().mean().clamp_min(torch.finfo(G.dtype).tiny))
    eye = torch.eye(k, dtype=G.dtype, device=G.device)
    for _ in range(6):
        chol, info = torch.linalg.cholesky_ex(G + eps * eye)
        if int(info) == 0:  # explicit inverse, then one GEMM: 2x faster than two triangular solves with cols RHS
            return torch.cholesky_inverse(chol) @ B  # (k, cols)
        eps *= 100
    return B / G.diagonal().clamp_min(torch.finfo(G.dtype).tiny).unsqueeze(1)  # (k, cols) correlations


def _keep_largest(z: torch.Tensor, s: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``s`` largest ``|z|`` of every row of ``z`` ``(cols, k)``: values ``(cols, k)`` zero elsewhere,
    and the 0/1 mask ``(cols, k)`` (in ``z``'s dtype)."""
    a = z.abs()
    if a.dtype == torch.float32:  # the bits of a non-negative float32 order like its value: integer top-k is faster
        a = a.view(torch.int32)
    idx = a.topk(s, dim=1, sorted=False).indices  # (cols, s)
    mask = torch.zeros_like(z).scatter_(1, idx, 1.0)  # (cols, k)
    return z.mul_(mask), mask


def _objective(x: torch.Tensor, Gx: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """``‖y − Dx‖² − ‖y‖² = xᵀGx − 2bᵀx`` per row ``(cols,)`` of ``(cols, k)`` tensors."""
    return _dots(x, Gx - 2 * B)


def _cg(G: torch.Tensor, B: torch.Tensor, x: torch.Tensor, mask: torch.Tensor, steps: int,
        Gc: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``steps`` CG steps on ``G[I, I] x_I = B_I`` per row (``I`` = the row's support), from ``x``; all
    ``(cols, k)``; returns ``x`` and ``G x`` (full, off the support too).

    ``Gc``: ``G`` in a lower precision for the steps' products (``p Gc``, rounded outputs), as in
    mixed-precision iterative refinement: the residual at the start and the returned ``G x`` are exact
    products with ``G``, so only the CG direction is approximate. Without it ``G x`` is tracked through the
    recurrences (exact up to float32 drift)."""
    tiny = torch.finfo(B.dtype).tiny
    Gx = x @ G  # (cols, k)
    r = (B - Gx).mul_(mask)  # (cols, k) residual on the support
    p, rr = r.clone(), _dots(r, r)  # (cols, k), (cols,)
    x = x.clone()
    for _ in range(steps):
        Gp = p @ G if Gc is None else (p.to(Gc.dtype) @ Gc).to(B.dtype)  # (cols, k) full product
        pAp = _dots(p, Gp)  # (cols,)
        alpha = torch.where(pAp > tiny, rr / pAp.clamp_min(tiny), torch.zeros_like(rr)).unsqueeze(1)  # (cols, 1)
        x.addcmul_(p, alpha)
        if Gc is None:  # its off-support part keeps Gx exact
            Gx.addcmul_(Gp, alpha)
        r.addcmul_(Gp.mul_(mask), alpha, value=-1.0)
        rr_new = _dots(r, r)
        p.mul_((rr_new / rr.clamp_min(tiny)).unsqueeze(1)).add_(r)
        rr = rr_new
    return x, (Gx if Gc is None else x @ G)


def _dots(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise dot products ``(cols,)`` of two ``(cols, k)`` tensors."""
    return torch.linalg.vecdot(a, b, dim=1)
