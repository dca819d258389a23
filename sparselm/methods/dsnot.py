"""DSnoT: training-free mask refinement by prune-and-grow swaps (Zhang et al., ICLR 2024, arXiv 2310.08915).

Objective: after a pruning method fixed a mask, drive each output row's *expected* reconstruction error
``ε_i = Σ_j (W_ij − Ŵ_ij) μ_j`` (``μ`` the mean input, so ``ε_i`` is the mean of dense minus sparse output
``i``) towards zero by swapping one pruned weight back in and one kept weight out per step, rows in parallel.
No weight is recomputed and each row keeps its number of nonzeros (an N:M mask stays N:M), so the stored bytes
are those of the base method.

One cycle, every row still active (``|ε_i| > threshold``) at once:
  * grow: the pruned weights are ranked once by ``W_ij μ_j / σ_j^(2·var_power)`` (their contribution over the
    input's variance: a low variance means the mean speaks for every token); a row with ``ε_i > 0`` takes the
    next from the top, a row with ``ε_i < 0`` from the bottom;
  * prune, unstructured: the kept weights are ranked once by Wanda's ``|Ŵ_ij|·‖x_j‖`` and split by the sign of
    ``Ŵ_ij μ_j``; the row takes the next weight whose removal moves ``ε`` (after the growth) back towards 0.
    N:M: the kept weight of least Wanda score in the grown weight's own group of ``m`` (the pattern holds);
  * accept the swap when it lowers ``|ε_i|`` and (``exact``, the default, recipe ``refine: dsnot``) also the
    row's true error ``d_iᵀ G d_i``, ``d_i = W_i − Ŵ_i``, evaluated in O(in) per swap from ``G``
    (``refine: dsnot-mean``: the mean-based test alone); candidate pointers advance either way. A row stops when it is
    below the threshold or out of candidates; the loop ends when no row is active or after ``max_cycles``.

Same as the reference code (github.com/zyxxmu/DSnoT, HEAD 4c029df): the two rankings, the sign-split pruning
lists, the N:M same-group pruning, 50 cycles, ``var_power = 1``. Different: statistics are per token from the
pipeline's ``G`` and ``Σx`` (the code sums per 2048-token sequence; its threshold 0.1 is used here per token,
0.1 / 2048); a swap is accepted only if it lowers ``|ε_i|`` (the code's unstructured branch accepts any swap of
an active row, its N:M branch asks that ε keep its sign) and, by default, the exact row error (the research
note's "exact variant"; measured on the bundled model, Wanda 60 %: perplexity 31.05 → 30.87 with it, 31.92
with the mean test alone, docs/benchmarks/quality_bundled_dsnot.md); a regrown weight takes its *dense* value and the kept
ones keep the base method's values (SparseGPT's updated weights: the code re-scores SparseGPT without its
update); every targeted layer is refined (the code skips the MLP by default).
"""
from __future__ import annotations

import torch

from ..capture import LinearStats
from ..config import Pattern
from ..errors import InputError

MAX_CYCLES = 50
THRESHOLD = 0.1 / 2048  # per-token |ε| below which a row stops (DSnoT's 0.1 over its 2048-token sequences)
VAR_POWER = 1.0


