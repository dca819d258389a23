"""SparseGPT (Frantar & Alistarh 2023, "Massive Language Models Can Be Accurately Pruned in One-Shot").

Objective: choose a mask M meeting the target and new kept weights Ŵ minimizing the functional error
``‖X(W − Ŵ)ᵀ‖_F²`` (= Σ_rows (w − ŵ) H (w − ŵ)ᵀ with H = XᵀX). Columns are swept left to right; each
pruned weight's error is compensated on the not-yet-processed columns by the OBS update
``W[:, i:] -= (w_i − q_i)/[H⁻¹]_ii · [H⁻¹]_{i, i:}`` using rows of the upper Cholesky factor of H⁻¹.

Compared with the reference (IST-DASLab/sparsegpt, ``sparsegpt.py``, ``SparseGPT.fasterprune``):
  Same: dead inputs (diag H = 0) get H_ii = 1 and W[:, i] = 0; dampening ``percdamp · mean(diag H)`` on
  the diagonal; Hinv = upper Cholesky of (H + damp·I)⁻¹; blocks of ``blocksize`` columns; the
  unstructured mask of a block is chosen once at block start over the whole block's scores
  ``W² / diag(Hinv)²``; N:M chosen at the first column of every m-group from the same scores; per-column
  OBS update inside the block, then one lazy product ``Err_block @ Hinv[block, later]`` for later columns.
  Differences (deliberate):
  * H = G / count (the reference uses 2/nsamples · Σ xxᵀ with nsamples counted in sequences). A scalar
    scale of H does not change the result: the damping is relative and masks/updates are scale-free.
  * The unstructured block mask prunes *exactly* its share of the layer's pruned count (top-k, ties
    broken by `torch.topk`); the reference's ``score <= sorted[int(numel·s)]`` prunes one extra weight
    per block (more with ties). Shares are spread over blocks by cumulative rounding so the layer total
    is exact. `Ratio` targets are supported through `masks.kept_count`.
  * Pattern(n, m) keeps n of m (our meaning); the reference's ``prunen`` prunes n of m. Same for 2:4, 4:8.
  * If the Cholesky fails, the damping is raised tenfold until it succeeds and this is recorded in
    ``info`` (the reference would raise). The blocksize is rounded down to a multiple of m for N:M so
    groups never straddle blocks (the reference assumes this).
  * H / Hinv are formed in float64; the sweep runs in float32 (as the reference, without TF32 changes).
  * Storage other than the model dtype (``storage``, e.g. int4 per group of 128 inputs): kept weights are
    quantized as each column is fixed and the OBS update spreads the rounding error too (the SparseGPT paper's
    joint sparsification + GPTQ quantization, §3.5), in a second sweep (`joint_sweep`): the first prunes as
    above, the groups' parameters are fitted on its result, the second keeps its mask and rounds. (Fitting each
    group when the sweep reaches it, as the reference does, measured worse than pruning then rounding on
    correlated inputs: the updates after the fit push kept values out of the fitted range.)
"""
from __future__ import annotations

import logging
from typing import Callable

import torch

from ..capture import LinearStats
from ..config import Pattern, SparseGPTSpec
from ..errors import InputError
from . import Pruned, register
from .masks import check_pattern, kept_count, pattern_of, topk_mask
from .quantize import ColumnQuantizer

log = logging.getLogger(__name__)
MAX_DAMP_RETRIES = 8


