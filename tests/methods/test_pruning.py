"""Magnitude, Wanda and SparseGPT: hand-checkable masks, exact targets, byte budgets, SparseGPT's promise."""
from __future__ import annotations

import pytest
import torch

from sparselm.capture import LinearStats
from sparselm.config import MagnitudeSpec, Pattern, Ratio, SparseGPTSpec, Sparsity, WandaSpec
from sparselm.errors import InputError
from sparselm.methods import Pruned, compress_weight
from sparselm.methods.magnitude import magnitude
from sparselm.methods.sparsegpt import block_prune_counts, sparsegpt
from sparselm.methods.wanda import wanda
from sparselm.modules import SparseLinear
from tests.methods.data import correlated

METHODS = [(magnitude, MagnitudeSpec), (wanda, WandaSpec), (sparsegpt, SparseGPTSpec)]


def diag_stats(sq_norms: list[float], count: int = 10) -> LinearStats:
    return LinearStats(torch.diag(torch.tensor(sq_norms, dtype=torch.float64)), count)


def functional_error(X: torch.Tensor, W: torch.Tensor, res: Pruned) -> float:
    return float(torch.linalg.norm(X @ (W - res.reconstruct()).T))


# --- hand-checkable masks -----------------------------------------------------------------------------
def test_wanda_hand_example():
    # norms 100, 10, 1, 0.1 -> scores |W|·norm = 1, 5, 4, 3: keep columns 1 and 2
    W = torch.tensor([[0.01, 0.5, 4.0, 30.0]])
    res = wanda(W, diag_stats([1e4, 1e2, 1.0, 1e-2]), WandaSpec(Sparsity(0.5)), torch.float32)
    assert res.mask.tolist() == [[False, True, True, False]]
    assert res.weight[0].tolist() == pytest.approx([0.0, 0.5, 4.0, 0.0])


def test_magnitude_keeps_largest_over_the_layer():
    W = torch.tensor([[0.1, -5.0, 0.2, 3.0], [0.3, 0.4, -0.05, 0.6]])
    res = magnitude(W, None, MagnitudeSpec(Sparsity(0.5)), torch.float32)
    # layer-wide: the 4 largest |W| are 5, 3, 0.6, 0.4 (row 0 keeps 2, row 1 keeps 2 by coincidence)
    assert res.mask.tolist() == [[False, True, False, True], [False, True, False, True]]
    res = magnitude(W, None, MagnitudeSpec(Sparsity(0.75)), torch.float32)
    assert res.mask.tolist() == [[False, True, False, True], [False, False, False, False]]


def test_magnitude_2_4_hand_example():
    W = torch.tensor([[1.0, -4.0, 3.0, 2.0, 0.1, 0.2, -0.3, 0.0]])
    res = magnitude(W, None, MagnitudeSpec(Pattern(2, 4)), torch.float32)
    assert res.mask.tolist() == [[False, True, True, False, False, True, True, False]]
    assert res.pattern == Pattern(2, 4)


def test_wanda_needs_stats():
    with pytest.raises(InputError, match="calibration"):
        wanda(torch.ones(2, 4), None, WandaSpec(), torch.float32)
    with pytest.raises(InputError, match="calibration"):
        sparsegpt(torch.ones(2, 4), None, SparseGPTSpec(), torch.float32)


