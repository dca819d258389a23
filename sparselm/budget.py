"""Global budget allocation: the multiple-choice knapsack of ROCKET (arXiv 2602.11008, §3 Eq. 9–10, App. C).

Objective: given, per layer ℓ, options ``i`` with stored size ``s_ℓi`` (bytes) and error ``e_ℓi``, pick one
option per layer to minimize ``Σ_ℓ e_ℓ,i(ℓ)`` subject to ``Σ_ℓ s_ℓ,i(ℓ) ≤ budget``. Model-free: it sees
numbers only (`sparselm.profile` builds the tables). Two solvers:

* ``"dp"`` — exact dynamic programming over a discretized budget. Each layer's sizes are taken relative
  to its smallest option (so the all-smallest choice is always representable) and rounded **up** to
  units of ``(budget − Σ smallest) / resolution``: the result never exceeds the budget, and is optimal
  for the rounded sizes, hence at least as good as the exact optimum under ``budget − L·unit``.
  Vectorized over the budget axis (torch); the Python loop runs over options only.
* ``"lagrangian"`` — per layer the lower convex hull of (size, error); the multiplier λ of the budget
  is found by bisection over the hull breakpoints (the slopes: exactly where some layer changes its
  choice), then the leftover budget is filled greedily along hull segments. Never over budget; its
  error exceeds the optimum by at most the error drop of one hull segment (the one it could not take).
* ``"auto"`` — both, keeping the lower total error (the DP's rounding can waste up to one unit per
  layer; the hull solver's gap is one segment); the Lagrangian alone when options × resolution is large.

Per-layer error cap (ROCKET's ``e ≤ α·ē_ref``): options above the cap are dropped; `search_alpha`
does the code's search α = 1.0, 1.1, …, 2.0 for the smallest feasible α.

Planning on top of it (profiled options + a target ratio -> a `Plan`): `sparselm.plan`.

Differences from the ROCKET code: sizes are real stored bytes (not parameter counts) and the budget is
an upper bound on what is kept (the code's "kept" variables hold removed counts); a "no compression"
option is a normal option here (the code's solvers drop it); the default solver is the DP the paper
describes (the code's default runs Dijkstra).
"""
from __future__ import annotations

import enum
import heapq
import logging
import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch

from .errors import InputError

log = logging.getLogger(__name__)

ALPHAS = tuple(round(1.0 + 0.1 * i, 1) for i in range(11))  # 1.0, 1.1, ..., 2.0 (ROCKET's code)
DP_RESOLUTION = 20_000        # budget units of the DP (ROCKET's code uses 50,000 over the total)
DP_MAX_WORK = 300_000_000     # auto: options × units above this go to the Lagrangian solver


class Solver(enum.Enum):
    AUTO = "auto"              # both, keeping the lower total error (the Lagrangian alone on large tables)
    DP = "dp"                  # exact DP over a discretized budget
    LAGRANGIAN = "lagrangian"  # convex hull + bisection on the multiplier + greedy fill


@dataclass(frozen=True)
class Option:
    """One way to store a layer: ``size`` in bytes, ``error`` (lower is better), what to do (``payload``)."""
    size: float
    error: float
    payload: Any = None


def allocate(options: Mapping[str, Sequence[Option]], budget_bytes: float,
             error_cap: Mapping[str, float] | float | None = None, solver: Solver | str = Solver.AUTO,
             resolution: int = DP_RESOLUTION) -> dict[str, int]:
    """Index of the chosen option per layer: minimal total error with total size ≤ ``budget_bytes``."""
    try:
        solver = Solver(solver)
    except ValueError:
        raise InputError(f"knapsack solver {solver!r} is unknown",
                         f"use one of {[s.value for s in Solver]}") from None
    allowed = _allowed(options, error_cap)
    _check_feasible(options, allowed, budget_bytes)
    budget = budget_bytes
    for _ in range(4):
        choice = _solve(options, allowed, budget, solver, resolution)
        over = total(options, choice)[0] - budget_bytes
        if over <= 0:
            return choice
        # the solvers' unit / hull arithmetic fitted a choice whose summed sizes are over by rounding (float sizes
        # that fill the budget exactly): solve again a little below it
        budget -= 2 * over
    # the smallest option of each layer fits (checked above); among equally small ones the least error
    return {n: min(idx, key=lambda i: (options[n][i].size, options[n][i].error)) for n, idx in allowed.items()}


