"""DSnoT mask refinement on hand-checkable cases: swaps keep every row's nonzeros (and N:M), move the expected
error towards zero, and (default) never raise the exact layer error."""
from __future__ import annotations

import torch

from sparselm.capture import LinearStats
from sparselm.config import Pattern, Sparsity, WandaSpec, Refine
from sparselm.methods import compress_weight
from sparselm.methods.dsnot import dsnot, expected_error
from sparselm.methods.masks import nm_mask
from sparselm.methods.wanda import wanda_score


def _data(out=16, inp=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(400, inp, generator=g, dtype=torch.float64) * torch.rand(inp, generator=g, dtype=torch.float64)
    X += torch.randn(inp, generator=g, dtype=torch.float64)  # nonzero means: the expected error matters
    return torch.randn(out, inp, generator=g), LinearStats.from_inputs(X), X


def _err(W, W_hat, X):
    return float(((X.float() @ (W - W_hat).T) ** 2).sum())


def test_one_swap_by_hand():
    """Every channel has mean 1 and the same variance.
    W = [3, -1, 2], kept {3, 2}: ε = -1. Regrowing -1 would bring ε to 0, but then a kept weight of negative
    contribution must go and there is none: no swap.
    W = [3, 2, -0.5], kept {3, -0.5}: ε = 2. Regrow 2 (ε -> 0), prune -0.5 (the kept weight of negative
    contribution): ε = 0.5 < 2, accepted."""
    X = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 1.0]], dtype=torch.float64) + torch.tensor([[0.5, -0.5, 0.5]],
                                                                                               dtype=torch.float64)
    stats = LinearStats.from_inputs(torch.cat([X, 2 - X]))  # mean 1 for every channel, same variance
    W = torch.tensor([[3.0, -1.0, 2.0]])
    mask = torch.tensor([[True, False, True]])
    weight, new_mask, info = dsnot(W, W * mask, mask, stats, exact=False)
    assert info["dsnot_swaps"] == 0 and torch.equal(new_mask, mask)
    W = torch.tensor([[3.0, 2.0, -0.5]])  # kept {3, -0.5}: ε = 2; grow 2 (ε → 0), prune −0.5 (c < 0): ε = 0.5
    mask = torch.tensor([[True, False, True]])
    weight, new_mask, info = dsnot(W, W * mask, mask, stats, exact=False)
    assert info["dsnot_swaps"] == 1 and new_mask.tolist() == [[True, True, False]]
    torch.testing.assert_close(weight, torch.tensor([[3.0, 2.0, 0.0]]))


def test_rows_keep_their_nonzeros_and_errors_fall():
    W, stats, X = _data()
    mask = torch.zeros_like(W, dtype=torch.bool)
    mask.scatter_(1, wanda_score(W, stats.sq_norms).topk(12, dim=1).indices, True)
    eps0 = expected_error(W, W * mask, stats.mean.float())
    weight, new, info = dsnot(W, W * mask, mask, stats)
    assert info["dsnot_swaps"] > 0
    assert torch.equal(new.sum(1), mask.sum(1))
    assert torch.equal(weight != 0, new & (W != 0))
    assert (expected_error(W, weight, stats.mean.float()).abs() <= eps0.abs() + 1e-6).all()
    assert _err(W, weight, X) <= _err(W, W * mask, X) * (1 + 1e-6)  # the exact test: never worse


def test_nm_pattern_is_kept():
    W, stats, X = _data(seed=3)
    pattern = Pattern(2, 4)
    mask = nm_mask(wanda_score(W, stats.sq_norms), pattern)
    weight, new, info = dsnot(W, W * mask, mask, stats, pattern)
    assert info["dsnot_swaps"] > 0
    assert (new.view(W.shape[0], -1, 4).sum(-1) == 2).all()
    assert _err(W, weight, X) <= _err(W, W * mask, X) * (1 + 1e-6)


def test_refine_spec_runs_after_the_method():
    W, stats, _ = _data(seed=4)
    plain = compress_weight(WandaSpec(target=Sparsity(0.5)), W, stats, torch.float32)
    refined = compress_weight(WandaSpec(target=Sparsity(0.5), refine=Refine.DSNOT), W, stats, torch.float32)
    assert torch.equal(plain.mask.sum(1), refined.mask.sum(1)) and "dsnot_swaps" in refined.info
    assert not torch.equal(plain.mask, refined.mask)