# --- exact targets ------------------------------------------------------------------------------------
@pytest.mark.parametrize("fn,spec_cls", METHODS)
@pytest.mark.parametrize("s", [0.5, 0.3, 0.7])
def test_exact_sparsity(fn, spec_cls, s):
    X, W, stats = correlated()
    out_f, in_f = W.shape
    extra = {"blocksize": 8} if spec_cls is SparseGPTSpec else {}
    res = fn(W, stats, spec_cls(Sparsity(s), **extra), torch.float32)
    assert res.mask.dtype == torch.bool and res.pattern is None
    assert (res.reconstruct() == res.weight).all()  # pruned entries are zeros in weight too
    if spec_cls is WandaSpec:  # per output row
        assert ((~res.mask).sum(1) == round(s * in_f)).all()
    else:  # whole layer
        assert int((~res.mask).sum()) == round(s * out_f * in_f)
    if spec_cls is SparseGPTSpec:  # per block of 8 columns, its share of the layer count
        counts = block_prune_counts(round(s * out_f * in_f), list(range(0, in_f + 1, 8)))
        assert (~res.mask).view(out_f, in_f // 8, 8).sum((0, 2)).tolist() == counts


@pytest.mark.parametrize("fn,spec_cls", METHODS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("ratio", [0.3, 0.5])
def test_ratio_meets_stored_bytes(fn, spec_cls, dtype, ratio):
    X, W, stats = correlated()
    res = fn(W, stats, spec_cls(Ratio(ratio)), dtype)
    stored = SparseLinear(res.weight, res.mask, dtype=dtype).stored_bytes()
    dense = W.numel() * torch.finfo(dtype).bits // 8
    assert stored <= (1 - ratio) * dense
    # not needlessly sparse: values + mask = 1 - ratio of dense, up to one value per row lost
    density = (1 - ratio) - 1 / torch.finfo(dtype).bits
    assert int(res.mask.sum()) > density * W.numel() - W.shape[0]


@pytest.mark.parametrize("fn,spec_cls", METHODS)
@pytest.mark.parametrize("n,m", [(2, 4), (4, 8)])
def test_nm_exact(fn, spec_cls, n, m):
    X, W, stats = correlated()
    res = fn(W, stats, spec_cls(Pattern(n, m)), torch.float32)
    assert res.pattern == Pattern(n, m)
    assert (res.mask.view(W.shape[0], -1, m).sum(-1) == n).all()
    SparseLinear(res.weight, res.mask, pattern=res.pattern)  # accepts it (checks exactly n per group)


@pytest.mark.parametrize("fn,spec_cls", METHODS)
def test_nm_width_not_divisible(fn, spec_cls):
    W = torch.randn(4, 30)
    with pytest.raises(InputError, match=r"\(4, 30\).*M=4") as e:
        fn(W, LinearStats.from_inputs(torch.randn(50, 30)), spec_cls(Pattern(2, 4)), torch.float32)
    assert "--sparsity" in e.value.fix and isinstance(e.value, ValueError)


def test_ratio_too_large_is_input_error():
    with pytest.raises(InputError, match="ratio"):
        magnitude(torch.randn(4, 8), None, MagnitudeSpec(Ratio(0.99)), torch.float32)


def test_registered():
    X, W, stats = correlated()
    for _, spec_cls in METHODS:
        assert isinstance(compress_weight(spec_cls(), W, stats, torch.float32), Pruned)


# --- SparseGPT ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("target", [Sparsity(0.5), Pattern(2, 4)])
def test_sparsegpt_beats_wanda_and_magnitude(target):
    X, W, stats = correlated(seed=1)
    err = {fn.__name__: functional_error(X, W, fn(W, stats, spec_cls(target), torch.float32))
           for fn, spec_cls in METHODS}
    assert err["sparsegpt"] < 0.7 * min(err["wanda"], err["magnitude"]), err


def test_sparsegpt_obs_loss_predicts_functional_error():
    X, W, stats = correlated(seed=2)
    res = sparsegpt(W, stats, SparseGPTSpec(Sparsity(0.5), blocksize=8, percdamp=1e-6), torch.float32)
    assert res.info["obs_loss"] * stats.count == pytest.approx(functional_error(X, W, res) ** 2, rel=1e-2)
    assert res.info["hessian_tokens"] == 256 and not res.info["damp_fallback"]


def test_sparsegpt_isotropic_equals_magnitude():
    # H = c·I: Hinv is diagonal, so OBS updates touch nothing else and the score is W²/const.
    # With one block (blocksize = in) the block threshold is the layer's: exactly magnitude's mask.
    # With smaller blocks each block gets its own share, so only per-block magnitude would match.
    W = torch.randn(8, 16, generator=torch.Generator().manual_seed(3))
    stats = diag_stats([4.0] * 16)
    for target in (Sparsity(0.5), Sparsity(0.3), Pattern(2, 4)):
        mag = magnitude(W, None, MagnitudeSpec(target), torch.float32)
        blocks = 16 if isinstance(target, Sparsity) else 8  # N:M is per group: any blocksize matches
        res = sparsegpt(W, stats, SparseGPTSpec(target, blocksize=blocks), torch.float32)
        assert torch.equal(res.mask, mag.mask)
        assert torch.allclose(res.weight, mag.weight)


def test_sparsegpt_dead_inputs_and_singular_hessian():
    X = torch.ones(2, 8)  # rank 1: G/count is all ones, its Cholesky hits an exact zero pivot
    X[:, 3] = 0  # a dead input
    W = torch.randn(4, 8, generator=torch.Generator().manual_seed(4))
    res = sparsegpt(W, LinearStats.from_inputs(X), SparseGPTSpec(Sparsity(0.5), percdamp=0.0), torch.float32)
    assert res.info["dead_inputs"] == 1 and res.info["damp_fallback"] and res.info["damp"] > 0
    assert (res.weight[:, 3] == 0).all() and int((~res.mask).sum()) == 16
    assert torch.isfinite(res.weight).all()