def _solve(options, allowed, budget_bytes: float, solver: Solver, resolution: int) -> dict[str, int]:
    if solver is Solver.AUTO:
        hull = solve_lagrangian(options, allowed, budget_bytes)
        if sum(len(a) for a in allowed.values()) * resolution > DP_MAX_WORK:
            return hull
        dp = solve_dp(options, allowed, budget_bytes, resolution)
        return dp if total(options, dp)[1] <= total(options, hull)[1] else hull
    if solver is Solver.DP:
        return solve_dp(options, allowed, budget_bytes, resolution)
    return solve_lagrangian(options, allowed, budget_bytes)


def total(options: Mapping[str, Sequence[Option]], choice: Mapping[str, int]) -> tuple[float, float]:
    """(total size, total error) of a choice."""
    return (sum(options[n][i].size for n, i in choice.items()),
            sum(options[n][i].error for n, i in choice.items()))


# --- input checks and caps ----------------------------------------------------------------------------
def _allowed(options: Mapping[str, Sequence[Option]], error_cap) -> dict[str, list[int]]:
    """Per layer, the indices of options under the error cap (all when there is no cap)."""
    allowed = {}
    for name, opts in options.items():
        if not opts:
            raise InputError(f"layer {name!r} has no options", "profile at least one option per layer")
        cap = error_cap.get(name, math.inf) if isinstance(error_cap, Mapping) else error_cap
        keep = [i for i, o in enumerate(opts) if cap is None or o.error <= cap]
        if not keep:
            best = min(o.error for o in opts)
            raise InputError(f"layer {name!r}: every option's error is above the cap {cap:.4g} "
                             f"(smallest error {best:.4g})", "raise the error cap (alpha) or add options")
        allowed[name] = keep
    return allowed


def _min_size(options, allowed) -> float:
    return sum(min(options[n][i].size for i in idx) for n, idx in allowed.items())


def _check_feasible(options, allowed, budget_bytes: float) -> None:
    smallest = _min_size(options, allowed)
    if smallest > budget_bytes:
        raise InputError(f"budget of {budget_bytes:,.0f} bytes is infeasible: the smallest achievable size "
                         f"of these {len(options)} layers is {smallest:,.0f} bytes",
                         "lower the ratio, raise the error cap, or profile higher ratios")


def search_alpha(options: Mapping[str, Sequence[Option]], budget_bytes: float, reference_error: float,
                 alphas: Sequence[float] = ALPHAS) -> float:
    """Smallest α (of ``alphas``) for which the cap ``α·reference_error`` on every layer stays feasible.

    ``reference_error`` is ROCKET's ē_ref: the mean per-layer error at the uniform target ratio. The
    caller then passes ``error_cap=α·reference_error`` to `allocate`. As in the code, feasibility means
    that taking the smallest option under the cap in every layer fits the budget.
    """
    for alpha in alphas:
        cap = alpha * reference_error
        small = 0.0
        for opts in options.values():
            sizes = [o.size for o in opts if o.error <= cap]
            small += min(sizes) if sizes else math.inf
        if small <= budget_bytes:
            return alpha
    raise InputError(f"no error cap α·ē with α in {alphas[0]}..{alphas[-1]} (ē = {reference_error:.4g}) "
                     f"fits the budget of {budget_bytes:,.0f} bytes", "allocate without a cap, or lower the ratio")


# --- exact DP -----------------------------------------------------------------------------------------
def solve_dp(options, allowed: Mapping[str, list[int]], budget_bytes: float, resolution: int) -> dict[str, int]:
    """Exact multiple-choice knapsack over sizes rounded up to ``(budget − Σ smallest)/resolution``."""
    names = list(allowed)
    base = {n: min(options[n][i].size for i in allowed[n]) for n in names}
    spare = budget_bytes - sum(base.values())
    units = int(resolution) if spare > 0 else 0
    unit = spare / units if units else 1.0
    best = torch.zeros(units + 1, dtype=torch.float64)  # (units+1,) min error within b units
    argmins, weights = [], []
    for n in names:
        idx = sorted(allowed[n], key=lambda i: options[n][i].size)  # ties keep the smaller option
        w = [_units(options[n][i].size - base[n], unit, units) for i in idx]
        new = torch.full_like(best, math.inf)
        arg = torch.zeros(units + 1, dtype=torch.int32)  # (units+1,) position in idx
        for j, (wj, i) in enumerate(zip(w, idx)):
            if wj > units:
                continue
            cand = torch.full_like(best, math.inf)
            cand[wj:] = best[:units + 1 - wj] + options[n][i].error
            better = cand < new
            new = torch.where(better, cand, new)
            arg = torch.where(better, torch.tensor(j, dtype=torch.int32), arg)
        best = new
        argmins.append((idx, arg))
        weights.append(w)
    choice, b = {}, units
    for n, (idx, arg), w in zip(reversed(names), reversed(argmins), reversed(weights)):
        j = int(arg[b])
        choice[n] = idx[j]
        b -= w[j]
    return {n: choice[n] for n in names}