def inverse_hessian_factor(W: torch.Tensor, stats: LinearStats, percdamp: float) -> tuple[torch.Tensor, dict]:
    """Upper Cholesky factor ``(in, in)`` float32 of ``(G/count + damp·I)⁻¹``; zeroes dead inputs of ``W`` in place."""
    H = stats.gram.to(device=W.device, dtype=torch.float64) / stats.count  # (in, in)
    H = (H + H.T) / 2
    if not torch.isfinite(H).all():
        raise InputError("sparsegpt: the layer's input Gram matrix has non-finite entries",
                         "check the calibration activations (try float32 for the model)")
    dead = (H.diagonal() == 0).nonzero().squeeze(1)  # (n_dead,)
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    mean_diag = float(H.diagonal().mean())
    damp = percdamp * mean_diag
    eye = torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
    for attempt in range(MAX_DAMP_RETRIES + 1):
        L, bad = torch.linalg.cholesky_ex(H + damp * eye)  # lower, (in, in)
        if int(bad) == 0:
            U, bad = torch.linalg.cholesky_ex(torch.cholesky_inverse(L), upper=True)  # (in, in)
            if int(bad) == 0:
                break
        damp = max(damp * 10, 1e-6 * mean_diag)
    else:
        raise InputError("sparsegpt: the layer's Hessian stays singular after raising the damping "
                         f"to {damp:.3g}", "use more calibration tokens or a larger percdamp")
    if attempt:
        log.warning("sparsegpt: Cholesky failed at percdamp=%g; damping raised to %.3g·mean(diag H)",
                    percdamp, damp / mean_diag)
    info = {"hessian": "G/count", "hessian_tokens": stats.count, "percdamp": percdamp,
            "damp": damp, "damp_fallback": bool(attempt), "percdamp_used": damp / mean_diag,
            "dead_inputs": int(dead.numel())}
    return U.float(), info


