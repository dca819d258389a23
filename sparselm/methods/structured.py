"""Structured pruning: remove whole units (attention KV-head groups, MLP channels), keep dense narrower layers.

A *part* (one block's attention or MLP) has ``n`` units; unit ``u`` is a set of input columns ``cols[u]`` of
the part's output linear ``W`` ``(out, in)`` (o_proj / down_proj) and the matching output rows of its input
linears (q/k/v, gate/up), which are dead once the columns go and are dropped without any update. Both methods
score and compensate on ``W`` alone, from its input statistics (``G``, ``Σx``) on the dense model.

FLAP (An et al., "Fluctuation-based Adaptive Structured Pruning for Large Language Models", AAAI 2024,
arXiv 2312.11983). Objective: remove the columns whose output is easiest to recover by a constant:
  * metric (WIFV): ``S_j = σ_j² ‖W_:,j‖²``, the variance of input channel ``j`` times its column's squared
    norm; with the bias below, ``Σ_{j∈R} S_j`` is the output error left, up to the channels' covariance;
  * standardize each part's channel scores (z-score over its channels), a unit's score is the mean of its
    channels' (AL-AM mode);
  * one global ranking of every unit of every part, kept from the top while the bytes fit (`adaptive_keep`);
  * bias compensation: ``b = W_:,R μ_R`` (``μ`` the mean input) is added to the output linear.
Same as the reference code (github.com/CASIA-IVA-Lab/FLAP, 3bb57db): WIFV, z-scores per part, head score =
mean of channel z-scores, one global threshold, the bias from the unpruned ``W``. Different: variance and mean
are the plain per-token ones from the pipeline's statistics (the code's running estimate skips the first
sequence and is per sequence); attention channel scores are not squared before the mean (the code squares
them, the paper's figure does not); the cost of a unit is its real bytes in every linear it spans (whole KV
groups for GQA: ``(2g + 2)·d_h·d``; the code hard-codes 512/3 for LLaMA-1 MHA); the ranking is cut at the
last unit that fits the byte budget (never over it; the code cuts nearest to it); every part keeps at least
one unit (the code has no guard).

ZipLM-style OBS (Kurtic, Frantar, Alistarh, NeurIPS 2023, arXiv 2302.04089, Algorithm 1). Objective:
``min ‖X Wᵀ − X Ŵᵀ‖²`` with whole units removed. Greedy, one unit per step: remove the unit ``S`` of least
``tr(W_:,S [(H⁻¹)_SS]⁻¹ W_:,Sᵀ)`` (exactly the error increase, ``H = G + λI``), update the remaining columns
``W ← W − W_:,S [(H⁻¹)_SS]⁻¹ (H⁻¹)_S,:`` and downdate ``H⁻¹`` likewise (`obs_remove`). The steps are nested,
so one run gives every level's error; per part the levels go to the knapsack (`budget.allocate`) as options
(relative error, bytes). Same as DarwinLM's port of ZipLM (IST-DASLab/DarwinLM, src/fast_obc_struct.py):
λ = 1 % of the mean diagonal, dead inputs get ``H_jj = 1``, the batched block inverses. Different: the
allocation is our byte knapsack over the levels (ZipLM's runtime search was not published); no bias.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..budget import Option, allocate
from ..capture import LinearStats
from ..errors import InputError


@dataclass
class PartCost:
    """Bytes of a part: ``unit`` per kept unit (its rows and columns in every linear), ``fixed`` whatever stays
    whatever is kept (a bias the method adds), and ``n`` units."""
    n: int
    unit: float
    fixed: float = 0.0

    def size(self, kept: int) -> float:
        return self.fixed + kept * self.unit


# --- FLAP ----------------------------------------------------------------------------------------------
def fluctuation(W: torch.Tensor, stats: LinearStats) -> torch.Tensor:
    """FLAP's WIFV ``σ_j² ‖W_:,j‖²`` for each input channel of ``W`` ``(out, in)``: ``(in,)`` float64."""
    return stats.variance.to(W.device) * W.double().pow(2).sum(0)