def _units(extra: float, unit: float, units: int) -> int:
    """Size above the layer's smallest, in budget units, rounded up (never under-counts)."""
    if extra <= 0:
        return 0
    if extra > unit * units:  # past the budget (also where extra / unit would overflow: a subnormal unit)
        return units + 1
    return math.ceil(extra / unit)


# --- Lagrangian / convex hull --------------------------------------------------------------------------
def lower_hull(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the lower convex hull of (size, error) points with decreasing error, from the smallest size.

    Dominated points (no smaller error for more bytes) are dropped; consecutive hull segments have
    slopes Δerror/Δsize that increase (become less steep) from left to right.
    """
    order = sorted(range(len(points)), key=lambda i: (points[i][0], points[i][1]))
    front: list[int] = []
    for i in order:  # Pareto front: strictly decreasing error
        if not front or points[i][1] < points[front[-1]][1]:  # same size: the lower error came first
            front.append(i)
    hull: list[int] = []
    for i in front:
        while len(hull) >= 2 and _cross(points[hull[-2]], points[hull[-1]], points[i]) <= 0:
            hull.pop()
        hull.append(i)
    return hull


def _cross(a, b, c) -> float:
    return (b[0] - a[0]) * (c[1] - a[1]) - (b[1] - a[1]) * (c[0] - a[0])


def solve_lagrangian(options, allowed: Mapping[str, list[int]], budget_bytes: float) -> dict[str, int]:
    """Hull + bisection on λ + greedy fill (see the module docstring); never over budget."""
    hulls = {}
    for n, idx in allowed.items():
        pts = [(options[n][i].size, options[n][i].error) for i in idx]
        hulls[n] = [idx[h] for h in lower_hull(pts)]
    # each hull step (layer n, point j-1 -> j) has slope Δerror/Δsize < 0; λ* is minus one of these slopes
    slopes = sorted({_slope(options[n], h, j) for n, h in hulls.items() for j in range(1, len(h))})

    def at(lam_pos: int) -> tuple[dict[str, int], float]:
        """Hull positions when every segment with slope ≤ slopes[lam_pos-1] is taken (λ just above)."""
        limit = slopes[lam_pos - 1] if lam_pos else -math.inf
        p = {}
        for n, h in hulls.items():
            j = 0
            while j + 1 < len(h) and _slope(options[n], h, j + 1) <= limit:
                j += 1
            p[n] = j
        return p, sum(options[n][hulls[n][j]].size for n, j in p.items())

    lo, hi = 0, len(slopes)  # bisection: largest number of breakpoints whose segments all fit
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if at(mid)[1] <= budget_bytes:
            lo = mid
        else:
            hi = mid - 1
    pos, used = at(lo)
    return _greedy_fill(options, hulls, pos, budget_bytes - used)


def _slope(opts, h, j) -> float:
    return (opts[h[j]].error - opts[h[j - 1]].error) / (opts[h[j]].size - opts[h[j - 1]].size)


def _greedy_fill(options, hulls, pos: dict[str, int], left: float) -> dict[str, int]:
    """Take further hull steps, steepest first, while they fit; a step that does not fit freezes its layer."""
    heap = [(_slope(options[n], h, pos[n] + 1), n) for n, h in hulls.items() if pos[n] + 1 < len(h)]
    heapq.heapify(heap)
    while heap:
        _, n = heapq.heappop(heap)
        h = hulls[n]
        cost = options[n][h[pos[n] + 1]].size - options[n][h[pos[n]]].size
        if cost > left:
            continue  # this layer stays here: its later steps build on the one that does not fit
        left -= cost
        pos[n] += 1
        if pos[n] + 1 < len(h):
            heapq.heappush(heap, (_slope(options[n], h, pos[n] + 1), n))
    return {n: hulls[n][j] for n, j in pos.items()}