def block_prune_counts(total: int, bounds: list[int]) -> list[int]:
    """Split ``total`` pruned weights over column blocks ``[bounds[b], bounds[b+1])`` in proportion to
    their width, by cumulative rounding so the parts sum to ``total`` exactly."""
    in_f = bounds[-1]
    cum = [(total * b + in_f // 2) // in_f for b in bounds]
    return [hi - lo for lo, hi in zip(cum[:-1], cum[1:])]


def sweep_block(W1: torch.Tensor, Hinv1: torch.Tensor, prune1: torch.Tensor,
                pattern: Pattern | None, quant: "ColumnQuantizer | None" = None,
                col0: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Prune and OBS-update one block ``W1`` ``(out, B)`` in place of ``prune1`` (bool, True = pruned;
    filled per m-group when ``pattern``). Returns the pruned block ``Q1`` and scaled errors ``Err1``.
    ``quant`` (`quantize.ColumnQuantizer`): kept weights are also rounded to their storage as each column is
    fixed (GPTQ; ``col0 + i`` is the column's index in the whole weight)."""
    Q1, Err1 = torch.zeros_like(W1), torch.zeros_like(W1)  # (out, B) each
    d = Hinv1.diagonal()  # (B,)
    for i in range(W1.shape[1]):
        if pattern is not None and i % pattern.m == 0:
            j = slice(i, i + pattern.m)
            score = W1[:, j] ** 2 / d[j].unsqueeze(0) ** 2  # (out, m)
            prune1[:, j] = ~topk_mask(score, pattern.n)
        w = W1[:, i]  # (out,)
        if quant is not None:
            w_q = quant.round(col0 + i, w)
        q = (w if quant is None else w_q).masked_fill(prune1[:, i], 0.0)
        Q1[:, i] = q
        err = (w - q) / d[i]
        W1[:, i:] -= err.unsqueeze(1) * Hinv1[i, i:].unsqueeze(0)  # (out, 1) x (1, B-i)
        Err1[:, i] = err
    return Q1, Err1


def unstructured_block_mask(W1: torch.Tensor, Hinv1: torch.Tensor, n_prune: int) -> torch.Tensor:
    """Bool ``(out, B)``, True at the ``n_prune`` lowest OBS saliencies ``W²/diag(Hinv)²`` of the block."""
    score = W1 ** 2 / Hinv1.diagonal().unsqueeze(0) ** 2  # (out, B)
    keep = topk_mask(score.reshape(-1), score.numel() - n_prune)  # (out*B,)
    return ~keep.view_as(score)


BlockMask = Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor | None]  # (b, W1, Hinv1) -> pruned or None


def obs_sweep(W: torch.Tensor, Hinv: torch.Tensor, bounds: list[int], choose: BlockMask, pattern: Pattern | None,
              quant: "ColumnQuantizer | None" = None) -> tuple[torch.Tensor, torch.Tensor, float]:
    """One left-to-right sweep over ``W`` ``(out, in)`` (updated in place) in column blocks ``bounds``:
    ``choose`` gives each block's pruned mask at its start (None: N:M, chosen per m-group in the sweep).
    Returns the swept weights, the pruned mask and Σ err² (the OBS loss)."""
    pruned = torch.zeros_like(W, dtype=torch.bool)  # (out, in)
    loss = 0.0
    for b, (i1, i2) in enumerate(zip(bounds[:-1], bounds[1:])):
        W1, Hinv1 = W[:, i1:i2].clone(), Hinv[i1:i2, i1:i2]  # (out, B), (B, B)
        chosen = choose(b, W1, Hinv1)
        if chosen is not None:
            pruned[:, i1:i2] = chosen
        Q1, Err1 = sweep_block(W1, Hinv1, pruned[:, i1:i2], pattern if chosen is None else None, quant, i1)
        W[:, i1:i2] = Q1
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]  # (out, B) @ (B, in-i2)
        loss += float((Err1 ** 2).sum())  # Σ (w-q)²/U_ii²: increase of ‖X(W−Ŵ)ᵀ‖²/count
    return W, pruned, loss


def joint_sweep(W: torch.Tensor, Hinv: torch.Tensor, bounds: list[int], choose: BlockMask, pattern: Pattern | None,
                quant: "ColumnQuantizer | None") -> tuple[torch.Tensor, torch.Tensor, float]:
    """Prune (and, with ``quant``, quantize) ``W``: a first sweep prunes; with a quantizer, its groups'
    parameters are fitted on that sweep's result and a second sweep from the original ``W`` keeps the mask and
    rounds every kept value as its column is fixed, the OBS update spreading the rounding error as well."""
    W0 = W.clone() if quant is not None else W
    W1, pruned, loss = obs_sweep(W, Hinv, bounds, choose, pattern, None)
    if quant is None:
        return W1, pruned, loss
    quant.fit(W1, ~pruned)
    return obs_sweep(W0, Hinv, bounds, lambda b, *_: pruned[:, bounds[b]:bounds[b + 1]], None, quant)


@register(SparseGPTSpec)
def sparsegpt(W: torch.Tensor, stats: LinearStats | None, spec: SparseGPTSpec, dtype: torch.dtype) -> Pruned:
    """Prune ``W`` ``(out, in)`` with SparseGPT to ``spec.target``; needs the layer's calibration ``stats``."""
    if stats is None or stats.count == 0:
        raise InputError("method 'sparsegpt' got no calibration statistics for this layer",
                         "run it with calibration data (--calib), or use --method magnitude")
    W = W.detach().float().clone()
    out_f, in_f = W.shape
    pattern = pattern_of(spec.target)
    bs = spec.blocksize
    if pattern is not None:
        check_pattern(W.shape, pattern)
        bs = max(pattern.m, bs // pattern.m * pattern.m)
    Hinv, info = inverse_hessian_factor(W, stats, spec.percdamp)  # (in, in)
    bounds = list(range(0, in_f, bs)) + [in_f]
    counts = None if pattern else block_prune_counts(
        out_f * in_f - kept_count(spec.target, out_f, in_f, dtype, spec.store), bounds)

    def choose(b: int, W1: torch.Tensor, Hinv1: torch.Tensor) -> torch.Tensor | None:
        return None if counts is None else unstructured_block_mask(W1, Hinv1, counts[b])

    quant = ColumnQuantizer.of(spec.store, dtype, out_f, in_f)
    W, pruned, loss = joint_sweep(W, Hinv, bounds, choose, pattern, quant)
    info.update(blocksize=bs, obs_loss=loss)  # ≈ ‖X(W−Ŵ)ᵀ‖²/count (with damping; reference reports half)
    mask = ~pruned
    if quant is not None:
        info["joint_quantization"] = str(spec.store)
    return Pruned(W * mask, mask, pattern, info, spec.store, None if quant is None else quant.params())