def unit_scores(channel: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """Standardized unit scores ``(n,)``: the channel scores ``(in,)`` z-scored over the part's channels, then
    averaged over each unit's columns ``cols`` ``(n, width)``."""
    std = channel.std() if channel.numel() > 1 else channel.new_tensor(1.0)
    z = (channel - channel.mean()) / (std if std > 0 else 1.0)
    return z[cols].mean(1)  # (n,)


def flap_bias(W: torch.Tensor, mean: torch.Tensor, removed: torch.Tensor) -> torch.Tensor:
    """FLAP's compensation ``W_:,R μ_R`` ``(out,)``: the removed columns' mean contribution."""
    return (W.double()[:, removed] @ mean.to(W.device)[removed]).to(W.dtype)  # (out,)


def adaptive_keep(scores: list[torch.Tensor], costs: list[PartCost], budget: float) -> list[torch.Tensor]:
    """FLAP's AL-AM: bool keep-masks, one per part, over all parts' units ranked together by score (higher is
    kept first); each part keeps its best unit, then units are kept down the ranking until the next one would
    exceed ``budget`` bytes."""
    keep = [torch.zeros(s.numel(), dtype=torch.bool) for s in scores]
    used = 0.0
    for k, s, c in zip(keep, scores, costs):
        k[int(s.argmax())] = True
        used += c.size(1)
    _check_budget(used, budget)
    ranked = sorted(((float(v), p, u) for p, s in enumerate(scores) for u, v in enumerate(s.tolist())
                     if not keep[p][u]), key=lambda t: -t[0])
    for _, p, u in ranked:
        if used + costs[p].unit > budget:
            break
        keep[p][u] = True
        used += costs[p].unit
    return keep


def uniform_counts(costs: list[PartCost], kinds: list[str], budget: float) -> dict[str, int]:
    """Units every part of a kind keeps so that all blocks have the same widths (FLAP's UL-UM: the same
    fraction removed everywhere): over the attention's choices (all of its ``n + 1`` counts), the MLP keeps
    the most channels that fit ``budget``, and the pair whose kept fractions are closest wins (KV groups are
    few: a common fraction rounded down could halve the attention of a 4-group model)."""
    n = {k: c.n for k, c in zip(kinds, costs)}
    if any(c.n != n[k] for k, c in zip(kinds, costs)):
        raise InputError("uniform structured pruning needs every block to have the same widths",
                         "use structure: adaptive for this model")
    unit = {k: sum(c.unit for kk, c in zip(kinds, costs) if kk == k) for k in n}
    fixed = sum(c.fixed for c in costs)
    _check_budget(fixed + sum(unit.values()), budget)
    if len(n) == 1:
        (k,) = n
        return {k: min(n[k], math.floor((budget - fixed) / unit[k]))}
    best = None
    for a in range(1, n["attention"] + 1):
        left = budget - fixed - a * unit["attention"]
        m = min(n["mlp"], math.floor(left / unit["mlp"])) if left > 0 else 0
        if m >= 1:
            gap = abs(a / n["attention"] - m / n["mlp"])
            best = min(best or (gap, a, m), (gap, a, m))
    if best is None:
        raise InputError("structured pruning: no uniform widths fit the budget", "use a lower --ratio")
    return {"attention": best[1], "mlp": best[2]}


def _check_budget(smallest: float, budget: float) -> None:
    if smallest > budget:
        raise InputError(f"structured pruning: even one unit per attention and MLP part takes {smallest:,.0f} bytes, "
                         f"above the budget of {budget:,.0f}", "use a lower --ratio")


# --- ZipLM-style OBS -------------------------------------------------------------------------------------
def damped_hessian(stats: LinearStats, percdamp: float, device: torch.device) -> torch.Tensor:
    """``H = G/N + λI`` ``(in, in)`` float64, λ = ``percdamp`` × mean diagonal; dead inputs get ``H_jj = 1``."""
    H = stats.gram.to(device, torch.float64) / max(stats.count, 1)
    dead = H.diagonal() == 0
    H[dead, dead] = 1.0
    H.diagonal().add_(percdamp * float(H.diagonal().mean()))
    return H


@torch.no_grad()
def obs_remove(W: torch.Tensor, H: torch.Tensor, cols: torch.Tensor, n_remove: int
               ) -> tuple[torch.Tensor, list[int], list[float]]:
    """Greedily remove ``n_remove`` units (``cols`` ``(n, width)``) from ``W`` ``(out, in)`` with OBS updates.

    Returns the updated ``W`` (removed columns exactly zero), the removed units in order, and each step's
    error increase ``ΔE = tr(W_:,S [(H⁻¹)_SS]⁻¹ W_:,Sᵀ)`` in units of ``H`` (``‖X(W−Ŵ)ᵀ‖²/N`` + damping)."""
    W = W.double().clone()
    Hinv = torch.cholesky_inverse(torch.linalg.cholesky(H))  # (in, in)
    n, width = cols.shape
    alive = torch.ones(n, dtype=torch.bool, device=W.device)
    eye = torch.eye(width, dtype=W.dtype, device=W.device)
    order, losses = [], []
    for _ in range(n_remove):
        if width == 1:  # channels: the OBS/OBC formula ‖W_:,j‖² / (H⁻¹)_jj, no block inverses
            j = cols[:, 0]
            M = (1.0 / Hinv.diagonal()[j]).view(n, 1, 1)  # (n, 1, 1)
            score = W[:, j].pow(2).sum(0) * M.view(n)  # (n,)
        else:
            blocks = Hinv[cols.unsqueeze(2), cols.unsqueeze(1)]  # (n, width, width)
            blocks[~alive] = eye
            M = torch.linalg.inv(blocks)  # (n, width, width)
            Ws = W[:, cols].permute(1, 0, 2)  # (n, out, width)
            score = ((Ws @ M) * Ws).sum((1, 2))  # (n,)
        score[~alive] = torch.inf
        u = int(score.argmin())
        S, Mu = cols[u], M[u]
        W -= W[:, S] @ Mu @ Hinv[S, :]  # (out, in): zeroes W[:, S], compensates the rest
        Hinv -= Hinv[:, S] @ Mu @ Hinv[S, :]  # (in, in)
        W[:, S] = 0.0
        Hinv[S, S] = 1.0  # a removed unit's diagonal stays invertible (its score is masked anyway)
        alive[u] = False
        order.append(u)
        losses.append(float(score[u]))
    return W.float(), order, losses


def obs_update(W: torch.Tensor, H: torch.Tensor, removed: torch.Tensor) -> torch.Tensor:
    """``W`` ``(out, in)`` with the input columns ``removed`` gone and the others compensated in one step,
    ``W − W_:,R [(H⁻¹)_RR]⁻¹ (H⁻¹)_R,:``: the least-squares optimum, equal to `obs_remove`'s sequential
    updates for the same set (the objective is quadratic)."""
    W = W.double()
    Hinv = torch.cholesky_inverse(torch.linalg.cholesky(H))  # (in, in)
    if removed.numel() == 0:
        return W.float()
    W = W - W[:, removed] @ torch.linalg.solve(Hinv[removed][:, removed], Hinv[removed, :])  # (out, in)
    W[:, removed] = 0.0
    return W.float()


def ziplm_levels(W: torch.Tensor, H: torch.Tensor, cols: torch.Tensor) -> tuple[list[float], list[int]]:
    """Relative error ``ΔE / tr(W H Wᵀ)`` after removing ``0, 1, …, n−1`` units greedily (nested levels), and
    the order in which the units go."""
    _, order, losses = obs_remove(W, H, cols, cols.shape[0] - 1)
    energy = float((W.double() @ H * W.double()).sum())
    cum = torch.tensor([0.0] + losses, dtype=torch.float64).cumsum(0)
    return (cum / max(energy, 1e-300)).tolist(), order


def knapsack_keep(levels: list[list[float]], costs: list[PartCost], budget: float) -> list[int]:
    """Units each part keeps: the levels (``levels[p][r]`` = error after removing ``r``) under ``budget``
    bytes, least total relative error (`budget.allocate`)."""
    _check_budget(sum(c.size(1) for c in costs), budget)
    options = {str(p): [Option(c.size(c.n - r), e, c.n - r) for r, e in enumerate(lv)]
               for p, (lv, c) in enumerate(zip(levels, costs))}
    choice = allocate(options, budget)
    return [options[str(p)][choice[str(p)]].payload for p in range(len(costs))]
