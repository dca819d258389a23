"""Structured pruning's pure functions on hand-checkable cases: FLAP's metric, standardization, bias and global
selection; ZipLM's greedy OBS against brute-force least squares; the uniform and knapsack width choices."""
from __future__ import annotations

import itertools

import pytest
import torch

from sparselm.capture import LinearStats
from sparselm.methods import structured as st


def test_fluctuation_is_variance_times_column_norm():
    X = torch.tensor([[1.0, 2.0, 0.0], [3.0, 2.0, 1.0]], dtype=torch.float64)  # variances 1, 0, 0.25
    W = torch.tensor([[1.0, 5.0, 2.0], [1.0, 0.0, 0.0]])  # squared column norms 2, 25, 4
    s = st.fluctuation(W, LinearStats.from_inputs(X))
    torch.testing.assert_close(s, torch.tensor([2.0, 0.0, 1.0], dtype=torch.float64))


def test_unit_scores_are_mean_z_scores():
    channel = torch.tensor([1.0, 2.0, 3.0, 6.0], dtype=torch.float64)  # mean 3, std sqrt(14/3)
    z = (channel - 3) / (14 / 3) ** 0.5
    got = st.unit_scores(channel, torch.tensor([[0, 1], [2, 3]]))
    torch.testing.assert_close(got, torch.stack([z[:2].mean(), z[2:].mean()]))


def test_flap_bias_puts_back_a_constant_channel_exactly():
    torch.manual_seed(0)
    X = torch.randn(50, 4, dtype=torch.float64)
    X[:, 2] = 0.75  # constant: zero fluctuation, its contribution is a constant the bias carries
    W = torch.randn(3, 4, dtype=torch.float64)
    stats = LinearStats.from_inputs(X)
    assert float(st.fluctuation(W, stats)[2]) == pytest.approx(0.0, abs=1e-12)
    b = st.flap_bias(W, stats.mean, torch.tensor([2]))
    torch.testing.assert_close(X[:, [0, 1, 3]] @ W[:, [0, 1, 3]].T + b, X @ W.T)


def test_adaptive_keep_ranks_all_parts_together_and_keeps_one_each():
    scores = [torch.tensor([0.5, -1.0, 2.0]), torch.tensor([-3.0, -2.0])]
    costs = [st.PartCost(3, 10.0), st.PartCost(2, 4.0, fixed=1.0)]
    # forced: part 0 unit 2 (10) + part 1 unit 1 (4 + 1 fixed) = 15; then ranking 0.5 (p0u0, +10) fits 25
    keep = st.adaptive_keep(scores, costs, budget=27.0)
    assert keep[0].tolist() == [True, False, True] and keep[1].tolist() == [False, True]
    keep = st.adaptive_keep(scores, costs, budget=24.0)  # 0.5 no longer fits: the ranking stops there
    assert keep[0].tolist() == [False, False, True] and keep[1].tolist() == [False, True]
    with pytest.raises(Exception, match="even one unit"):
        st.adaptive_keep(scores, costs, budget=14.0)


def test_uniform_counts_closest_fractions_within_budget():
    costs = [st.PartCost(4, 100.0), st.PartCost(10, 30.0)] * 2  # two blocks: attention 4 groups, MLP 10 channels
    kinds = ["attention", "mlp"] * 2
    counts = st.uniform_counts(costs, kinds, budget=2 * (300 + 240))  # per block 540: (3 groups, 8 ch) fits
    assert counts == {"attention": 3, "mlp": 8}
    assert sum(c.size(counts[k]) for c, k in zip(costs, kinds)) <= 2 * 540


def _brute_error(W, H, cols_removed):
    """Least-squares error of removing the columns and refitting the rest: min ‖L(W − Ŵ)ᵀ‖², H = LᵀL."""
    keep = [j for j in range(W.shape[1]) if j not in set(cols_removed)]
    W_hat = torch.zeros_like(W)
    if keep:
        W_hat[:, keep] = torch.linalg.solve(H[keep][:, keep], (W @ H[:, keep]).T).T
    D = W - W_hat
    return float((D @ H * D).sum()), W_hat


@pytest.mark.parametrize("width", [1, 2])
def test_obs_greedy_matches_brute_force_least_squares(width):
    torch.manual_seed(1)
    X = torch.randn(40, 6, dtype=torch.float64)
    H = X.T @ X / 40
    W = torch.randn(3, 6, dtype=torch.float64)
    cols = torch.arange(6).view(6 // width, width)
    W2, order, losses = st.obs_remove(W, H, cols, 2)
    # step 1 removes the unit of least least-squares error, and its loss is that error
    errors = [_brute_error(W, H, cols[u].tolist())[0] for u in range(cols.shape[0])]
    assert order[0] == min(range(len(errors)), key=errors.__getitem__)
    assert losses[0] == pytest.approx(min(errors), rel=1e-6)
    removed = cols[order].reshape(-1).tolist()
    total, W_hat = _brute_error(W, H, removed)
    assert sum(losses) == pytest.approx(total, rel=1e-6)  # nested steps add up to the two-unit optimum
    torch.testing.assert_close(W2.double(), W_hat, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(st.obs_update(W, H, torch.tensor(removed)), W2, rtol=1e-4, atol=1e-5)  # twin


def test_ziplm_levels_and_knapsack_keep():
    torch.manual_seed(2)
    X = torch.randn(60, 5, dtype=torch.float64)
    H = X.T @ X / 60
    W = torch.randn(4, 5, dtype=torch.float64)
    levels, order = st.ziplm_levels(W, H, torch.arange(5).view(5, 1))
    assert levels[0] == 0.0 and all(a <= b + 1e-12 for a, b in zip(levels, levels[1:])) and len(levels) == 5
    assert sorted(order) == sorted(set(order)) and len(order) == 4
    costs = [st.PartCost(5, 10.0), st.PartCost(5, 10.0)]
    flat = [0.0, 0.01, 0.02, 0.03, 0.04]  # part 1 loses little per unit: the knapsack takes its units first
    steep = [0.0, 0.5, 0.8, 0.9, 1.0]
    kept = st.knapsack_keep([steep, flat], costs, budget=70.0)
    assert kept == [5, 2]
    best = min((steep[5 - a] + flat[5 - b], a, b) for a, b in itertools.product(range(1, 6), repeat=2) if 10 * (a + b) <= 70)
    assert (best[1], best[2]) == tuple(kept)