def expected_error(W: torch.Tensor, W_hat: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """``ε = (W − Ŵ) μ`` ``(out,)``: the mean difference of dense and sparse outputs per output channel."""
    return (W - W_hat) @ mean  # (out,)


@torch.no_grad()
def dsnot(W: torch.Tensor, weight: torch.Tensor, mask: torch.Tensor, stats: LinearStats | None,
          pattern: Pattern | None = None, max_cycles: int = MAX_CYCLES, threshold: float = THRESHOLD,
          var_power: float = VAR_POWER, exact: bool = True) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Refined ``(weight, mask, info)``: ``W`` the dense ``(out, in)``, ``weight``/``mask`` the pruning result.

    ``exact``: a swap must also lower the row's true error ``dᵀ G d`` (``d = W_i − Ŵ_i``), tracked through
    ``R = D G`` in O(in) per swap (`_ExactError`); False: DSnoT's mean-based test alone."""
    if stats is None:
        raise InputError("refine: dsnot got no calibration statistics for this layer",
                         "run it with calibration data (--calib)")
    W = W.float()
    mask = mask.clone()
    W_hat = (weight.float() * mask).clone()  # (out, in)
    mu = stats.mean.to(W.device, torch.float32)  # (in,)
    var = stats.variance.to(W.device, torch.float32)  # (in,)
    norms = stats.sq_norms.to(W.device, torch.float64).clamp_min(0).sqrt().float()  # (in,)
    eps = expected_error(W, W_hat, mu)  # (out,)
    c_grow = W * mu  # (out, in): ε drops by this when (i, j) is regrown
    c_prune = W_hat * mu  # (out, in): ε rises by this when (i, j) is pruned
    rank = c_grow / var.clamp_min(1e-8 * float(var.mean()) + 1e-30).pow(var_power)  # (out, in)
    grow_order = rank.masked_fill(mask, -torch.inf).argsort(dim=1, descending=True)  # pruned first, best first
    top = torch.zeros(W.shape[0], dtype=torch.long, device=W.device)
    bottom = (~mask).sum(1) - 1
    metric = W_hat.abs() * norms  # (out, in) Wanda's score of the kept weights
    prune = _NMPrune(metric, mask, pattern) if pattern else _SignedPrune(metric, mask, c_prune)
    exact_err = _ExactError(W, W_hat, stats) if exact else None
    active = eps.abs() > threshold
    swaps = cycles = 0
    for cycles in range(1, max_cycles + 1):
        rows = active.nonzero().squeeze(1)
        if rows.numel() == 0:
            break
        e = eps[rows]
        up = e > 0
        ok = top[rows] <= bottom[rows]
        g = grow_order[rows, torch.where(up, top[rows], bottom[rows]).clamp(0, W.shape[1] - 1)]  # (rows,)
        e_grown = e - c_grow[rows, g]
        k, ok = prune.pick(rows, g, e_grown, ok)
        e_new = e_grown + c_prune[rows, k]
        accept = ok & (e_new.abs() < e.abs())
        if exact_err is not None:
            accept &= exact_err.change(rows, g, k, -W[rows, g], W_hat[rows, k]) < 0
        top[rows] += (up & ok).long()
        bottom[rows] -= (~up & ok).long()
        r, gr, kr = rows[accept], g[accept], k[accept]
        if exact_err is not None:
            exact_err.apply(r, gr, kr, -W[r, gr], W_hat[r, kr])
        mask[r, gr], W_hat[r, gr] = True, W[r, gr]
        mask[r, kr], W_hat[r, kr] = False, 0.0
        c_prune[r, gr] = W_hat[r, gr] * mu[gr]
        prune.grown(r, gr)
        eps[r] = e_new[accept]
        swaps += int(accept.sum())
        active[rows[~ok]] = False
        active[rows] &= eps[rows].abs() > threshold
    return W_hat, mask, {"dsnot_swaps": swaps, "dsnot_cycles": cycles}


class _ExactError:
    """Each row's true error ``e_i = d_iᵀ G d_i`` under swaps, through ``R = D G`` ``(out, in)`` (``D = W − Ŵ``):
    a swap changes ``d`` at two positions (``Δ_j = −W_ij`` regrown, ``Δ_k = Ŵ_ik`` pruned)."""

    def __init__(self, W: torch.Tensor, W_hat: torch.Tensor, stats: LinearStats):
        self.G = (stats.gram / max(stats.count, 1)).to(W.device, torch.float32)  # (in, in)
        self.R = (W - W_hat) @ self.G  # (out, in)

    def change(self, rows, j, k, dj, dk) -> torch.Tensor:
        """``Δe`` ``(rows,)`` of the swaps (regrow ``j``, prune ``k``) with weight changes ``dj``, ``dk``."""
        G = self.G
        return (2 * (dj * self.R[rows, j] + dk * self.R[rows, k]) + dj ** 2 * G[j, j] + dk ** 2 * G[k, k]
                + 2 * dj * dk * G[j, k])

    def apply(self, rows, j, k, dj, dk) -> None:
        self.R[rows] += dj.unsqueeze(1) * self.G[j] + dk.unsqueeze(1) * self.G[k]


class _SignedPrune:
    """Unstructured pruning candidates: kept weights by ascending Wanda score, one list per sign of their
    contribution; a row takes the next of the list whose removal lowers ε after the growth."""

    def __init__(self, metric: torch.Tensor, mask: torch.Tensor, c: torch.Tensor):
        neg, pos = mask & (c < 0), mask & (c > 0)
        self.orders = [metric.masked_fill(~s, torch.inf).argsort(dim=1) for s in (neg, pos)]  # (out, in) each
        self.counts = [neg.sum(1), pos.sum(1)]
        self.ptr = [torch.zeros_like(self.counts[0]) for _ in range(2)]

    def pick(self, rows, g, e_grown, ok):
        use_neg = e_grown >= 0  # lowering ε needs a negative contribution removed
        ptr = torch.where(use_neg, self.ptr[0][rows], self.ptr[1][rows])
        ok = ok & (ptr < torch.where(use_neg, self.counts[0][rows], self.counts[1][rows]))
        ptr = ptr.clamp(max=self.orders[0].shape[1] - 1)
        k = torch.where(use_neg, self.orders[0][rows, ptr], self.orders[1][rows, ptr])
        self.ptr[0][rows] += (use_neg & ok).long()
        self.ptr[1][rows] += (~use_neg & ok).long()
        return k, ok

    def grown(self, rows, cols):
        pass  # a regrown weight is in no pruning list (the lists hold the initially kept weights)


class _NMPrune:
    """N:M pruning candidate: the kept weight of least Wanda score in the regrown weight's group of ``m``
    (a weight regrown in this refinement is never pruned again)."""

    def __init__(self, metric: torch.Tensor, mask: torch.Tensor, pattern: Pattern):
        self.m, self.mask = pattern.m, mask  # the live mask, updated by the caller
        self.metric = metric.clone()

    def pick(self, rows, g, e_grown, ok):
        first = (g // self.m) * self.m  # (rows,) first column of the grown weight's group
        cols = first.unsqueeze(1) + torch.arange(self.m, device=g.device)  # (rows, m)
        score = self.metric[rows.unsqueeze(1), cols].masked_fill(~self.mask[rows.unsqueeze(1), cols], torch.inf)
        best = score.min(dim=1)
        return first + best.indices, ok & torch.isfinite(best.values)

    def grown(self, rows, cols):
        self.metric[rows, cols] = torch.inf
