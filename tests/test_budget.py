"""Multiple-choice knapsack: DP and Lagrangian against brute force, infeasible budgets, error caps, α search."""
from __future__ import annotations

import itertools
import math
import random

import pytest

from sparselm.budget import Option, allocate, lower_hull, search_alpha, total
from sparselm.errors import InputError


def random_table(seed: int, layers: int = 4, n: int = 4, integer: bool = True) -> dict[str, list[Option]]:
    rng = random.Random(seed)
    table = {}
    for layer in range(layers):
        opts = []
        for _ in range(n):
            size = rng.randint(1, 40) if integer else rng.uniform(1, 40)
            opts.append(Option(float(size), rng.uniform(0, 10) / size))
        table[f"l{layer}"] = opts
    return table


def brute_force(table, budget: float) -> float:
    """Optimal total error by enumerating every choice (inf when nothing fits)."""
    names = list(table)
    best = math.inf
    for combo in itertools.product(*(range(len(table[n])) for n in names)):
        size, err = total(table, dict(zip(names, combo)))
        if size <= budget:
            best = min(best, err)
    return best


def budgets(table) -> list[float]:
    lo = sum(min(o.size for o in opts) for opts in table.values())
    hi = sum(max(o.size for o in opts) for opts in table.values())
    return [lo, lo + 0.3 * (hi - lo), lo + 0.6 * (hi - lo), hi]


@pytest.mark.parametrize("seed", range(8))
def test_dp_exact_on_integer_sizes(seed):
    table = random_table(seed)
    for budget in budgets(table):
        budget = math.floor(budget)
        lo = sum(min(o.size for o in opts) for opts in table.values())
        spare = int(budget - lo)
        choice = allocate(table, budget, solver="dp", resolution=max(spare, 1))  # one unit = one byte: exact
        size, err = total(table, choice)
        assert size <= budget
        assert err == pytest.approx(brute_force(table, budget), abs=1e-12)


@pytest.mark.parametrize("seed", range(8))
def test_dp_within_discretization_on_real_sizes(seed):
    table = random_table(seed, integer=False)
    for budget in budgets(table)[1:]:
        resolution = 50
        choice = allocate(table, budget, solver="dp", resolution=resolution)
        size, err = total(table, choice)
        lo = sum(min(o.size for o in opts) for opts in table.values())
        unit = (budget - lo) / resolution
        assert size <= budget + 1e-9
        assert brute_force(table, budget) - 1e-12 <= err <= brute_force(table, budget - len(table) * unit) + 1e-12


def hull_gap(table) -> float:
    """Largest error drop of one lower-hull segment over all layers: the Lagrangian's worst-case gap."""
    gap = 0.0
    for opts in table.values():
        h = lower_hull([(o.size, o.error) for o in opts])
        gap = max([gap] + [opts[a].error - opts[b].error for a, b in zip(h, h[1:])])
    return gap


@pytest.mark.parametrize("seed", range(8))
def test_lagrangian_never_over_budget_and_within_hull_gap(seed):
    table = random_table(seed, layers=5, integer=False)
    for budget in budgets(table):
        choice = allocate(table, budget, solver="lagrangian")
        size, err = total(table, choice)
        opt = brute_force(table, budget)
        assert size <= budget + 1e-9
        assert opt - 1e-12 <= err <= opt + hull_gap(table) + 1e-12


def test_lower_hull_hand_example():
    # (size, error): index 2 is dominated (bigger and worse than 1), index 3 lies above the segment 1-4
    pts = [(1, 10.0), (2, 5.0), (3, 6.0), (3, 4.0), (4, 1.0)]
    assert lower_hull(pts) == [0, 1, 4]


def test_auto_is_the_better_of_both_solvers():
    for seed in range(4):
        table = random_table(seed, integer=False)
        budget = budgets(table)[2]
        auto = allocate(table, budget, resolution=20)
        assert all(0 <= i < len(table[n]) for n, i in auto.items())
        best = min(total(table, allocate(table, budget, solver=s, resolution=20))[1] for s in ("dp", "lagrangian"))
        assert total(table, auto)[1] == pytest.approx(best)
        assert total(table, auto)[0] <= budget


def test_infeasible_budget_names_smallest_size():
    table = {"a": [Option(10, 1.0), Option(20, 0.0)], "b": [Option(5, 2.0), Option(8, 0.0)]}
    for solver in ("dp", "lagrangian"):
        with pytest.raises(InputError, match="smallest achievable size .* 15 bytes"):
            allocate(table, 14, solver=solver)
    assert allocate(table, 15) == {"a": 0, "b": 0}
    with pytest.raises(InputError, match="solver"):
        allocate(table, 100, solver="magic")


def test_error_cap_drops_options():
    table = {"a": [Option(1, 9.0), Option(5, 2.0), Option(9, 0.0)],
             "b": [Option(1, 1.0), Option(9, 0.0)]}
    assert allocate(table, 10) == {"a": 2, "b": 0}  # uncapped: spend on a, error 1
    assert allocate(table, 10, error_cap={"b": 0.5}) == {"a": 0, "b": 1}  # b's cheap option is over its cap
    assert allocate(table, 6, error_cap=5.0) == {"a": 1, "b": 0}  # a's error-9 option is gone
    with pytest.raises(InputError, match="smallest achievable size .* 18 bytes"):
        allocate(table, 17, error_cap=0.5)  # only the 9-byte options are left
    with pytest.raises(InputError, match="above the cap"):
        allocate(table, 100, error_cap=-1.0)


def test_search_alpha_picks_smallest_feasible():
    table = {"a": [Option(1, 3.0), Option(4, 1.0), Option(10, 0.0)],
             "b": [Option(1, 1.4), Option(4, 0.5), Option(10, 0.0)]}
    # reference error 2: caps 2.0 (α=1) -> smallest sizes 4 + 1 = 5; α=1.5 (cap 3) -> 1 + 1 = 2
    assert search_alpha(table, 5, 2.0) == 1.0
    assert search_alpha(table, 2, 2.0) == 1.5
    with pytest.raises(InputError, match="no error cap"):
        search_alpha(table, 1, 2.0)
    alpha = search_alpha(table, 2, 2.0)
    choice = allocate(table, 2, error_cap=alpha * 2.0)
    assert total(table, choice)[0] <= 2


@pytest.mark.parametrize("solver", ["dp", "auto"])
def test_a_subnormal_spare_budget_keeps_the_smallest_options(solver):
    """Hypothesis found it: a budget a subnormal amount above the smallest plan made the DP's unit subnormal and
    ``size / unit`` infinite (OverflowError). Every larger option is over budget: the smallest one stays."""
    table = {"l0": [Option(0.0, 1.0), Option(1.0, 0.0)], "l1": [Option(0.0, 3.0), Option(5.0, 1.0)]}
    choice = allocate(table, 3e-306, solver=solver)
    assert choice == {"l0": 0, "l1": 0} and total(table, choice) == (0.0, 4.0)
